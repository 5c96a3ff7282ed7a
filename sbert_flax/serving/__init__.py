"""`sbert-flax serve`: an embedding server with dynamic batching, TEI- and OpenAI-compatible.

`create_app(encoder, settings)` returns the FastAPI app for embedding in an application; the
`serve` CLI runs it on uvicorn.

The names are resolved on first use (PEP 562): the main CLI imports `sbert_flax.cli.serve`
for the `serve` options, and that must work in an install without the serve extra (FastAPI,
uvicorn), which only `create_app` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sbert_flax.serving.app import create_app
    from sbert_flax.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]

_WHERE = {"create_app": "sbert_flax.serving.app", "ServeSettings": "sbert_flax.serving.settings"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
