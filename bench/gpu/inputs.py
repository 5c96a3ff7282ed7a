"""What the GPU lease measures on: the random model folder and the sentences.

The model is a random Chinese BERT of the mode's sizes (`sizes.SIZES`: BERT-base on the GPU,
vocab 21128) written with numpy (no torch needed); the sentences are STS-B-zh test's, repeated to
the mode's count.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

from gpu.result_file import read_json


def make_model_dir(path: str, sizes: dict, vocab: str) -> str:
    """A random HF BERT folder (config.json, model.safetensors, tokenizer) written with numpy.

    Reused when its config.json already describes these sizes."""
    import numpy as np
    from safetensors.numpy import save_file

    from sbert_flax.checkpoints.weight_maps import hf_ports
    from sbert_flax.models.config import BertConfig
    from sbert_flax.models.tokenization import load_tokenizer

    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=sizes["hidden"],
                     num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                     intermediate_size=sizes["intermediate"])
    want = cfg.to_hf_dict()
    if read_json(os.path.join(path, "config.json")) == json.loads(json.dumps(want)) and \
            os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    rng = np.random.default_rng(0)
    state = {}
    for port in hf_ports(cfg):
        for key, shape in zip(port.hf, port.hf_shapes, strict=True):
            if key.endswith("LayerNorm.weight"):
                state[key] = np.ones(shape, np.float32)
            elif key.endswith(".bias"):
                state[key] = np.zeros(shape, np.float32)
            else:  # BERT's init: normal(0, 0.02)
                state[key] = (rng.standard_normal(shape, dtype=np.float32) * 0.02
                              ).astype(np.float32)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1)
    load_tokenizer(vocab).save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def vocab_path() -> str:
    """The Chinese BERT vocab of the shared data (exits naming the folder when it is absent)."""
    from sbert_flax.common.devdata import data_dir, data_path

    p = data_path("vocab", "google_zh_vocab.txt")
    if p is None:
        sys.exit(f"vocab/google_zh_vocab.txt not found under {data_dir()}: set SBERT_FLAX_DATA")
    return p


def repeated_sentences(n: int) -> tuple[list[str], int]:
    """STS-B-zh test sentences repeated to at least `n` (all of them, then the next repeat), and
    how many are distinct."""
    from common import stsb_sentences  # bench/common.py

    distinct = stsb_sentences("test")
    return distinct * max(1, math.ceil(n / len(distinct))), len(distinct)
