"""The one place the server touches the encoder: tokenize, embed token ids, warm up, count compiles.

`SentenceEncoder`'s token-budget API (`tokenize` / `embed_ids` / `warmup` / `num_compiles` /
`max_batch_tokens`) behind the few names the batcher and routes use, so a different engine (or a
fake, in tests) slots in here.

`launch` is the batcher's non-blocking half of `embed_ids` (and of `embed_tokens`, /embed_all's
per-token output): it packs a round of inputs and dispatches it (JAX dispatch is asynchronous), so
the worker can take and pack the next round while this one computes; `Launched.result` blocks for
the rows. A round's packed batch is cut to the rows it fills (`trim_rows`): a server round is one
small window, and padding its rows up to the next power of two (the packer's shapes) wasted ~30%
of the compute of a typical round.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from sbert_flax.inference.encoder import InputTooLong
from sbert_flax.inference.packing import PackedBatch, Packer

__all__ = ["EncoderBackend", "InputTooLong", "Launched", "trim_rows"]


class Launched:
    """One round's device work, dispatched; `result()` blocks for its float32 [n, dim] rows
    (`output="token"`: a list of n float32 [len_i, dim] token embeddings).

    Args:
      n, dim: the round's inputs and the embedding width.
      parts: (packed batch, its device result: [rows, slots, dim], or [rows, length, dim] for
        tokens) pairs.
      rows: the finished rows instead (a backend with only a blocking `embed_ids`).
      output: "sentence" or "token".
    """

    def __init__(self, n: int, dim: int, parts: Sequence[tuple[PackedBatch, object]] = (),
                 rows=None, output: str = "sentence"):
        self.n, self.dim, self.parts, self._rows, self.output = n, dim, list(parts), rows, output

    @classmethod
    def done(cls, rows: np.ndarray) -> Launched:
        return cls(len(rows), rows.shape[1] if rows.ndim == 2 else 0, rows=rows)

    @classmethod
    def done_tokens(cls, rows: Sequence[np.ndarray], dim: int) -> Launched:
        return cls(len(rows), dim, rows=list(rows), output="token")

    def result(self):
        if self._rows is None:
            self._rows = self._tokens() if self.output == "token" else self._sentences()
            self.parts = []
        return self._rows

    def _sentences(self) -> np.ndarray:
        out = np.zeros((self.n, self.dim), np.float32)
        for batch, res in self.parts:
            out[batch.index] = np.asarray(res)[batch.row, batch.slot]
        return out

    def _tokens(self) -> list[np.ndarray]:
        # Each input's tokens are the span it was packed into: `encode(output="token")`'s rows.
        out: list = [None] * self.n
        for batch, res in self.parts:
            res = np.asarray(res)
            for j, i in enumerate(batch.index):
                s, m = batch.start[j], batch.length[j]
                out[i] = np.asarray(res[batch.row[j], s:s + m], np.float32)
        return out


def trim_rows(batch: PackedBatch, packer: Packer) -> list[PackedBatch]:
    """`batch` without its all-padding rows: the rows it fills, as packer shapes.

    The packer pads a batch's rows up to the next power of two (x the device count), which costs
    nothing in a long encode (only each window's last batch is short) but up to half the compute
    of a server round, which is one short window. The filled rows are cut into power-of-two
    parts, largest first (41 rows: 32 + 8 + 1), each a shape `warmup` compiled; every sentence
    keeps its own row, so its embedding is the one the whole batch would give.
    """
    rows, length = batch.shape
    m = packer.row_multiple
    used = int(batch.row.max()) + 1 if len(batch.row) else 0
    units = -(-used // m)  # row groups (one row per device) the sentences fill
    options = packer.row_options(length)
    if units * m >= rows or units == 0:
        return [batch]
    sizes = [m << k for k in reversed(range(units.bit_length())) if units >> k & 1]
    if any(size not in options for size in sizes):  # not a shape the packer makes: keep it whole
        return [batch]
    parts, first = [], 0
    for size in sizes:
        keep = (batch.row >= first) & (batch.row < first + size)
        parts.append(PackedBatch(
            batch.ids[first:first + size], batch.segments[first:first + size],
            batch.positions[first:first + size], batch.index[keep], batch.row[keep] - first,
            batch.slot[keep], batch.start[keep], batch.length[keep]))
        first += size
    return parts


class EncoderBackend:
    """Adapts a `SentenceEncoder` to what the batcher and routes call.

    Args:
      encoder: a loaded `SentenceEncoder`.
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self._lock = threading.Lock()
        self._rust = None  # `rust_tokenizer()`'s answer, built on first use

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

    @property
    def token_output(self) -> bool:
        """The backend gives each token's hidden state (/embed_all): an encoder is behind it."""
        return getattr(self, "encoder", None) is not None

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
        backend, special, _ = self.rust_tokenizer()
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

    def rust_tokenizer(self):
        """(a Rust tokenizer of this backend's own, the special token ids, the vocabulary size),
        built once; None for a backend without an HF tokenizer (a fake in tests).

        The one copy /tokenize, /decode and the token-id checks share, safe from several threads
        at once: the HF tokenizer object sets truncation and padding on its backend at every
        call, so two threads calling it at once fail with "Already borrowed". This copy never
        truncates or pads, and nothing changes it after it is built.
        """
        hf = getattr(self, "hf_tokenizer", None)
        if hf is None:
            return None
        with self._lock:
            if self._rust is None:
                import tokenizers

                backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
                backend.no_truncation()
                backend.no_padding()
                self._rust = backend, frozenset(hf.all_special_ids), len(hf)
            return self._rust

    def embed_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [len(ids), dim] embeddings (the model's own Normalize applies). Blocking."""
        return np.asarray(self.encoder.embed_ids(list(ids), normalize=False), np.float32)

    def embed_tokens(self, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each input's token embeddings, float32 [len_i, dim] (`encode(output="token")` for
        token ids). Blocking."""
        if not self.token_output:  # a fake without an override: no tokens to give
            raise NotImplementedError(f"{type(self).__name__} has no token-level output")
        return self.launch(ids, "token").result()

    def launch(self, ids: Sequence[np.ndarray], output: str = "sentence") -> Launched:
        """Packs `ids` and dispatches them without waiting; `.result()` gives `embed_ids`' rows
        (`output="token"`: `embed_tokens`').

        A backend with no encoder behind it (a fake with its own `embed_ids` / `embed_tokens`)
        runs those here, blocking. The token program is compiled on its first round (the
        warm-up compiles the sentence program's shapes, which every request needs).
        """
        encoder = getattr(self, "encoder", None)
        if encoder is None:
            if output == "token":
                return Launched.done_tokens(self.embed_tokens(ids), self.dim)
            return Launched.done(np.asarray(self.embed_ids(ids)))
        packer = encoder.packer()
        parts = []
        for batch in packer.pack(list(ids), pad_id=encoder.tokenizer.pad_id):
            for part in trim_rows(batch, packer):
                parts.append((part, encoder._dispatch(part, encoder.dtype, output)))
        return Launched(len(ids), self.dim, parts, output=output)

    def warmup(self) -> int:
        """Compiles every shape the batcher can produce; returns how many."""
        return int(self.encoder.warmup())
