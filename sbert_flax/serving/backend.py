"""The one place the server touches the encoder: tokenize, embed token ids, warm up, count compiles.

`SentenceEncoder`'s token-budget API (`tokenize` / `embed_ids` / `warmup` / `num_compiles` /
`max_batch_tokens`) behind the few names the batcher and routes use, so a different engine (or a
fake, in tests) slots in here.
"""

from __future__ import annotations

import threading
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
        self._lock = threading.Lock()
        self._tokens = None  # (Rust tokenizer, special ids) for `tokens`, built on first use

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

    def tokens(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[dict]]:
        """TEI's /tokenize answer: per text, each token's id, text, special flag and character span.

        Safe from several threads at once: it runs a Rust tokenizer of its own, set up once (the
        HF tokenizer object sets truncation and padding on its backend at every call, so two
        threads calling it at once fail with "Already borrowed").
        """
        backend, special = self._token_backend()
        if self.lowercase_text:  # the tokens the model really sees
            texts = [t.lower() for t in texts]
        out = []
        for text, enc in zip(texts, backend.encode_batch(list(texts),
                                                        add_special_tokens=add_special_tokens),
                             strict=True):
            row = []
            for tid, piece, (start, stop) in zip(enc.ids, enc.tokens, enc.offsets, strict=True):
                is_special = tid in special and start == stop
                row.append({"id": int(tid), "text": piece if is_special else text[start:stop],
                            "special": is_special, "start": None if is_special else start,
                            "stop": None if is_special else stop})
            out.append(row)
        return out

    def _token_backend(self):
        with self._lock:
            if self._tokens is None:
                import tokenizers

                hf = self.hf_tokenizer
                backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
                backend.no_truncation()
                backend.no_padding()
                self._tokens = backend, frozenset(hf.all_special_ids)
            return self._tokens

    def embed_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [len(ids), dim] embeddings (the model's own Normalize applies). Blocking."""
        return np.asarray(self.encoder.embed_ids(list(ids), normalize=False), np.float32)

    def warmup(self) -> int:
        """Compiles every shape the batcher can produce; returns how many."""
        return int(self.encoder.warmup())
