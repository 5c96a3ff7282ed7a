"""Where training starts from: an HF / sentence-transformers / sbert-flax dir or a UER-py `.bin`.

All loading goes through `SentenceEncoder.from_pretrained` / `SentenceEncoder.from_uer`; this module
only decides which, reads the pooling out of a UER config json and warns about the fields of that
json that training does not use.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from sbert_flax.config import BertConfig, pooling_from_uer
from sbert_flax.encoder import SentenceEncoder
from sbert_flax.files import read_json
from sbert_flax.tokenization import Tokenizer, load_tokenizer

log = logging.getLogger("sbert_flax.train")

# UER config fields that matter here: the architecture (checked against the weights by
# `weights.config_from_uer`), the pooling, and the nesting of sbert configs.
UER_USED_FIELDS = frozenset({
    "pooling", "heads_num", "hidden_act", "layernorm_eps", "dropout", "hidden_size", "emb_size",
    "feedforward_size", "layers_num", "max_seq_length", "stream_0", "stream_1", "tie_weights",
})
# Fields that describe exactly the architecture we implement (post-LN BERT), so they are fine
# with these values and need no warning.
UER_EXPECTED = {
    "embedding": ["word", "pos", "seg"], "encoder": "transformer", "mask": "fully_visible",
    "layernorm_positioning": "post", "feed_forward": "dense", "layernorm": "normal",
    "remove_embedding_layernorm": False, "data_processor": "bert", "target": ["sbert"],
}


@dataclasses.dataclass
class Pretrained:
    """The backbone to fine-tune: architecture, host params, tokenizer and pooling mode."""

    config: BertConfig
    params: dict
    tokenizer: Tokenizer
    pooling: str  # "cls" | "mean" | "max"


def read_uer_config(path: str) -> tuple[str | None, list[str]]:
    """The pooling named by a UER (sbert) config json, and the fields training ignores."""
    d = read_json(path)
    flat: dict[str, Any] = dict(d)
    for stream in ("stream_0", "stream_1"):
        if isinstance(d.get(stream), dict):
            flat.update({k: v for k, v in d[stream].items() if k not in flat})
    ignored = sorted(k for k, v in flat.items()
                     if k not in UER_USED_FIELDS and UER_EXPECTED.get(k, object()) != v)
    pooling = flat.get("pooling")
    return (pooling_from_uer(pooling) if pooling else None), ignored


def _is_hf_config(path: str) -> bool:
    d = read_json(path)
    return "model_type" in d or "num_hidden_layers" in d


def load_pretrained(path: str, *, vocab_path: str | None = None, config_path: str | None = None,
                    pooling: str | None = None, seq_length: int = 128) -> Pretrained:
    """Loads the starting point of fine-tuning.

    Args:
      path: a model directory (HF, sentence-transformers or sbert-flax) or a UER-py checkpoint
        file (`.bin`, single-tower or sbert), which needs `vocab_path` and `config_path`.
      vocab_path: vocab file; overrides a directory's tokenizer when given.
      config_path: UER config json (heads_num, pooling "first", ...) or an HF config.json.
      pooling: "first"/"cls" | "mean" | "max"; None takes the UER config's, else "cls"
        (UER's sbert default), whatever a directory's own pooling says.
      seq_length: tokens per sentence.

    Raises:
      ValueError: a UER checkpoint without `vocab_path` / `config_path`.
    """
    cfg_pooling = None
    if config_path and not _is_hf_config(config_path):
        cfg_pooling, ignored = read_uer_config(config_path)
        if ignored:
            log.warning("%s: ignoring UER config field(s) not used by sbert-flax training: %s",
                        config_path, ", ".join(ignored))
    mode = pooling_from_uer(pooling) if pooling else (cfg_pooling or "cls")
    one = [jax.local_devices()[0]]  # the trainer places params itself; keep this copy small
    if os.path.isfile(path):
        if not (vocab_path and config_path):
            raise ValueError(f"{path} is a UER-py checkpoint file: pass --vocab_path (e.g. "
                             "models/google_zh_vocab.txt) and --config_path (its UER config json)")
        enc = SentenceEncoder.from_uer(path, vocab_path, config_path, pooling=mode,
                                       max_seq_length=seq_length, devices=one)
    else:
        enc = SentenceEncoder.from_pretrained(path, pooling=mode, max_seq_length=seq_length,
                                              devices=one)
    tokenizer = load_tokenizer(vocab_path) if (vocab_path and not os.path.isfile(path)) else enc.tokenizer
    return Pretrained(enc.config, enc.param_dict(), tokenizer, mode)
