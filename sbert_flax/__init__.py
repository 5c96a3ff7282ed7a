"""sbert-flax: Chinese Sentence-BERT (uer/sbert-base-chinese-nli) in JAX / Flax NNX.

The public names load on first use (PEP 562), so `import sbert_flax` and the CLI's `--help` do
not import JAX; `from sbert_flax import SentenceEncoder` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "BertConfig": "sbert_flax.models.config",
    "PoolingConfig": "sbert_flax.models.config",
    "SentenceEmbedder": "sbert_flax.models.embedder",
    "SentenceEncoder": "sbert_flax.inference.encoder",
    "CrossEncoder": "sbert_flax.inference.cross_encoder",
    "enable_compilation_cache": "sbert_flax.inference.encoder",
    "DEFAULT_MODEL": "sbert_flax.checkpoints.hub",
    "LoadedModel": "sbert_flax.checkpoints.loading",
    "load_model": "sbert_flax.checkpoints.loading",
    "BertModel": "sbert_flax.models.bert",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from sbert_flax.checkpoints.hub import DEFAULT_MODEL  # noqa: F401
    from sbert_flax.checkpoints.loading import LoadedModel, load_model  # noqa: F401
    from sbert_flax.inference.cross_encoder import CrossEncoder  # noqa: F401
    from sbert_flax.inference.encoder import SentenceEncoder, enable_compilation_cache  # noqa: F401
    from sbert_flax.models.bert import BertModel  # noqa: F401
    from sbert_flax.models.config import BertConfig, PoolingConfig  # noqa: F401
    from sbert_flax.models.embedder import SentenceEmbedder  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sbert_flax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
