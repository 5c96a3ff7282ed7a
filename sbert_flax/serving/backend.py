"""The one place the server touches the encoder: tokenize, embed token ids, warm up, count compiles.

`SentenceEncoder`'s token-budget API (`tokenize` / `embed_ids` / `warmup` / `num_compiles` /
`max_batch_tokens`) behind the few names the batcher and routes use, so a different engine (or a
fake, in tests) slots in here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sbert_flax.encoder import InputTooLong

__all__ = ["EncoderBackend", "InputTooLong"]


class EncoderBackend:
    """Adapts a `SentenceEncoder` to what the batcher and routes call.

    Args:
      encoder: a loaded `SentenceEncoder`.
    """

    def __init__(self, encoder):
        self.encoder = encoder

    # ---- what the model is --------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    @property
    def max_seq_length(self) -> int:
        return int(self.encoder.max_seq_length)

    @property
    def max_batch_tokens(self) -> int:
        return int(self.encoder.max_batch_tokens)

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
        return int(self.encoder.num_compiles)

    # ---- work ---------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], *, truncate: bool, direction: str) -> list[np.ndarray]:
        """Token ids with [CLS]/[SEP] per text.

        Raises:
          InputTooLong: `truncate` is False and a text has more than `max_seq_length` tokens.
        """
        return self.encoder.tokenize(texts, truncate=truncate, direction=direction)

    def embed_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [len(ids), dim] embeddings (the model's own Normalize applies). Blocking."""
        return np.asarray(self.encoder.embed_ids(list(ids), normalize=False), np.float32)

    def warmup(self) -> int:
        """Compiles every shape the batcher can produce; returns how many."""
        return int(self.encoder.warmup())
