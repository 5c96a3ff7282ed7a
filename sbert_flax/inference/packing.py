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
import itertools
import math
from collections.abc import Sequence

import numpy as np

from sbert_flax.models.tokenization import TokenIds

# Packed row lengths (tokens). Rows shorter than 64 leave too little room to pack into; longer
# ones exist for long sentences (a row is at least as long as its longest sentence).
ROW_LENGTHS = (64, 128, 256, 512)
# Most sentences one row may hold is length // SLOT_TOKENS: it sizes the per-row pooled output
# [rows, slots, D]; a row of short sentences that would hold more simply stays less full.
SLOT_TOKENS = 4
# Training packs each group into a multiple of this many rows: random batches need a varying
# number of rows, and every row count is one more compiled shape of the train step.
ROW_STEP = 8


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

    def pack(self, seqs: Sequence[np.ndarray] | TokenIds, index: np.ndarray | None = None,
             pad_id: int = 0) -> list[PackedBatch]:
        """Packs `seqs` (each at most max_seq_length long) into batches, longest first.

        Each row is filled first-fit-decreasing: it takes the longest sentence left, then the
        longest that still fits, until nothing fits or it holds `slots(length)` sentences.

        Args:
          seqs: id arrays, or the same as one flat buffer (`Tokenizer.encode_ids`: no copy).
          index: the caller's index of each sequence (default 0..n-1).
          pad_id: id of the padding tokens.
        """
        ids = seqs if isinstance(seqs, TokenIds) else TokenIds.from_arrays(seqs)
        n = len(ids)
        index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        lens = _checked_lengths(ids.lengths, self.max_seq_length, index)
        pending = _Pending(lens)
        batches = []
        lengths = self.row_lengths
        while pending.left:
            length = next(x for x in lengths if x >= pending.longest)
            full, slots = self.full_rows(length), self.slots(length)
            rows: list[list[int]] = []
            while len(rows) < full and pending.left:
                rows.append(pending.fill_row(length, slots))
            num_rows = next(r for r in self.row_options(length) if r >= len(rows))
            batches.append(_arrays(rows, num_rows, length, ids, index, pad_id))
        return batches


def _arrays(rows: list[list[int]], num_rows: int, length: int, ids: TokenIds, index: np.ndarray,
            pad_id: int) -> PackedBatch:
    """The batch whose row r holds the sequences `rows[r]`, left to right (rows are non-empty).

    Vectorised: every token's place is computed at once and the ids are gathered from the flat
    buffer in one call, instead of a few small numpy calls per sentence.
    """
    sizes = np.fromiter(map(len, rows), np.int64, len(rows))  # sentences per row
    count = int(sizes.sum())
    sel = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count)  # in packed order
    first = np.cumsum(sizes) - sizes  # each row's first entry in `sel`
    row = np.repeat(np.arange(len(rows)), sizes)
    slot = np.arange(count) - first[row]
    m = ids.lengths[sel]
    before = np.cumsum(m) - m  # tokens before each sentence, all rows laid end to end
    start = before - before[first][row]  # first token within its row
    token_of = np.repeat(np.arange(count), m)  # [tokens] -> its sentence (entry of `sel`)
    pos = np.arange(int(m.sum())) - before[token_of]  # position within its sentence
    dest = (row * length + start)[token_of] + pos
    shape = (num_rows, length)
    out_ids = np.full(shape, pad_id, np.int32)
    segments = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    out_ids.reshape(-1)[dest] = ids.flat[ids.offsets[sel][token_of] + pos]
    segments.reshape(-1)[dest] = (slot + 1)[token_of]
    positions.reshape(-1)[dest] = pos
    where = np.stack([row, slot, start, m]).astype(np.int32)
    return PackedBatch(out_ids, segments, positions, index[sel], *where)


def _checked_lengths(lens: np.ndarray, max_seq_length: int, index: np.ndarray) -> np.ndarray:
    if len(lens) and (lens.min() < 1 or lens.max() > max_seq_length):
        bad = int(np.argmax((lens < 1) | (lens > max_seq_length)))
        raise ValueError(f"sequence {int(index[bad])} has {int(lens[bad])} tokens; packing needs "
                         f"1..{max_seq_length}")
    return lens


