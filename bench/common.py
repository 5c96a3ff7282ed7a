"""What the benchmarks share: random stand-in models and the STS-B-zh sentences."""

from __future__ import annotations

import os
import sys


def random_bert_dir(name: str, **config) -> str:
    """A random-weight Chinese BERT folder (HF format + the zh vocab), built once and cached.

    Args:
      name: folder name under the model cache.
      **config: `transformers.BertConfig` fields (vocab size is always 21128).
    """
    from sbert_flax.common.devdata import data_path, model_cache_dir

    d = os.path.join(model_cache_dir(), name)
    if os.path.isfile(os.path.join(d, "config.json")):
        return d
    import torch
    from transformers import BertConfig, BertModel

    from sbert_flax.models.tokenization import load_tokenizer

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=21128, **config), add_pooling_layer=False)
    tmp = d + ".tmp"
    model.save_pretrained(tmp)
    load_tokenizer(data_path("vocab", "google_zh_vocab.txt")).save(tmp)
    os.replace(tmp, d)
    return d


def bert_base_dir() -> str:
    """BERT-base-sized (12 layers, hidden 768): the stand-in for uer/sbert-base-chinese-nli."""
    return random_bert_dir("bert-base-zh-random", hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072)


def stsb_sentences(split: str = "test", n: int | None = None) -> list[str]:
    """Both sentence columns of STS-B-zh `split` (test: 2,722 sentences), first `n` if given."""
    from sbert_flax.common.devdata import data_path

    path = data_path("stsb-zh", f"{split}.tsv")
    if path is None:
        sys.exit(f"STS-B-zh {split}.tsv not found: set SBERT_FLAX_DATA to the shared data folder")
    sents: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            sents += line.rstrip("\n").split("\t")[:2]
    return sents[:n] if n else sents
