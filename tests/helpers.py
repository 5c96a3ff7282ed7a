"""Shared test utilities: tiny random BERT folders (HF and sentence-transformers), reference data.

Everything here is built locally (`save_pretrained`, no network). The random models perturb
*every* tensor, biases and LayerNorm parameters included: a freshly initialised BERT has zero
biases and unit LayerNorm scales, which would hide a mis-mapped bias or a swapped gamma/beta.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))  # tests/: the drivers and hooks live here
REPO = os.path.dirname(TESTS)

TEST_CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def without_test_cache(env: dict) -> dict:
    """`env` less the session-wide compilation cache conftest.py sets: for the tests of the cache
    (and of the library's untouched JAX config), whose children must start as a user's would."""
    return {k: v for k, v in env.items() if k not in TEST_CACHE_VARS}


def zh_vocab_file() -> str | None:
    """The Chinese BERT vocab (shared data), or None if it is absent."""
    from sbert_flax.common.devdata import data_path

    return data_path("vocab", "google_zh_vocab.txt")


def wordpiece_tokenizer(vocab_file: str, **kwargs):
    """`BertTokenizerFast` over a vocab.txt. transformers 5 calls the argument `vocab` and silently
    ignores `vocab_file` (a 5-token vocab: every character becomes [UNK])."""
    import inspect

    from transformers import BertTokenizerFast

    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{arg: vocab_file}, **kwargs)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def write_st_modules(path: str, hidden: int, pooling: str, normalize: bool,
                     max_seq_length: int, do_lower_case: bool = False) -> None:
    """Adds the sentence-transformers files (modules.json, 1_Pooling, ...) to a HF folder."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    _write_json(os.path.join(path, "modules.json"), modules)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    _write_json(os.path.join(path, "1_Pooling", "config.json"), {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    _write_json(os.path.join(path, "sentence_bert_config.json"),
                {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case})


def make_tiny_bert_dir(path: str, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                       intermediate: int = 37, vocab_file: str | None = None, seed: int = 0,
                       pooling: str | None = None, normalize: bool = False,
                       max_position: int = 128, hidden_act: str = "gelu",
                       layer_norm_eps: float = 1e-12, std: float = 0.1) -> str:
    """Writes a tiny random HF `BertModel` folder (model.safetensors + config + tokenizer).

    Args:
      path: destination directory (created).
      hidden, layers, heads, intermediate, max_position, hidden_act, layer_norm_eps: architecture.
      vocab_file: WordPiece vocab; default the shared Chinese vocab (21128 tokens).
      seed: torch seed for the random weights.
      pooling: None for a plain HF folder; "cls" | "mean" | "max" also writes the
        sentence-transformers files (modules.json, 1_Pooling/config.json,
        sentence_bert_config.json with max_seq_length = max_position).
      normalize: add a Normalize module (only with `pooling`).
      std: scale of the random perturbation of every tensor.

    Returns:
      `path`.
    """
    import torch
    from transformers import BertConfig, BertModel

    vocab_file = vocab_file or zh_vocab_file()
    if vocab_file is None:
        raise FileNotFoundError("the Chinese vocab (shared/data/vocab/google_zh_vocab.txt) is absent")
    with open(vocab_file, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    os.makedirs(path, exist_ok=True)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate,
                     hidden_act=hidden_act, max_position_embeddings=max_position,
                     layer_norm_eps=layer_norm_eps, type_vocab_size=2)
    torch.manual_seed(seed)
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    model.save_pretrained(path)
    tok = wordpiece_tokenizer(vocab_file, model_max_length=max_position)
    assert len(tok.get_vocab()) == vocab_size, "the vocab file did not load"
    tok.save_pretrained(path)
    if pooling is not None:
        write_st_modules(path, hidden, pooling, normalize, max_position)
    elif normalize:
        raise ValueError("normalize=True needs a pooling mode (it is a sentence-transformers module)")
    return path


# ---- reference data -----------------------------------------------------------------------------

