"""The training input pipeline on grain: a batch plan per epoch, host tokenization, prefetch.

The plan is a pure function of (number of records, seed, epoch): the global batches of record
indices. By default a batch is a random sample of the data (a fresh permutation each epoch, cut
into `global_batch` rows), as PyTorch's samplers draw it; its texts' lengths only decide how it
is packed or padded. `group_by_length` instead cuts each bucket's examples into batches (less
padding, but batches of similar length). `no_duplicates` is sentence-transformers'
NoDuplicatesBatchSampler: no text appears twice in a batch (a duplicate anchor or positive would
be a false in-batch negative).

`grain.MapDataset.range(total_steps).map(BatchBuilder)` turns step k into its batch: read the
global batch's texts by offset, tokenize them on the host, lay them out, and keep this process's
contiguous rows. With `pack` (every loss's default) the texts of all columns are packed into
shared rows (`packing.TrainPacking`: several texts a row, block-diagonal attention). Without it
(`--no_pack`) each text column is padded to the smallest bucket holding that column's longest
text (one bucket for all columns with `joint_length`: the softmax classifier's [a; b]). A
thread pool prefetches ahead of the device; those threads tokenize in parallel
(`Tokenizer.encode` is thread-safe). The iterator state is the next step index, saved in the
orbax checkpoint, so a resumed run continues from exactly the next batch without replaying any.

A partial last batch is padded with weight-0 rows (never dropped, never a new shape): every
example trains once per epoch, as in sentence-transformers (drop_last=False).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sbert_flax.inference.packing import TrainPacking, row_lengths
from sbert_flax.models.tokenization import Tokenizer, bucket_for, bucket_lengths
from sbert_flax.training.sources import DataError, TextSource

# Padded lengths for training, in steps of 16 up to 64 (where short sentences live) and coarser
# above. Random batches make every column's longest text close to the data's long tail, so a
# finer grid mostly trims that tail: on nli-zh pairs at seq_length 64 the per-column buckets of
# this grid cost 6,212 tokens a batch of 64 pairs against 8,192 for one 64-token bucket for both
# columns (sentence-transformers' padding to each column's longest: 5,146), in 5 (anchor,
# positive) shapes seen. Each shape is one compilation of the train step.
TRAIN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384)
# The grid before per-column padding (2026-11-28): a checkpoint that does not record its grid was
# trained with it, which `--group_by_length` resumes must know (it decides the batches).
FIRST_TRAIN_BUCKETS = (32, 64, 128)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How training batches are drawn.

    Attributes:
      global_batch: rows per step across all processes.
      seq_length: max tokens per text incl. [CLS]/[SEP]; the largest bucket.
      seed: data order seed (epoch e shuffles with `default_rng((seed, e))`).
      epochs: passes over the data.
      max_steps: stop after this many steps in all (None: every epoch to the end).
      shuffle: False keeps file order (evaluation-style; tests).
      group_by_length: batches of examples from one length bucket (today's UER-siamese habit).
      no_duplicates: no text twice in a batch (needs the source's `text_hashes`).
      buckets: padded lengths to choose from (capped at seq_length, which is always one).
      joint_length: pad every text column to one length (the softmax classifier runs both
        columns in one backbone call); otherwise each column has its own.
      pack: pack the texts of all columns into shared rows (`packing.TrainPacking`) instead of
        padding each text to a bucket; the embedding losses train on these.
      pack_groups: with `pack`, pack this many groups of rows (GradCache's mini-batches).
      row_multiple: with `pack`, each group's row count is a multiple of this (the number of
        devices the batch is split over).
      process_index, process_count: this process's rows are the process_index-th contiguous slice
        of `global_batch // process_count` rows of every global batch.
      num_threads: grain read threads (texts are read, tokenized and laid out off the main thread).
      prefetch: batches buffered ahead of the trainer.
    """

    global_batch: int
    seq_length: int
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    shuffle: bool = True
    group_by_length: bool = False
    no_duplicates: bool = False
    buckets: tuple[int, ...] = TRAIN_BUCKETS
    joint_length: bool = False
    pack: bool = False
    pack_groups: int = 1
    row_multiple: int = 1
    process_index: int = 0
    process_count: int = 1
    num_threads: int = 2
    prefetch: int = 8

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise DataError(f"global_batch must be >= 1, got {self.global_batch}")
        if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
            raise DataError(f"process_index {self.process_index} out of range for process_count "
                            f"{self.process_count}")
        if self.global_batch % self.process_count:
            raise DataError(f"global batch {self.global_batch} is not divisible by the process count "
                            f"{self.process_count}; every process must feed the same number of rows")
        if self.seq_length < 2:
            raise DataError(f"seq_length must be >= 2 ([CLS] and [SEP]), got {self.seq_length}")
        if self.epochs < 1:
            raise DataError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise DataError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.pack and (self.global_batch % self.pack_groups
                          or self.row_multiple % self.process_count):
            raise DataError(f"packing: {self.pack_groups} groups must divide the global batch "
                            f"{self.global_batch}, and the process count {self.process_count} must "
                            f"divide row_multiple {self.row_multiple}")
        if self.group_by_length and self.no_duplicates:
            raise DataError("group_by_length and no_duplicates cannot be combined")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        return bucket_lengths(self.seq_length, sorted(self.buckets))

    def row_length(self, longest: int) -> int:
        """The packed row length of a batch whose longest text has `longest` tokens."""
        return bucket_for(longest, row_lengths(self.seq_length))


