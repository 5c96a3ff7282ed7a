"""The sentence-transformers / Hugging Face folder contract, read and written without torch.

Reading: `config.json` + weights + tokenizer, and when present `modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`. Writing: a folder that
`sentence_transformers.SentenceTransformer(path)` loads to the same embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from sbert_flax.common.files import atomic_path, read_json, write_json
from sbert_flax.models.config import BertConfig, ConfigError, PoolingConfig
from sbert_flax.models.prompts import ST_CONFIG_FILE, Prompts, read_st_prompts, st_config

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclasses.dataclass(frozen=True)
class STFolder:
    """What a HF / sentence-transformers folder says about the model."""

    model_dir: str            # where config.json, weights and tokenizer live
    config: BertConfig
    pooling: PoolingConfig
    max_seq_length: int | None  # None: decide from tokenizer and config, as sentence-transformers does
    lowercase_text: bool
    prompts: Prompts = dataclasses.field(default_factory=Prompts)


def _module_type(entry: dict) -> str:
    # sentence-transformers >= 5 may write short class names; normalise to the long form.
    t = entry.get("type", "")
    return t if t.startswith("sentence_transformers.") else f"sentence_transformers.models.{t}"


def read_st_folder(path: str) -> STFolder:
    """Parses a HF or sentence-transformers model folder.

    Without `modules.json` the folder is a plain HF model, and sentence-transformers would put
    mean pooling on it (what it does for uer/sbert-base-chinese-nli), so do we.
    """
    modules_path = os.path.join(path, "modules.json")
    model_dir, pooling, normalize = path, PoolingConfig("mean"), False
    pooling_dict: dict | None = None  # its include_prompt decides how prompts pool
    if os.path.isfile(modules_path):
        try:
            with open(modules_path, encoding="utf-8") as f:
                modules = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{modules_path}: not valid JSON ({e})") from None
        pooling_dir = None
        for i, m in enumerate(modules):
            t = _module_type(m)
            if t.endswith(".Transformer"):
                model_dir = os.path.join(path, m.get("path", ""))
            elif t.endswith(".Pooling"):
                pooling_dir = os.path.join(path, m.get("path", ""))
            elif t.endswith(".Normalize"):
                normalize = True
            else:
                raise ConfigError(
                    f"{modules_path}: module {i} has type {m.get('type')!r}; sbert-flax supports "
                    "Transformer, Pooling and Normalize modules only"
                )
        if pooling_dir is not None:
            pc = os.path.join(pooling_dir, "config.json")
            pooling_dict = read_json(pc)
            pooling = PoolingConfig.from_st_dict(pooling_dict, normalize=normalize, source=pc)
        else:
            pooling = PoolingConfig("mean", normalize=normalize)
    cfg = BertConfig.from_json_file(os.path.join(model_dir, "config.json"))
    max_len, lower = None, False
    for name in ("sentence_bert_config.json", "sentence_distilbert_config.json"):
        p = os.path.join(model_dir, name)
        if os.path.isfile(p):
            sb = read_json(p)
            max_len = sb.get("max_seq_length")
            lower = bool(sb.get("do_lower_case", False))
            break
    return STFolder(model_dir, cfg, pooling, max_len, lower, read_st_prompts(path, pooling_dict))


def write_st_folder(dest: str, cfg: BertConfig, hf_state: dict[str, np.ndarray], pooling: PoolingConfig,
                    max_seq_length: int, lowercase_text: bool, tokenizer,
                    prompts: Prompts | None = None) -> None:
    """Writes a sentence-transformers folder into the (already created, empty) `dest`."""
    prompts = prompts or Prompts()
    from safetensors.numpy import save_file

    # safetensors writes through a temp file of its own and keeps that file's 0600 mode;
    # atomic_path gives the result the umask's mode like every other file of the folder.
    with atomic_path(os.path.join(dest, "model.safetensors")) as tmp:
        save_file(hf_state, tmp, metadata={"format": "pt"})
    write_json(os.path.join(dest, "config.json"), cfg.to_hf_dict())
    tokenizer.save(dest)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _POOLING},
    ]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
        os.makedirs(os.path.join(dest, "2_Normalize"))
    write_json(os.path.join(dest, "modules.json"), modules)
    os.makedirs(os.path.join(dest, "1_Pooling"))
    write_json(os.path.join(dest, "1_Pooling", "config.json"),
               {**pooling.to_st_dict(cfg.hidden_size), "include_prompt": prompts.include_prompt})
    write_json(os.path.join(dest, ST_CONFIG_FILE), st_config(prompts))
    write_json(os.path.join(dest, "sentence_bert_config.json"),
               {"max_seq_length": max_seq_length, "do_lower_case": lowercase_text})