def read_stsb(split: str) -> tuple[list[str], list[str], np.ndarray] | None:
    """STS-B-zh `split` as (s1, s2, scores), or None if the shared file is absent."""
    from sbert_flax.common.devdata import data_path

    p = data_path("stsb-zh", f"{split}.tsv")
    if p is None:
        return None
    s1, s2, scores = [], [], []
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{p}:{line_no}: expected 3 tab-separated fields, got {len(parts)}")
            s1.append(parts[0])
            s2.append(parts[1])
            scores.append(float(parts[2]))
    return s1, s2, np.asarray(scores, np.float64)


def random_zh_sentences(n: int, min_len: int = 1, max_len: int = 200, seed: int = 0,
                        vocab_file: str | None = None) -> list[str]:
    """`n` strings of random single CJK characters from the vocab (one token per character)."""
    vocab_file = vocab_file or zh_vocab_file()
    with open(vocab_file, encoding="utf-8") as f:
        chars = [t for t in (line.strip() for line in f)
                 if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    rng = random.Random(seed)
    return ["".join(rng.choices(chars, k=rng.randint(min_len, max_len))) for _ in range(n)]


ZH_SENTENCES = [
    "今天天气很好。",
    "我喜欢吃苹果和香蕉",
    "一个男人在弹吉他。",
    "这家餐厅的服务非常糟糕，我再也不会来了！",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "北京",
    "他说：“明天见。”",
    "2023年GDP增长了5.2%",
    "猫",
    "一只小狗在草地上奔跑，它的主人在后面追着它，阳光明媚，微风习习。",
    "Hello 世界",
    "请问去火车站怎么走？",
]


# UER-py's TransformerLayer names -> HF names, written out by hand from UER-py's
# scripts/convert_sbert_from_uer_to_huggingface.py (independent of
# weights._UER_LAYER): the tests of the weight maps and of the conversion command check against it.
UER_LAYER_BY_HAND = [
    ("self_attn.linear_layers.0.weight", "attention.self.query.weight"),
    ("self_attn.linear_layers.0.bias", "attention.self.query.bias"),
    ("self_attn.linear_layers.1.weight", "attention.self.key.weight"),
    ("self_attn.linear_layers.1.bias", "attention.self.key.bias"),
    ("self_attn.linear_layers.2.weight", "attention.self.value.weight"),
    ("self_attn.linear_layers.2.bias", "attention.self.value.bias"),
    ("self_attn.final_linear.weight", "attention.output.dense.weight"),
    ("self_attn.final_linear.bias", "attention.output.dense.bias"),
    ("layer_norm_1.gamma", "attention.output.LayerNorm.weight"),
    ("layer_norm_1.beta", "attention.output.LayerNorm.bias"),
    ("feed_forward.linear_1.weight", "intermediate.dense.weight"),
    ("feed_forward.linear_1.bias", "intermediate.dense.bias"),
    ("feed_forward.linear_2.weight", "output.dense.weight"),
    ("feed_forward.linear_2.bias", "output.dense.bias"),
    ("layer_norm_2.gamma", "output.LayerNorm.weight"),
    ("layer_norm_2.beta", "output.LayerNorm.bias"),
]


def wait_for(condition: Callable[[], object], timeout: float = 120.0) -> bool:
    """Polls `condition` every 10 ms until it is true (True) or `timeout` seconds pass (False):
    a ceiling against a hang, generous so that a loaded machine only makes it slower."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def write_jsonl(path, objs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")


def write_beir(root, corpus, queries, qrels, split: str = "test") -> str:
    """corpus: [(id, title, text)], queries: [(id, text)], qrels: [(qid, cid, score)]."""
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    write_jsonl(os.path.join(root, "corpus.jsonl"),
                 [{"_id": c, "title": t, "text": x} for c, t, x in corpus])
    write_jsonl(os.path.join(root, "queries.jsonl"), [{"_id": q, "text": x} for q, x in queries])
    with open(os.path.join(root, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{c}\t{s}\n" for q, c, s in qrels)
    return str(root)
