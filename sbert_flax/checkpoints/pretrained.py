"""Where training starts from: an HF / sentence-transformers / sbert-flax dir or a UER-py `.bin`.

All loading goes through `sbert_flax.checkpoints.loading.load_model` (host numpy params, nothing placed on a
device); this module only decides the pooling, reads it out of a UER config json, warns about the
fields of that json that training does not use, and checks the json's architecture fields against
the weights' shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from sbert_flax.checkpoints.loading import load_model
from sbert_flax.checkpoints.uer import check_uer_architecture, is_hf_config_file, read_uer_config
from sbert_flax.common.files import read_json
from sbert_flax.models.config import BertConfig, PoolingConfig, pooling_from_uer
from sbert_flax.models.prompts import Prompts
from sbert_flax.models.tokenization import Tokenizer

log = logging.getLogger("sbert_flax.train")

@dataclasses.dataclass(frozen=True)
class Pretrained:
    """The backbone to fine-tune: architecture, host params, tokenizer and pooling."""

    config: BertConfig
    params: dict
    tokenizer: Tokenizer
    pooling_config: PoolingConfig
    # The base model's sentence-transformers prompts: the exported fine-tuned model keeps them.
    prompts: Prompts = dataclasses.field(default_factory=Prompts)

    @property
    def pooling(self) -> str:
        return self.pooling_config.mode


# How the backbone is computed, not what it is: the same model with or without them.
_COMPUTE_ONLY_FIELDS = ("remat", "scan_layers")


def model_sha256(config: BertConfig, params: dict) -> str:
    """The pretrained model by content: sha256 over its architecture and every weight.

    Independent of where the model lies or which format it was read from (HF, sbert-flax, UER
    `.bin` give the same host params), so a moved model folder resumes and other weights at the
    same path do not. Each leaf contributes its key path, dtype, shape and bytes, in sorted key
    order, so the digest is fixed for given weights.
    """
    h = hashlib.sha256()
    arch = {k: v for k, v in dataclasses.asdict(config).items() if k not in _COMPUTE_ONLY_FIELDS}
    h.update(json.dumps(arch, sort_keys=True).encode())

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k in sorted(node, key=str):
                walk(f"{prefix}/{k}", node[k])
            return
        a = np.ascontiguousarray(np.asarray(node))
        h.update(f"{prefix}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())

    walk("", params)
    return h.hexdigest()


def vocab_sha256(tokenizer: Tokenizer) -> str:
    """The tokenizer by content: sha256 over its vocab (token -> id) and the text lowercasing,
    the two things that decide which ids a sentence becomes (not the file it came from)."""
    vocab = sorted(tokenizer.hf.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    payload = {"vocab": vocab, "lowercase_text": bool(tokenizer.lowercase_text)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def load_pretrained(path: str, *, vocab_path: str | None = None, config_path: str | None = None,
                    pooling: str | None = None, seq_length: int = 128,
                    default_pooling: str | None = "cls") -> Pretrained:
    """Loads the starting point of fine-tuning onto the host.

    Args:
      path: a model directory (HF, sentence-transformers or sbert-flax) or a UER-py checkpoint
        file (`.bin`, single-tower or sbert), which needs `vocab_path` and `config_path`.
      vocab_path: vocab file; overrides a directory's tokenizer when given.
      config_path: UER config json (heads_num, pooling "first", ...) or an HF config.json.
      pooling: "first"/"cls" | "mean" | "max"; None takes the UER config's, else
        `default_pooling`, else the folder's own.
      seq_length: tokens per sentence.
      default_pooling: the pooling when neither `pooling` nor a UER config names one ("cls":
        UER's sbert default, what the softmax recipe uses; None: the model folder's own).

    Raises:
      ValueError: a UER checkpoint without `vocab_path` / `config_path`.
      WeightsError: weights that do not fit the config.
    """
    cfg_pooling = None
    uer_cfg = None
    if config_path and not is_hf_config_file(config_path):
        uer_cfg = read_json(config_path)
        cfg_pooling, ignored = read_uer_config(config_path)
        if ignored:
            log.warning("%s: ignoring UER config field(s) not used by sbert-flax training: %s",
                        config_path, ", ".join(ignored))
    mode = pooling_from_uer(pooling) if pooling else (cfg_pooling or default_pooling)
    if os.path.isfile(path) and not (vocab_path and config_path):
        raise ValueError(f"{path} is a UER-py checkpoint file: pass --vocab_path (e.g. "
                         "models/google_zh_vocab.txt) and --config_path (its UER config json)")
    loaded = load_model(path, pooling=mode, max_seq_length=seq_length, vocab_path=vocab_path,
                        config_path=config_path if os.path.isfile(path) else None)
    if uer_cfg is not None:
        check_uer_architecture(uer_cfg, loaded.config, config_path)
    return Pretrained(loaded.config, loaded.params, loaded.tokenizer, loaded.pooling, loaded.prompts)
