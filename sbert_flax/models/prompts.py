"""Prompts as sentence-transformers has them: named prefixes prepended to each input text.

A sentence-transformers folder keeps them in `config_sentence_transformers.json`
(`{"prompts": {"query": "查询：", ...}, "default_prompt_name": "query"}`); an sbert-flax folder
keeps the same two keys in `sbert_flax.json`. The prompt is prepended to the text before
tokenizing, so its tokens count against `max_seq_length` and are pooled like any other token,
which is what sentence-transformers does with `include_prompt=True` (its default) in the Pooling
config. `include_prompt=False` (prompt tokens attend but are not pooled) is not implemented by the
packed pooling; it is kept on save, and encoding with a prompt under it is refused rather than
giving different embeddings.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

from sbert_flax.common.files import read_json

ST_CONFIG_FILE = "config_sentence_transformers.json"
# sentence-transformers >= 6 knows these names on every model (empty unless configured), so
# `prompt_name="document"` works on a model without prompts; they resolve the same here.
BUILTIN_PROMPT_NAMES = ("query", "document")
# The prompt names `encode_query` / `encode_document` look for when a call names none, first found
# wins (sentence-transformers 6: `SentenceTransformer.encode_query` / `encode_document`).
SIDE_PROMPT_NAMES = {"query": ("query",), "document": ("document", "passage", "corpus")}


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A model's named prompts.

    Attributes:
      prompts: name -> text prepended to each input.
      default_prompt_name: the prompt used when a call names none (None: no prompt).
      include_prompt: sentence-transformers' Pooling flag; False means prompt tokens are not pooled.
    """

    prompts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str, include_prompt: bool = True) -> Prompts:
        """Reads `prompts` / `default_prompt_name` from a config dict, checked as
        sentence-transformers checks them (a null prompt means "", the default must be a name)."""
        raw = d.get("prompts") or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: 'prompts' must be an object of name -> text, "
                             f"got {type(raw).__name__}")
        prompts: dict[str, str] = {}
        for name, text in raw.items():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{source}: prompt {name!r} must be a string, got {type(text).__name__}")
            prompts[str(name)] = text or ""
        default = d.get("default_prompt_name")
        known = [*BUILTIN_PROMPT_NAMES, *(n for n in prompts if n not in BUILTIN_PROMPT_NAMES)]
        if default is not None and default not in known:
            raise ValueError(f"{source}: default_prompt_name {default!r} is not one of the prompts "
                             f"{known!r}")
        return cls(prompts, default, include_prompt)

    @property
    def known(self) -> dict[str, str]:
        """Every name `prompt_name` accepts: the built-in ones, then the model's own."""
        return {**dict.fromkeys(BUILTIN_PROMPT_NAMES, ""), **self.prompts}

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": dict(self.prompts), "default_prompt_name": self.default_prompt_name}

    def resolve(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The text to prepend for one call, by sentence-transformers' rules.

        An explicit `prompt` wins (with a warning if `prompt_name` is given too); else
        `prompt_name` is looked up; else the default prompt applies; else none ("").

        Raises:
          ValueError: `prompt_name` is unknown (the message lists the known names), or a prompt is
            used on a model whose pooling excludes prompt tokens (`include_prompt=False`).
        """
        if prompt is None:
            if prompt_name is not None:
                known = self.known
                if prompt_name not in known:
                    raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts "
                                     f"{list(known)!r}")
                prompt = known[prompt_name]
            elif self.default_prompt_name is not None:
                prompt = self.known.get(self.default_prompt_name, "")
        elif prompt_name is not None:
            warnings.warn("both prompt and prompt_name were given; using prompt and ignoring "
                          f"prompt_name={prompt_name!r} (as sentence-transformers does)", stacklevel=3)
        if not isinstance(prompt, str | None):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        prompt = prompt or ""
        if prompt and not self.include_prompt:
            raise ValueError("this model's pooling excludes prompt tokens (include_prompt=false in "
                             "1_Pooling/config.json), which sbert-flax does not implement; encode "
                             "without a prompt or use sentence-transformers for this model")
        return prompt


def side_prompt_kwargs(encoder: Any, side: str, prompt: str | None = None,
                       prompt_name: str | None = None) -> dict[str, str]:
    """`encode` keyword arguments for one side of a search ("query" or "document").

    sentence-transformers' `encode_query` / `encode_document` rule, which its retrieval evaluator
    and hard-negative mining use: an explicit `prompt` or `prompt_name` wins; otherwise the first
    of the side's names (query: "query"; document: "document", "passage", "corpus") among the
    model's prompts, where "query" and "document" are always present (empty unless configured),
    so `default_prompt_name` never applies to either side. An encoder without `prompts` (a
    stand-in) gets only what was given.
    """
    if prompt is not None or prompt_name is not None:
        return {k: v for k, v in (("prompt", prompt), ("prompt_name", prompt_name)) if v is not None}
    prompts = getattr(encoder, "prompts", None)
    if not isinstance(prompts, Prompts):
        return {}
    known = prompts.known
    name = next((n for n in SIDE_PROMPT_NAMES[side] if n in known), None)
    return {} if name is None else {"prompt_name": name}


def read_st_prompts(folder: str, pooling_config: Mapping[str, Any] | None = None) -> Prompts:
    """The prompts of a sentence-transformers folder (none if it has no config file)."""
    include = bool((pooling_config or {}).get("include_prompt", True))
    path = os.path.join(folder, ST_CONFIG_FILE)
    if not os.path.isfile(path):
        return Prompts(include_prompt=include)
    return Prompts.from_dict(read_json(path), source=path, include_prompt=include)


def st_config(prompts: Prompts) -> dict[str, Any]:
    """`config_sentence_transformers.json` as sentence-transformers reads it back."""
    return {"prompts": dict(prompts.prompts), "default_prompt_name": prompts.default_prompt_name}
