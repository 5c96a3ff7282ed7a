"""Writes a tiny random sentence-transformers BERT folder with numpy only (no torch).

    python tests/make_tiny_model.py DEST [--pooling mean] [--vocab VOCAB_TXT]

For checks that run where torch is not installed (.ci/plain_install.sh runs it with the Python
of a plain `pip install .`). `helpers.make_tiny_bert_dir` builds its folders with
`transformers.BertModel.save_pretrained`, which needs torch; this one writes the same files
(config.json, model.safetensors, the tokenizer, modules.json and 1_Pooling) directly. The
tensor names are the Hugging Face `BertModel` ones, spelled out here rather than taken from
sbert_flax, so a loader that mis-names a key is not checked against itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# Run as a script, this file's folder is on sys.path: share the tokenizer and module files
# with the torch-based builder.
from helpers import ZH_SENTENCES, wordpiece_tokenizer, write_st_modules

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab(path: str, extra: str = "那个人很开心非常只猫") -> str:
    """A WordPiece vocab of the special tokens and every character of the test sentences."""
    chars = sorted({c for s in [*ZH_SENTENCES, extra] for c in s if not c.isspace()})
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIAL + chars) + "\n")
    return path


def hf_bert_state(vocab_size: int, hidden: int, layers: int, intermediate: int, max_position: int,
                  seed: int, std: float = 0.1) -> dict[str, np.ndarray]:
    """Random HF `BertModel` tensors (torch layout: Linear weights are [out, in])."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab_size, hidden),
        "embeddings.position_embeddings.weight": (max_position, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + name + ".bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (intermediate, hidden)
        shapes[p + "intermediate.dense.bias"] = (intermediate,)
        shapes[p + "output.dense.weight"] = (hidden, intermediate)
        shapes[p + "output.dense.bias"] = (hidden,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (hidden,)
            shapes[p + norm + ".bias"] = (hidden,)
    state = {}
    for name, shape in shapes.items():
        x = std * rng.standard_normal(shape, dtype=np.float32)
        # LayerNorm scales near 1, as trained models have, so activations stay in range.
        state[name] = x + 1.0 if name.endswith("LayerNorm.weight") else x
    return state


def make_tiny_st_dir(path: str, *, vocab_file: str | None = None, hidden: int = 32,
                     layers: int = 2, heads: int = 4, intermediate: int = 37,
                     max_position: int = 128, pooling: str = "mean", seed: int = 0) -> str:
    """Writes the folder and returns `path`."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    vocab_file = vocab_file or tiny_vocab(os.path.join(path, "vocab.txt"))
    with open(vocab_file, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "hidden_act": "gelu",
        "max_position_embeddings": max_position, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02, "pad_token_id": 0, "position_embedding_type": "absolute",
    }
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    state = hf_bert_state(vocab_size, hidden, layers, intermediate, max_position, seed)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tok = wordpiece_tokenizer(vocab_file, model_max_length=max_position)
    if len(tok.get_vocab()) != vocab_size:
        raise RuntimeError(f"{vocab_file}: the tokenizer read {len(tok.get_vocab())} tokens, "
                           f"the file has {vocab_size}")
    tok.save_pretrained(path)
    write_st_modules(path, hidden, pooling, normalize=False, max_seq_length=max_position)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", help="output folder (created)")
    p.add_argument("--pooling", choices=("cls", "mean", "max"), default="mean")
    p.add_argument("--vocab", help="vocab.txt (default: a tiny one of the test sentences' characters)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    make_tiny_st_dir(args.dest, vocab_file=args.vocab, pooling=args.pooling, seed=args.seed)
    print(f"wrote a tiny random BERT folder to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
