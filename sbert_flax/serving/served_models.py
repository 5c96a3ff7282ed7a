"""The batcher's one backend for a server with an embedder, a cross-encoder, or both.

`ServedModels` routes each round by its output: "score" rounds (/rerank, /predict) to the
cross-encoder's `RerankBackend`, "sentence" / "token" rounds to the embedder's `EncoderBackend`;
the routes ask it which models there are (`serves_embeddings`, `reranker`). A server with an
embedder only keeps its `EncoderBackend` as the backend, unchanged (`serving_backend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sbert_flax.serving.backend import EncoderBackend, Launched
from sbert_flax.serving.rerank_backend import RerankBackend

__all__ = ["ServedModels", "is_cross_encoder", "serving_backend"]


class ServedModels:
    """The batcher's backend for a server with a cross-encoder: the embedder (or None) for
    "sentence" and "token" rounds, the cross-encoder for "score" rounds.

    What the embedding routes and /info read (`dim`, `pooling`, `encoder`, ...) is the
    embedder's; tokenizer routes and limits are the embedder's when there is one (the primary
    model), else the cross-encoder's.

    Args:
      embedder: an `EncoderBackend`, or None (`serve --model R`, R a cross-encoder).
      reranker: a `RerankBackend`.
    """

    def __init__(self, embedder: EncoderBackend | None, reranker: RerankBackend):
        self.embedder = embedder
        self.reranker = reranker
        self.primary = embedder if embedder is not None else reranker

    @property
    def serves_embeddings(self) -> bool:
        return self.embedder is not None

    # ---- the primary model's facts (the embedding routes run only with an embedder) ------------

    @property
    def dim(self) -> int | None:
        return None if self.embedder is None else self.embedder.dim

    @property
    def pooling(self) -> str | None:
        return None if self.embedder is None else self.embedder.pooling

    @property
    def encoder(self):
        return None if self.embedder is None else getattr(self.embedder, "encoder", None)

    @property
    def token_output(self) -> bool:
        return self.embedder is not None and self.embedder.token_output

    @property
    def max_seq_length(self) -> int:
        return self.primary.max_seq_length

    @property
    def max_batch_tokens(self) -> int:
        return self.primary.max_batch_tokens

    @property
    def dtype(self) -> str:
        return self.primary.dtype

    @property
    def num_labels(self) -> int:
        return self.reranker.num_labels

    @property
    def num_compiles(self) -> int:
        return sum(b.num_compiles for b in (self.embedder, self.reranker) if b is not None)

    def tokenize(self, texts: Sequence[str], *, truncate: bool, direction: str) -> list:
        return self.primary.tokenize(texts, truncate=truncate, direction=direction)

    def tokens(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[dict]]:
        return self.primary.tokens(texts, add_special_tokens)

    def rust_tokenizer(self):
        return self.primary.rust_tokenizer()

    # ---- work ---------------------------------------------------------------------------------

    def _embedder(self) -> EncoderBackend:
        if self.embedder is None:  # the routes refuse embedding requests before this
            raise RuntimeError("this server has no embedding model")
        return self.embedder

    def embed_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        return self._embedder().embed_ids(ids)

    def embed_tokens(self, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._embedder().embed_tokens(ids)

    def launch(self, ids: Sequence, output: str = "sentence") -> Launched:
        if output == "score":
            return self.reranker.launch(ids)
        return self._embedder().launch(ids, output)

    def warmup(self) -> int:
        return sum(b.warmup() for b in (self.embedder, self.reranker) if b is not None)

    def test_round(self, warmup_ids: Sequence) -> None:
        """The batcher's end-to-end test batch, for each model."""
        if self.embedder is not None:
            emb = self.embedder.embed_ids(warmup_ids)
            if emb.shape != (1, self.embedder.dim) or not np.isfinite(emb).all():
                raise RuntimeError(f"warm-up batch returned {emb.shape}, "
                                   f"finite={np.isfinite(emb).all()}")
        self.reranker.test_round()


def is_cross_encoder(obj) -> bool:
    """`obj` is a loaded cross-encoder (or its backend), not a sentence encoder."""
    if isinstance(obj, RerankBackend):
        return True
    if isinstance(obj, EncoderBackend):
        return False
    from sbert_flax.inference.cross_encoder import CrossEncoder

    return isinstance(obj, CrossEncoder)


def serving_backend(encoder, reranker=None):
    """The batcher's backend for `create_app(encoder, settings, reranker)`.

    Args:
      encoder: a `SentenceEncoder` (or an `EncoderBackend`); a `CrossEncoder` here with no
        `reranker` is served alone, as a reranker / classifier; None with a `reranker`.
      reranker: a `CrossEncoder` (or a `RerankBackend`) for /rerank and /predict, or None.

    Returns:
      The `EncoderBackend` alone when there is no cross-encoder (the embedding server as ever),
      else a `ServedModels`.
    """
    if reranker is None and encoder is not None and is_cross_encoder(encoder):
        encoder, reranker = None, encoder
    if encoder is not None and is_cross_encoder(encoder):
        raise TypeError("the embedding model is a cross-encoder; pass it as `reranker`")
    embedder = None if encoder is None else (
        encoder if isinstance(encoder, EncoderBackend) else EncoderBackend(encoder))
    if reranker is None:
        if embedder is None:
            raise ValueError("no model to serve: pass an embedding model, a cross-encoder or both")
        return embedder
    rerank = reranker if isinstance(reranker, RerankBackend) else RerankBackend(reranker)
    return ServedModels(embedder, rerank)
