"""The sbert-flax model folder: read, write and version, beside `st_format.py`.

```
model/
  sbert_flax.json   {"format": "sbert-flax", "version": 1, "pooling", "normalize",
                     "max_seq_length", "lowercase_text", "prompts", "default_prompt_name",
                     "include_prompt"}
  config.json       HF BertConfig
  params/           orbax checkpoint of the backbone params (see checkpoint.py)
  tokenizer files   (tokenizer.json, vocab.txt, ...)
```
"""

from __future__ import annotations

import dataclasses
import os

from sbert_flax.checkpoints import orbax_params as checkpoint
from sbert_flax.common.files import read_json, write_json
from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.models.prompts import Prompts
from sbert_flax.models.tokenization import Tokenizer

FORMAT_FILE = "sbert_flax.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FlaxFolder:
    """What an sbert-flax folder holds (params as host numpy arrays)."""

    config: BertConfig
    params: dict
    pooling: PoolingConfig
    max_seq_length: int
    lowercase_text: bool
    tokenizer_dir: str
    prompts: Prompts = dataclasses.field(default_factory=Prompts)


def is_flax_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, FORMAT_FILE))


def read_flax_folder(path: str) -> FlaxFolder:
    """Reads an sbert-flax folder; errors name the file and what is wrong."""
    meta_path = os.path.join(path, FORMAT_FILE)
    meta = read_json(meta_path)
    if meta.get("format") != "sbert-flax":
        raise ValueError(f"{meta_path}: 'format' is {meta.get('format')!r}, expected 'sbert-flax'")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {version!r} is newer than this sbert-flax "
                         f"reads ({FORMAT_VERSION}); upgrade sbert-flax")
    for key in ("pooling", "max_seq_length"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    cfg = BertConfig.from_json_file(os.path.join(path, "config.json"))
    return FlaxFolder(
        config=cfg, params=checkpoint.load_params(path),
        pooling=PoolingConfig(meta["pooling"], bool(meta.get("normalize", False))),
        max_seq_length=int(meta["max_seq_length"]),
        lowercase_text=bool(meta.get("lowercase_text", False)), tokenizer_dir=path,
        # Optional keys: folders written before prompts existed have none.
        prompts=Prompts.from_dict(meta, meta_path, bool(meta.get("include_prompt", True))))


def write_flax_folder(dest: str, cfg: BertConfig, params: dict, pooling: PoolingConfig,
                      max_seq_length: int, tokenizer: Tokenizer, prompts: Prompts | None = None) -> None:
    """Writes the folder's files into `dest` (an existing, empty temp dir: callers rename it)."""
    checkpoint.save_params(dest, params)
    write_json(os.path.join(dest, "config.json"), cfg.to_hf_dict())
    tokenizer.save(dest)
    write_json(os.path.join(dest, FORMAT_FILE), {
        "format": "sbert-flax", "version": FORMAT_VERSION, "pooling": pooling.mode,
        "normalize": pooling.normalize, "max_seq_length": int(max_seq_length),
        "lowercase_text": tokenizer.lowercase_text,
        **(prompts or Prompts()).to_dict(), "include_prompt": (prompts or Prompts()).include_prompt,
    })
