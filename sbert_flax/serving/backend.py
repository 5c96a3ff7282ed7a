"""The one place the server touches the encoder: tokenize, embed token ids, warm up, count compiles.

`SentenceEncoder` provides `tokenize` / `embed_ids` / `warmup` / `num_compiles` /
`max_batch_tokens` (the token-budget encode). An encoder without them (an older build) is served
through a small fallback here, so the rest of the server has one interface to code against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

try:
    from sbert_flax.encoder import InputTooLong
except ImportError:  # an encoder build without the token-budget API

    class InputTooLong(ValueError):  # type: ignore[no-redef]
        """An input has more tokens than the model takes and truncation is off."""

        def __init__(self, index: int, length: int, limit: int):
            super().__init__(f"input {index} has {length} tokens, more than the limit of {limit}")
            self.index, self.length, self.limit = index, length, limit


DEFAULT_MAX_BATCH_TOKENS = 16384


class EncoderBackend:
    """Adapts a `SentenceEncoder` to what the batcher and routes call.

    Args:
      encoder: a loaded `SentenceEncoder`.
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self._native = all(hasattr(encoder, n) for n in ("tokenize", "embed_ids", "warmup"))
        self._fallback_traces = 0

    # ---- what the model is --------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    @property
    def max_seq_length(self) -> int:
        return int(self.encoder.max_seq_length)

    @property
    def max_batch_tokens(self) -> int:
        return int(getattr(self.encoder, "max_batch_tokens", None) or DEFAULT_MAX_BATCH_TOKENS)

    @property
    def dtype(self) -> str:
        return str(self.encoder.dtype)

    @property
    def pooling(self) -> str:
        return str(self.encoder.pooling.mode)

    @property
    def hf_tokenizer(self):
        return self.encoder.tokenizer.hf

    @property
    def lowercase_text(self) -> bool:
        """The model lowercases text before its tokenizer (sentence-transformers' do_lower_case)."""
        return bool(getattr(self.encoder.tokenizer, "lowercase_text", False))

    @property
    def num_compiles(self) -> int:
        n = getattr(self.encoder, "num_compiles", None)
        return int(n if n is not None else self.encoder.num_traces)

    # ---- work ---------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], *, truncate: bool, direction: str) -> list[np.ndarray]:
        """Token ids with [CLS]/[SEP] per text.

        Raises:
          InputTooLong: `truncate` is False and a text has more than `max_seq_length` tokens.
        """
        if self._native:
            return self.encoder.tokenize(texts, truncate=truncate, direction=direction)
        return self._tokenize_fallback(texts, truncate, direction)

    def embed_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [len(ids), dim] embeddings (the model's own Normalize applies). Blocking."""
        if self._native:
            return np.asarray(self.encoder.embed_ids(list(ids), normalize=False), np.float32)
        return self._embed_fallback(ids)

    def warmup(self) -> int:
        """Compiles every shape the batcher can produce; returns how many."""
        if self._native:
            return int(self.encoder.warmup())
        return self._warmup_fallback()

    # ---- fallback for encoders without the token-budget API ------------------------------------

    def _tokenize_fallback(self, texts, truncate, direction):
        tok, limit = self.encoder.tokenizer, self.max_seq_length
        # Tokenize with room for one extra token, so "too long" is visible without a full pass.
        ids = tok.encode(list(texts), limit + 1 if not truncate or direction == "right" else 1 << 20)
        out = []
        for i, x in enumerate(ids):
            if len(x) > limit:
                if not truncate:
                    raise InputTooLong(i, len(x), limit)
                x = (np.concatenate([x[:limit - 1], x[-1:]]) if direction == "right"
                     else np.concatenate([x[:1], x[len(x) - limit + 1:]]))
            out.append(np.asarray(x, np.int32))
        return out

    def _shapes(self) -> list[tuple[int, int]]:
        from sbert_flax.tokenization import bucket_lengths

        shapes = []
        for length in bucket_lengths(self.max_seq_length, self.encoder.buckets):
            rows = 1
            while rows * length <= self.max_batch_tokens:
                shapes.append((rows, length))
                rows *= 2
            if rows == 1:
                shapes.append((1, length))
        return shapes

    def _embed_fallback(self, ids):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from sbert_flax.tokenization import pad_batch

        enc = self.encoder
        fn = enc._forward_fn(enc.dtype, enc.pooling.mode, enc.pooling.normalize, "sentence")
        data = NamedSharding(enc.mesh, P("data"))
        shapes = self._shapes()
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self.dim), np.float32)
        start = 0
        while start < len(order):
            length = next(L for _, L in shapes if L >= len(ids[order[start]]))
            fits = [r for r, L in shapes if L == length]
            rows = next((r for r in fits if r >= len(order) - start), fits[-1])
            idx = order[start:start + rows]
            b_ids, b_mask = pad_batch([ids[i] for i in idx], length, rows, enc.tokenizer.pad_id)
            res = fn(enc.params, jax.device_put(b_ids, data), jax.device_put(b_mask, data))
            out[idx] = np.asarray(res)[: len(idx)]
            start += rows
        return out

    def _warmup_fallback(self) -> int:
        for rows, length in self._shapes():
            self._embed_fallback([np.ones(length, np.int32)] * rows)
        return len(self._shapes())
