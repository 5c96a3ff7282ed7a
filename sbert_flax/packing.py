"""Sequence packing under a token budget: many sentences per row, a few fixed (rows, length) shapes.

Chinese sentences are short (STS-B-zh: median 16 tokens) and their lengths vary, so padding each
sentence to a bucket wastes 10-15% of the token slots (and each bucket length is one more compiled
shape). Packing puts several sentences into one row of a few fixed lengths (64, 128, 256, 512);
attention is block-diagonal (a sentence sees only itself) and position ids restart at each
sentence, so every sentence embeds as if it were alone. With first-fit-decreasing over a window of
sentences the rows are ~97% full.

Shapes: a batch of rows of length L has `max_batch_tokens // L` rows (a multiple of the device
count), so every full batch costs about the same; the last batch of a window shrinks to the next
power of two of the rows it needs. The shape set is therefore small, fixed and known in advance
(`Packer.shapes()`), which is what a server compiles at start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Packed row lengths (tokens). Rows shorter than 64 leave too little room to pack into; longer
# ones exist for long sentences (a row is at least as long as its longest sentence).
ROW_LENGTHS = (64, 128, 256, 512)
# Most sentences one row may hold is length // SLOT_TOKENS: it sizes the per-row pooled output
# [rows, slots, D]; a row of short sentences that would hold more simply stays less full.
SLOT_TOKENS = 4


def row_lengths(max_seq_length: int, lengths: Sequence[int] = ROW_LENGTHS) -> tuple[int, ...]:
    """The row lengths below `max_seq_length`, then `max_seq_length` itself."""
    return (*sorted(x for x in set(lengths) if x < max_seq_length), int(max_seq_length))


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One device batch of packed rows.

    Attributes:
      ids, segments, positions: int32 [rows, length]; `segments` is k (1-based) for the row's
        k-th sentence and 0 for padding.
      index: int64 [n], the caller's index of each sentence in the batch.
      row, slot, start, length: int32 [n], where each sentence sits: row, 0-based slot, first
        token, token count.
    """

    ids: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    index: np.ndarray
    row: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    length: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape  # type: ignore[return-value]

    @property
    def real_tokens(self) -> int:
        return int(self.length.sum())


@dataclasses.dataclass(frozen=True)
class Packer:
    """Packs token-id sequences into batches of fixed shapes.

    Attributes:
      max_batch_tokens: rows x length of a full batch (the token budget).
      max_seq_length: the longest sequence (sequences are truncated before packing).
      row_multiple: rows are a multiple of this (the device count: rows are split over devices).
      lengths: candidate row lengths; `max_seq_length` is always one.
    """

    max_batch_tokens: int
    max_seq_length: int
    row_multiple: int = 1
    lengths: tuple[int, ...] = ROW_LENGTHS

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.row_multiple < 1:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} and row_multiple="
                             f"{self.row_multiple} must be >= 1")

    @property
    def row_lengths(self) -> tuple[int, ...]:
        return row_lengths(self.max_seq_length, self.lengths)

    def full_rows(self, length: int) -> int:
        m = self.row_multiple
        return max(m, self.max_batch_tokens // length // m * m)

    def row_options(self, length: int) -> tuple[int, ...]:
        """Row counts a batch of this length may have: powers of two (x row_multiple), then full."""
        full, m = self.full_rows(length), self.row_multiple
        out, r = [], m
        while r < full:
            out.append(r)
            r *= 2
        return (*out, full)

    @staticmethod
    def slots(length: int) -> int:
        return max(1, length // SLOT_TOKENS)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) shape `pack` can produce."""
        return [(r, n) for n in self.row_lengths for r in self.row_options(n)]

    def pack(self, seqs: Sequence[np.ndarray], index: np.ndarray | None = None,
             pad_id: int = 0) -> list[PackedBatch]:
        """Packs `seqs` (each at most max_seq_length long) into batches, longest first.

        Each row is filled first-fit-decreasing: it takes the longest sentence left, then the
        longest that still fits, until nothing fits or it holds `slots(length)` sentences.
        """
        n = len(seqs)
        index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        lens = np.fromiter((len(s) for s in seqs), np.int64, n)
        if n and (lens.min() < 1 or lens.max() > self.max_seq_length):
            bad = int(np.argmax((lens < 1) | (lens > self.max_seq_length)))
            raise ValueError(f"sequence {int(index[bad])} has {int(lens[bad])} tokens; packing needs "
                             f"1..{self.max_seq_length}")
        # Pending sentences by length, each list reversed so that pop() takes them in input order.
        pending: list[list[int]] = [[] for _ in range(self.max_seq_length + 1)]
        for i in range(n - 1, -1, -1):
            pending[int(lens[i])].append(i)
        longest, left = (int(lens.max()) if n else 0), n
        batches = []
        lengths = self.row_lengths
        while left:
            while not pending[longest]:
                longest -= 1
            length = next(x for x in lengths if x >= longest)
            full, slots = self.full_rows(length), self.slots(length)
            rows: list[list[int]] = []
            while len(rows) < full and left:
                row, free, top = [], length, min(longest, length)
                while len(row) < slots:
                    top = min(top, free)
                    while top > 0 and not pending[top]:
                        top -= 1
                    if top == 0:
                        break
                    i = pending[top].pop()
                    row.append(i)
                    free -= top
                    left -= 1
                rows.append(row)
                while longest > 0 and not pending[longest]:
                    longest -= 1
            num_rows = next(r for r in self.row_options(length) if r >= len(rows))
            batches.append(self._arrays(rows, num_rows, length, seqs, lens, index, pad_id))
        return batches

    @staticmethod
    def _arrays(rows: list[list[int]], num_rows: int, length: int, seqs: Sequence[np.ndarray],
                lens: np.ndarray, index: np.ndarray, pad_id: int) -> PackedBatch:
        ids = np.full((num_rows, length), pad_id, np.int32)
        segments = np.zeros((num_rows, length), np.int32)
        positions = np.zeros((num_rows, length), np.int32)
        count = sum(len(r) for r in rows)
        where = np.zeros((4, count), np.int32)
        order = np.zeros(count, np.int64)
        k = 0
        for r, row in enumerate(rows):
            off = 0
            for slot, i in enumerate(row):
                m = int(lens[i])
                ids[r, off:off + m] = seqs[i]
                segments[r, off:off + m] = slot + 1
                positions[r, off:off + m] = np.arange(m, dtype=np.int32)
                where[:, k] = (r, slot, off, m)
                order[k] = index[i]
                off += m
                k += 1
        return PackedBatch(ids, segments, positions, order, *where)
