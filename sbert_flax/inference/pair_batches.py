"""Sentence pairs on the host: tokenized as `[CLS] a [SEP] b [SEP]`, then packed or padded.

Tokenizing is the model's own HF fast tokenizer on pairs, configured as sentence-transformers'
`CrossEncoder` calls it (`truncation="longest_first"` to the pair length: the longer text loses
tokens first), so ids and token types are the ones it feeds its model. The texts are not stripped
or lowercased beyond what the tokenizer does: sentence-transformers passes pairs as given.

Packing reuses `packing.Packer` unchanged: a pair is one sequence whose token types ride along in
its ids (`id * 2 + type`, split again after packing), so the pairs' layout is exactly what the
packer gives their lengths and every packed shape is one `Packer.shapes()` lists.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Sequence

import numpy as np
import tokenizers

from sbert_flax.inference.packing import PackedBatch, Packer
from sbert_flax.models.tokenization import TokenIds, Tokenizer

Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class PairIds:
    """The ids and token types of n pairs in flat buffers (`TokenIds` layout, shared offsets).

    Attributes:
      ids: the token ids, pair i being `ids[i]` (`[CLS] a [SEP] b [SEP]`).
      token_types: int32, 0 for `[CLS] a [SEP]`, 1 for `b [SEP]`; same offsets as `ids`.
    """

    ids: TokenIds
    token_types: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.ids.lengths


@dataclasses.dataclass(frozen=True)
class PackedPairBatch(PackedBatch):
    """A `PackedBatch` of pairs plus their token types (int32 [rows, length], 0 on padding)."""

    token_types: np.ndarray


def check_pairs(pairs: Sequence, start: int = 0) -> list[Pair]:
    """The pairs as (str, str) tuples; anything else is an error naming its index."""
    out = []
    for j, p in enumerate(pairs):
        if isinstance(p, str) or not isinstance(p, (list, tuple)) or len(p) != 2 \
                or not all(isinstance(t, str) for t in p):
            raise TypeError(f"pairs[{start + j}] is {p!r:.80}; expected a pair of two strings "
                            "(text_a, text_b)")
        out.append((p[0], p[1]))
    return out


class PairEncoder:
    """Pairs -> `PairIds` with the HF fast tokenizer's Rust backend, safe from several threads.

    One copy of the backend per pair length, configured once (as `tokenization.Tokenizer` keeps
    one per length): `encode_batch` on a configured backend is safe from several threads, while
    the HF tokenizer's `__call__` reconfigures its shared backend on every call.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_id
        self._spec = tokenizer.hf.backend_tokenizer.to_str()
        self._backends: dict[int, tokenizers.Tokenizer] = {}
        self._lock = threading.Lock()

    def _backend(self, max_length: int, truncate: bool = True,
                 direction: str = "right") -> tokenizers.Tokenizer:
        key = (max_length, truncate, direction if truncate else "right")
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = tokenizers.Tokenizer.from_str(self._spec)
                backend.no_padding()
                if truncate:
                    # What PreTrainedTokenizerFast sets for truncation="longest_first" (stride 0),
                    # and TEI's `TruncationParams` (with its truncation_direction).
                    backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                              direction=key[2])
                else:
                    backend.no_truncation()
                self._backends[key] = backend
            return backend

    def encodings(self, items: Sequence[tuple[str, str | None]], max_length: int, *,
                  truncate: bool = True, direction: str = "right") -> list[tokenizers.Encoding]:
        """The Rust encodings of `items`: `[CLS] a [SEP] b [SEP]` for a pair, `[CLS] a [SEP]` for
        (a, None) (one text, as TEI's /predict takes it); cut longest-first from `direction` to
        `max_length` tokens, or left whole when `truncate` is False (the caller checks lengths).

        Raises:
          ValueError: `direction` is not "right" or "left", or `max_length` < 3.
        """
        if direction not in ("right", "left"):
            raise ValueError(f"direction={direction!r}; expected 'right' or 'left'")
        if max_length < 3:
            raise ValueError(f"max_length={max_length}: a pair needs at least 3 tokens")
        batch = [a if b is None else (a, b) for a, b in items]
        return self._backend(int(max_length), truncate, direction).encode_batch(
            batch, add_special_tokens=True)

    def encode(self, pairs: Sequence[Pair], max_length: int) -> PairIds:
        """Token ids and types of `pairs` (each at most `max_length` tokens)."""
        enc = self.encodings(pairs, max_length)
        offsets = np.zeros(len(enc) + 1, np.int64)
        np.cumsum(np.fromiter((len(e.ids) for e in enc), np.int64, len(enc)), out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in enc), np.int32, total)
        types = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in enc), np.int32, total)
        return PairIds(TokenIds(flat, offsets), types)


def pack_pairs(packer: Packer, pairs: PairIds, pad_id: int = 0,
               index: np.ndarray | None = None) -> list[PackedPairBatch]:
    """Packs pairs into `packer`'s fixed shapes, several per row, longest first.

    Args:
      packer: the shapes (its `max_seq_length` bounds a pair's tokens).
      pairs: `PairEncoder.encode` output.
      pad_id: the padding token's id.
      index: the caller's index of each pair (default 0..n-1).
    """
    types = pairs.token_types
    if types.size and (types.min() < 0 or types.max() > 1):
        raise ValueError(f"token types must be 0 or 1 for pair packing, got {sorted(set(types))[:5]}")
    # The types ride in the ids' low bit: packing moves whole tokens, so they move together.
    joined = TokenIds(pairs.ids.flat * 2 + types, pairs.ids.offsets)
    out = []
    for b in packer.pack(joined, index=index, pad_id=pad_id * 2):
        fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(PackedBatch)}
        fields["ids"] = b.ids >> 1
        out.append(PackedPairBatch(**fields, token_types=b.ids & 1))
    return out


def pad_pairs(pairs: PairIds, length: int, batch: int, pad_id: int = 0
              ) -> dict[str, np.ndarray]:
    """One pair per row, right-padded to [batch, length] ("ids", "token_types", "mask", int32);
    rows past the pairs are all padding (what `SequenceClassifier.__call__` takes)."""
    n = len(pairs)
    if n > batch:
        raise ValueError(f"{n} pairs do not fit a batch of {batch} rows")
    lens = pairs.lengths
    if n and lens.max() > length:
        i = int(np.argmax(lens))
        raise ValueError(f"pair {i} has {int(lens[i])} tokens, more than the row length {length}")
    ids = np.full((batch, length), pad_id, np.int32)
    types = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i in range(n):
        a, b = pairs.ids.offsets[i], pairs.ids.offsets[i + 1]
        ids[i, :b - a] = pairs.ids.flat[a:b]
        types[i, :b - a] = pairs.token_types[a:b]
        mask[i, :b - a] = 1
    return {"ids": ids, "token_types": types, "mask": mask}
