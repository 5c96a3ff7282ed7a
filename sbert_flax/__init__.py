"""sbert-flax: Chinese Sentence-BERT (uer/sbert-base-chinese-nli) in JAX / Flax NNX.

The public names load on first use (PEP 562), so `import sbert_flax` and the CLI's `--help` do
not import JAX; `from sbert_flax import SentenceEncoder` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "BertConfig": "sbert_flax.config",
    "PoolingConfig": "sbert_flax.config",
    "SentenceEmbedder": "sbert_flax.embedder",
    "SentenceEncoder": "sbert_flax.encoder",
    "enable_compilation_cache": "sbert_flax.encoder",
    "DEFAULT_MODEL": "sbert_flax.hub",
    "LoadedModel": "sbert_flax.loading",
    "load_model": "sbert_flax.loading",
    "BertModel": "sbert_flax.model",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from sbert_flax.config import BertConfig, PoolingConfig  # noqa: F401
    from sbert_flax.embedder import SentenceEmbedder  # noqa: F401
    from sbert_flax.encoder import SentenceEncoder, enable_compilation_cache  # noqa: F401
    from sbert_flax.hub import DEFAULT_MODEL  # noqa: F401
    from sbert_flax.loading import LoadedModel, load_model  # noqa: F401
    from sbert_flax.model import BertModel  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sbert_flax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