def bucket_of(length: int, seq_length: int, buckets: Sequence[int] = TRAIN_BUCKETS) -> int:
    """The padded length an example of `length` tokens trains at."""
    return bucket_for(length, bucket_lengths(seq_length, sorted(buckets)))


def token_lengths(source: TextSource, tokenizer: Tokenizer, seq_length: int,
                  chunk: int = 4096) -> np.ndarray:
    """int32 [N]: each record's longest text in tokens (truncated at seq_length); one pass."""
    out = np.zeros(len(source), np.int32)
    for lo in range(0, len(source), chunk):
        idx = range(lo, min(lo + chunk, len(source)))
        cols = source.texts(idx)
        lens = [np.fromiter((len(x) for x in tokenizer.encode(t, seq_length)), np.int32, len(idx))
                for t in cols.values()]
        out[lo: lo + len(idx)] = np.max(lens, axis=0)
    return out


# ----------------------------------------------------------------------------------------------
# The plan: global batches of record indices, per epoch
# ----------------------------------------------------------------------------------------------


def _cut(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[s: s + size] for s in range(0, len(order), size)]


def no_duplicates_batches(order: np.ndarray, hashes: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """sentence-transformers' NoDuplicatesBatchSampler over the permutation `order`.

    Walks the remaining indices in order, taking each one whose texts are all new to the batch,
    until the batch is full; skipped indices wait for a later batch. Leftovers that cannot fill a
    batch become (padded) partial batches, as with drop_last=False.

    Args:
      order: record indices, already shuffled.
      hashes: int64 [N, columns]: a hash of every text of every record.
      batch_size: rows per batch.
    """
    remaining = dict.fromkeys(order.tolist())
    out: list[np.ndarray] = []
    while remaining:
        seen: set[int] = set()
        batch: list[int] = []
        for i in remaining:
            values = set(hashes[i].tolist())
            if values & seen:
                continue
            batch.append(i)
            seen |= values
            if len(batch) == batch_size:
                break
        for i in batch:
            del remaining[i]
        out.append(np.asarray(batch, np.int64))
    return out


class BatchPlan:
    """Which records make up each global batch of each epoch (deterministic by seed).

    Args:
      num_records: records in the source.
      cfg: the pipeline config.
      lengths: per-record token lengths (required with group_by_length).
      text_hashes: per-record text hashes (required with no_duplicates).
    """

    def __init__(self, num_records: int, cfg: PipelineConfig, *, lengths: np.ndarray | None = None,
                 text_hashes: np.ndarray | None = None):
        if num_records < 1:
            raise DataError("no training examples")
        if cfg.group_by_length and lengths is None:
            raise ValueError("group_by_length needs the records' token lengths")
        if cfg.no_duplicates and text_hashes is None:
            raise ValueError("no_duplicates needs the records' text hashes")
        self.n, self.cfg, self.lengths, self.hashes = num_records, cfg, lengths, text_hashes
        self._cache: dict[int, list[np.ndarray]] = {}
        if cfg.no_duplicates:  # batch counts vary by epoch: plan them all (the LR schedule needs it)
            sizes = [len(self.epoch(e)) for e in range(cfg.epochs)]
        elif cfg.group_by_length:
            which = self._bucket_index(np.arange(num_records))
            g = cfg.global_batch
            per = sum(-(-int(np.sum(which == k)) // g) for k in range(len(cfg.bucket_lengths)))
            sizes = [per] * cfg.epochs
        else:
            sizes = [-(-num_records // cfg.global_batch)] * cfg.epochs
        self.steps_per_epoch = tuple(sizes)
        self._ends = np.cumsum(sizes)
        total = int(self._ends[-1])
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total

    def _bucket_index(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.cfg.bucket_lengths), self.lengths[idx], side="left")

    def epoch(self, e: int) -> list[np.ndarray]:
        """The global batches of epoch e (0-based), each an int64 array of <= global_batch records."""
        if e in self._cache:
            return self._cache[e]
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, e)) if cfg.shuffle else None
        order = rng.permutation(self.n) if rng is not None else np.arange(self.n)
        if cfg.no_duplicates:
            batches = no_duplicates_batches(order, self.hashes, cfg.global_batch)
        elif cfg.group_by_length:
            which = self._bucket_index(order)
            batches = []
            for k in range(len(cfg.bucket_lengths)):
                batches.extend(_cut(order[which == k], cfg.global_batch))
            if rng is not None:
                batches = [batches[j] for j in rng.permutation(len(batches))]
        else:
            batches = _cut(order, cfg.global_batch)
        if not cfg.no_duplicates:  # cheap to rebuild: keep only the current epoch
            self._cache.clear()
        self._cache[e] = batches
        return batches

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of 0-based global step `step`."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} out of range [0, {self.total_steps})")
        e = int(np.searchsorted(self._ends, step, side="right"))
        return e, step - (int(self._ends[e - 1]) if e else 0)

    def records(self, step: int) -> np.ndarray:
        e, b = self.locate(step)
        return self.epoch(e)[b]


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


class BatchBuilder:
    """step -> this process's rows of that step's global batch, tokenized and packed or padded.

    Keys (padded layout, `cfg.pack` off): `{c}_ids`, `{c}_mask` int32 [rows, L_c] for each text column c (L_c:
    the smallest bucket holding the column's longest text in the global batch; with
    `joint_length`, one L for all columns), `weights` float32 [rows] (0 on pad
    rows, which hold the empty sentence [CLS] [SEP]), and `labels` int32 [rows] or `scores`
    float32 [rows] (0 on pad rows) when the source has a target.
    With `with_index`, also `index` int32 [rows]: each row's record (-1 on pad rows).

    With `cfg.pack` the texts are packed instead (`packing.TrainPacking`): `packed_ids`,
    `packed_segments`, `packed_positions` int32 [R_local, L] (this process's contiguous share of
    the global rows) and `{c}_row`, `{c}_slot` int32 [rows] (each text's global packed row and
    slot) replace `{c}_ids` / `{c}_mask`.
    """

    def __init__(self, source: TextSource, tokenizer: Tokenizer, cfg: PipelineConfig,
                 plan: BatchPlan | None = None, *, with_index: bool = False,
                 target_key: str | None = None):
        self.source, self.tokenizer, self.cfg, self.plan = source, tokenizer, cfg, plan
        self.with_index = with_index
        self.target_key = target_key or {"label": "labels", "score": "scores", None: None}[
            source.schema.target]
        # Pad rows hold the empty sentence ([CLS] [SEP]) rather than nothing: an all-zero mask
        # pools to a zero vector, and normalising that has a NaN gradient even at weight 0.
        self._empty = tokenizer.encode([""], cfg.seq_length)[0]

    def __call__(self, step: int) -> Batch:
        return self.build(self.plan.records(int(step)))

    def build(self, records: np.ndarray) -> Batch:
        """The batch of global records `records` (<= global_batch; missing rows are pads)."""
        cfg, src = self.cfg, self.source
        g, rows = cfg.global_batch, cfg.local_batch
        n = len(records)
        if n > g:
            raise ValueError(f"{n} records for a global batch of {g}")
        # Every process tokenizes the whole global batch: the padded lengths (or the packing) must
        # be the same on all of them, and they depend on every text of the batch.
        lo = cfg.process_index * rows
        out = self.layout(src.texts(records), n, lo)
        real = len(range(lo, min(lo + rows, n)))
        w = np.zeros((rows,), np.float32)
        w[:real] = 1.0
        out["weights"] = w
        if self.target_key is not None and src.targets is not None:
            t = np.zeros((rows,), np.int32 if src.schema.target == "label" else np.float32)
            t[:real] = src.targets[records[lo: lo + real]]
            out[self.target_key] = t
        if self.with_index:
            index = np.full((rows,), -1, np.int32)
            index[:real] = records[lo: lo + real]
            out["index"] = index
        return out

    def layout(self, cols: dict[str, list[str]], n: int, lo: int) -> Batch:
        """The text arrays of this process's rows (from global row `lo`) of a global batch of `n`
        records whose texts are `cols`: packed or padded. (`cross_encoder_batches` lays out
        pairs instead.)"""
        flat = [t for c in self.source.columns for t in cols[c]]
        # No lock: `Tokenizer.encode` is thread-safe, so grain's threads tokenize in parallel
        # (the Rust tokenizer releases the GIL).
        ids = self.tokenizer.encode(flat, self.cfg.seq_length) if flat else []
        return self._packed(ids, n, lo) if self.cfg.pack else self._padded(ids, n, lo)

    def _padded(self, ids: list[np.ndarray], n: int, lo: int) -> Batch:
        """Each text in its own row of the local batch, padded to its column's bucket."""
        cfg, columns, rows = self.cfg, self.source.columns, self.cfg.local_batch
        longest = [max((len(x) for x in ids[k * n:(k + 1) * n]), default=2) for k in range(len(columns))]
        if cfg.joint_length:
            longest = [max(longest)] * len(longest)
        out: Batch = {}
        pad = self.tokenizer.pad_id
        for k, c in enumerate(columns):
            length = bucket_for(longest[k], cfg.bucket_lengths)
            a = np.full((rows, length), pad, np.int32)
            m = np.zeros((rows, length), np.int32)
            for r in range(rows):
                x = ids[k * n + lo + r] if lo + r < n else self._empty
                a[r, : len(x)] = x
                m[r, : len(x)] = 1
            out[f"{c}_ids"], out[f"{c}_mask"] = a, m
        return out

    def _packed(self, ids: list[np.ndarray], n: int, lo: int) -> Batch:
        """The global batch's texts (pad rows: the empty sentence) packed into shared rows; this
        process keeps its share of the rows and of the texts' (row, slot)."""
        cfg, columns = self.cfg, self.source.columns
        g, rows = cfg.global_batch, cfg.local_batch
        texts = [[ids[k * n + i] if i < n else self._empty for i in range(g)] for k in range(len(columns))]
        longest = max(len(x) for col in texts for x in col)
        packing = TrainPacking(cfg.row_length(longest), cfg.pack_groups, cfg.row_multiple)
        p = packing.pack(texts, pad_id=self.tokenizer.pad_id)
        share = p["ids"].shape[0] // cfg.process_count
        r0 = cfg.process_index * share
        out: Batch = {f"packed_{k}": p[k][r0: r0 + share] for k in ("ids", "segments", "positions")}
        for k, c in enumerate(columns):
            out[f"{c}_row"] = p["row"][k, lo: lo + rows]
            out[f"{c}_slot"] = p["slot"][k, lo: lo + rows]
        return out


class _IteratorState:
    """What grain's orbax handler saves: JSON bytes of the iterator state (taken at save time)."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode() if isinstance(state, bytes) else state)

    def start_prefetch(self) -> None:  # the handler calls it after a restore
        pass


class TrainPipeline:
    """The training batches of a run as a grain dataset.

    Args:
      source: the training records.
      tokenizer: host tokenizer.
      cfg: batching config.
      lengths: per-record token lengths (computed here when group_by_length needs them).
      builder: the `BatchBuilder` class that lays out the batches (default `BatchBuilder`).
    """

    def __init__(self, source: TextSource, tokenizer: Tokenizer, cfg: PipelineConfig,
                 lengths: np.ndarray | None = None, builder: type[BatchBuilder] | None = None):
        if cfg.no_duplicates and source.text_hashes is None:
            raise ValueError("no_duplicates needs a source opened with hash_texts=True")
        if cfg.group_by_length and lengths is None:
            lengths = token_lengths(source, tokenizer, cfg.seq_length)
        self.source, self.cfg = source, cfg
        self.plan = BatchPlan(len(source), cfg, lengths=lengths, text_hashes=source.text_hashes)
        # `builder`: another layout of the same plan (the cross-encoders' pairs).
        self.builder = (builder or BatchBuilder)(source, tokenizer, cfg, self.plan)
        self.dataset = grain.MapDataset.range(self.plan.total_steps).map(self.builder)

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def steps_per_epoch(self) -> tuple[int, ...]:
        return self.plan.steps_per_epoch

    def iterator(self, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
        """A prefetching iterator from the start, or from a saved `state` (`get_state()`)."""
        opts = grain.ReadOptions(num_threads=self.cfg.num_threads,
                                 prefetch_buffer_size=self.cfg.prefetch if self.cfg.num_threads else 0)
        it = self.dataset.to_iter_dataset(opts).__iter__()
        if state is not None:
            if not 0 <= int(state.get("next_index", -1)) <= self.total_steps:
                raise ValueError(f"data iterator state {state} does not fit this run's "
                                 f"{self.total_steps} steps")
            it.set_state(state)
        return it

    @staticmethod
    def checkpoint_item(iterator: grain.DatasetIterator):
        """orbax save args for the iterator's current state (one JSON file per process)."""
        return grain.checkpoint.CheckpointSave(_IteratorState(iterator.get_state()))

    @staticmethod
    def restore_item():
        """(orbax restore args, holder): after the restore, `holder.state` is the saved state."""
        holder = _IteratorState()
        return grain.checkpoint.CheckpointRestore(holder), holder


def eval_batches(source: TextSource, tokenizer: Tokenizer, *, global_batch: int, seq_length: int,
                 process_index: int = 0, process_count: int = 1,
                 buckets: Sequence[int] = TRAIN_BUCKETS, joint_length: bool = False) -> list[Batch]:
    """Unshuffled batches in file order, with `index` (each row's record, -1 for pads)."""
    cfg = PipelineConfig(global_batch=global_batch, seq_length=seq_length, shuffle=False,
                         buckets=tuple(buckets), joint_length=joint_length, process_index=process_index,
                         process_count=process_count)
    builder = BatchBuilder(source, tokenizer, cfg, with_index=True)
    return [builder.build(np.arange(s, min(s + global_batch, len(source))))
            for s in range(0, len(source), global_batch)]
