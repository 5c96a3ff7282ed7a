"""Frozen, typed configs: the BERT architecture and the sentence-embedding head.

`BertConfig` reads and writes Hugging Face `config.json` so a converted model can be handed back to
PyTorch unchanged. Anything we cannot reproduce exactly is rejected with an error naming the field,
rather than silently approximated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

PoolingMode = Literal["cls", "mean", "max"]
POOLING_MODES: tuple[str, ...] = ("cls", "mean", "max")

# Activation names as Hugging Face spells them -> whether we implement them exactly.
# "gelu" in HF is the exact erf GELU; jax.nn.gelu defaults to the tanh approximation.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class ConfigError(ValueError):
    """A config file asks for something sbert-flax does not support; the message names the field."""


class WeightsError(ValueError):
    """A checkpoint does not match what the config says; the message names the file/key."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT encoder hyper-parameters (the subset of HF `BertConfig` that changes the maths)."""

    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # How it is computed, not what it is (never written to config.json): recompute each layer's
    # activations in the backward pass instead of keeping them (training memory O(1 layer)).
    remat: bool = False
    # Run the layers as one `lax.scan` over their stacked params: the layer is traced and compiled
    # once, so compile time does not grow with depth (never written to config.json either).
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{SUPPORTED_ACTIVATIONS}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> BertConfig:
        """Builds a config from a HF `config.json` dict, rejecting non-BERT architectures."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; sbert-flax implements "
                "BERT ('bert') encoders only"
            )
        archs = d.get("architectures") or []
        bad = [a for a in archs if not a.startswith("Bert")]
        if bad:
            raise ConfigError(f"{source}: architectures={archs!r}: only Bert* architectures are supported")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ConfigError(
                f"{source}: position_embedding_type={pet!r} is not supported (only 'absolute')"
            )
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError(f"{source}: is_decoder/add_cross_attention: decoders are not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in fields if k in d and d[k] is not None}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BertConfig:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that `transformers.BertModel` loads to the same architecture."""
        d = dataclasses.asdict(self)
        d.pop("remat")
        d.pop("scan_layers")
        d.update(
            architectures=["BertModel"],
            model_type="bert",
            position_embedding_type="absolute",
            classifier_dropout=None,
            use_cache=True,
            torch_dtype="float32",
        )
        return d


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """How token states become one sentence vector (sentence-transformers' Pooling + Normalize)."""

    mode: PoolingMode = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ConfigError(f"pooling mode {self.mode!r} is not one of {POOLING_MODES}")

    @classmethod
    def from_st_dict(cls, d: dict[str, Any], normalize: bool = False,
                     source: str = "1_Pooling/config.json") -> PoolingConfig:
        """Reads sentence-transformers' `1_Pooling/config.json` (legacy booleans or, as
        sentence-transformers >= 6 writes it, `"pooling_mode": "mean"` or a list of modes)."""
        if "pooling_mode" in d:
            # The >= 6 format: without this branch every folder that sentence-transformers 6
            # saves was rejected with "found none".
            pm = d["pooling_mode"]
            names = [pm] if isinstance(pm, str) else list(pm or [])
            modes = [m for m in names if m in POOLING_MODES]
            unsupported = [m for m in names if m not in POOLING_MODES]
        else:
            modes = [m for m, key in (("cls", "pooling_mode_cls_token"),
                                      ("mean", "pooling_mode_mean_tokens"),
                                      ("max", "pooling_mode_max_tokens")) if d.get(key)]
            unsupported = [k for k in ("pooling_mode_mean_sqrt_len_tokens",
                                       "pooling_mode_weightedmean_tokens",
                                       "pooling_mode_lasttoken") if d.get(k)]
        if unsupported or len(modes) != 1:
            raise ConfigError(
                f"{source}: exactly one of cls/mean/max pooling must be enabled "
                f"(found {modes or 'none'}{', unsupported ' + str(unsupported) if unsupported else ''})"
            )
        return cls(mode=modes[0], normalize=normalize)  # type: ignore[arg-type]

    def to_st_dict(self, dim: int) -> dict[str, Any]:
        return {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": self.mode == "cls",
            "pooling_mode_mean_tokens": self.mode == "mean",
            "pooling_mode_max_tokens": self.mode == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        }


def pooling_from_uer(name: str) -> PoolingMode:
    """UER-py's sbert config names pooling "first"/"mean"/"max"/"last"; map to ours."""
    table = {"first": "cls", "mean": "mean", "max": "max", "cls": "cls"}
    if name not in table:
        raise ConfigError(f"UER pooling {name!r} is not supported; expected first/mean/max")
    return table[name]  # type: ignore[return-value]