class _Pending:
    """The sentences not packed yet, by length; `fill_row` packs one row first-fit-decreasing:
    the longest sentence left, then the longest that still fits, until nothing fits or the row
    holds `slots` sentences."""

    def __init__(self, lens: np.ndarray):
        # One list per length, reversed so that pop() takes sentences in input order; built
        # from one stable sort rather than a Python loop over the sentences.
        longest = int(lens.max(initial=0))
        order = np.argsort(-lens, kind="stable")[::-1].tolist()  # by length, input order reversed
        counts = np.bincount(lens, minlength=longest + 1).tolist()
        self.by_length: list[list[int]] = []
        end = 0
        for c in counts:
            self.by_length.append(order[end:end + c])
            end += c
        self.longest, self.left = longest, len(lens)

    def fill_row(self, length: int, slots: int) -> list[int]:
        by_length, row, free = self.by_length, [], length
        top = self.longest if self.longest < length else length
        while len(row) < slots:
            if top > free:
                top = free
            while top > 0 and not by_length[top]:
                top -= 1
            if top == 0:
                break
            row.append(by_length[top].pop())
            free -= top
        self.left -= len(row)
        while self.longest > 0 and not by_length[self.longest]:
            self.longest -= 1
        return row


@dataclasses.dataclass(frozen=True)
class TrainPacking:
    """Packs a training batch: every text of every column, in `groups` groups of rows.

    Training embeds each text column of a batch ([B] anchors, [B] positives, ...) and needs a
    fixed [B, D] per column. Packing all of them into rows of `row_length` tokens spends compute
    on real tokens only (random batches of nli-zh pairs at seq_length 64: 36 rows of 64 tokens
    for 2,247 real tokens, against 6,212 token slots when each column pads to its own bucket).
    GradCache embeds a batch in mini-batches: `groups` > 1 packs mini-batch k's texts (texts
    j * groups + k of each column, the rows `_chunk` gives it) into rows of its own, placed at
    global rows r * groups + k, so that chunking the rows the same way hands each mini-batch
    exactly its texts.

    Attributes:
      row_length: tokens per row (>= the longest text).
      groups: mini-batches (1: the whole batch is one group).
      row_multiple: each group's row count is a multiple of this (the devices rows are split
        over, rounded up to ROW_STEP to bound the number of shapes).
    """

    row_length: int
    groups: int = 1
    row_multiple: int = 1

    def rows_per_group(self, needed: int) -> int:
        q = math.lcm(ROW_STEP, self.row_multiple)
        return max(q, -(-needed // q) * q)

    def pack(self, columns: Sequence[Sequence[np.ndarray]], pad_id: int = 0) -> dict[str, np.ndarray]:
        """Packs `columns` (C lists of B token-id arrays, each 1..row_length long).

        Returns:
          "ids", "segments", "positions": int32 [groups * rows, row_length] (see `PackedBatch`);
          "row", "slot": int32 [C, B], the global row and the slot of each text.
        """
        c, b = len(columns), len(columns[0])
        if b % self.groups:
            raise ValueError(f"{b} texts per column do not split into {self.groups} groups")
        slots = Packer.slots(self.row_length)
        flat = TokenIds.from_arrays([x for col in columns for x in col])
        index = np.arange(len(flat), dtype=np.int64)
        lens = _checked_lengths(flat.lengths, self.row_length, index)
        groups = []
        for k in range(self.groups):
            mine = np.array([j * b + i for j in range(c) for i in range(k, b, self.groups)], np.int64)
            pending = _Pending(lens[mine])
            rows = []
            while pending.left:
                rows.append([int(mine[i]) for i in pending.fill_row(self.row_length, slots)])
            groups.append(rows)
        num_rows = self.rows_per_group(max(len(r) for r in groups))
        shape = (self.groups * num_rows, self.row_length)
        out = {"ids": np.full(shape, pad_id, np.int32), "segments": np.zeros(shape, np.int32),
               "positions": np.zeros(shape, np.int32), "row": np.zeros(c * b, np.int32),
               "slot": np.zeros(c * b, np.int32)}
        for k, rows in enumerate(groups):
            # Group k's row r is global row r * groups + k: the rows k::groups.
            part = _arrays(rows, num_rows, self.row_length, flat, index, pad_id)
            for key in ("ids", "segments", "positions"):
                out[key][k::self.groups] = getattr(part, key)
            out["row"][part.index] = part.row * self.groups + k
            out["slot"][part.index] = part.slot
        out["row"], out["slot"] = out["row"].reshape(c, b), out["slot"].reshape(c, b)
        return out
