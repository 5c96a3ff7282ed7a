"""`sbert-flax serve`: an embedding server with dynamic batching, TEI- and OpenAI-compatible.

`create_app(encoder, settings)` returns the FastAPI app for embedding in an application; the
`serve` CLI runs it on uvicorn.
"""

from sbert_flax.serving.app import create_app
from sbert_flax.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
