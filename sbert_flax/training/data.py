"""Sentence-pair data for siamese fine-tuning: UER classifier TSV -> token ids -> fixed-shape batches.

Everything here is host-side numpy. The batch stream is a pure function of (data, seed, epoch):
every process computes the same global batches and keeps its own contiguous slice of rows, so a
multi-host run and a one-host run see the same examples in the same order, and a resumed run can
rebuild an epoch and skip the batches it already trained on.

Batches have one padded length per batch, drawn from a few length buckets (`TRAIN_BUCKETS`), and a
fixed number of rows: a bucket's last partial batch is padded with zero-weight rows rather than
dropped or recompiled for.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np

from sbert_flax.files import read_text_lines
from sbert_flax.tokenization import Tokenizer, bucket_for, bucket_lengths

# Three padded lengths for training: few compiled shapes, and NLI sentences (mostly < 60 tokens)
# rarely pay for 128-token padding.
TRAIN_BUCKETS = (32, 64, 128)

# The label names of the raw CNLI/OCNLI files (`id \t premise \t hypothesis \t label-name`), in the
# order UER's converted train/dev/test.tsv use.
NLI_LABELS: Mapping[str, int] = {"entailment": 0, "neutral": 1, "contradiction": 2}

# How many bad lines a DataError spells out; the rest are counted.
_MAX_REPORTED = 5

_INT_RE = re.compile(r"\s*\+?[0-9]+\s*")
_NEG_RE = re.compile(r"\s*-[0-9]+\s*")
_MAX_LABEL = np.iinfo(np.int32).max - 1  # labels are int32 and num_labels = max + 1 must fit

Batch = dict[str, np.ndarray]
T = TypeVar("T")


class DataError(ValueError):
    """A data file cannot be used as given; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class PairData:
    """Sentence pairs with integer labels, as read from one file.

    Attributes:
      text_a: first sentences.
      text_b: second sentences.
      labels: int32 [N] class ids in [0, num_labels).
      num_labels: number of classes (given, or max label + 1).
      path: the file read.
      skipped_lines: 1-based line numbers of malformed lines skipped (skip_bad_lines=True).
    """

    text_a: list[str]
    text_b: list[str]
    labels: np.ndarray
    num_labels: int
    path: str
    skipped_lines: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def skipped_summary(self, first: int = _MAX_REPORTED) -> str:
        """One log line about skipped malformed lines ("" when none were skipped)."""
        if not self.skipped_lines:
            return ""
        shown = ", ".join(map(str, self.skipped_lines[:first]))
        more = ", ..." if len(self.skipped_lines) > first else ""
        return (f"{self.path}: skipped {len(self.skipped_lines)} malformed line(s), "
                f"first: {shown}{more}; kept {len(self)}")


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of each side of each pair ([CLS] ... [SEP], unpadded) and the labels.

    Attributes:
      a: int32 ids of text_a, one array per example.
      b: int32 ids of text_b.
      labels: int32 [N].
      pad_id: the tokenizer's padding id (0 for BERT vocabs).
    """

    a: list[np.ndarray]
    b: list[np.ndarray]
    labels: np.ndarray
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        """int64 [N]: the longer side of each pair, which decides its bucket."""
        la = np.fromiter((len(x) for x in self.a), dtype=np.int64, count=len(self.a))
        lb = np.fromiter((len(x) for x in self.b), dtype=np.int64, count=len(self.b))
        return np.maximum(la, lb)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_lines(path: str) -> list[str]:
    """`files.read_text_lines`, with its errors as DataError (raised before any training)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a TSV file")
    try:
        return read_text_lines(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except ValueError as e:
        raise DataError(str(e)) from None


def _header_columns(path: str, header: str) -> tuple[int, int, int, int]:
    """(text_a, text_b, label, field count) from a UER header line; DataError names what is missing."""
    names = [n.strip() for n in header.split("\t")]
    found = {}
    for i, n in enumerate(names):
        if n in ("text_a", "text_b", "label"):
            if n in found:
                raise DataError(f"{path}:1: header names column {n!r} twice ({names})")
            found[n] = i
    missing = [n for n in ("text_a", "text_b", "label") if n not in found]
    if missing:
        raise DataError(
            f"{path}:1: header has no {', '.join(repr(m) for m in missing)} column "
            f"(found {names}); a UER classifier TSV starts with a tab-separated header naming "
            "text_a, text_b and label. For a headerless file pass has_header=False and columns=")
    return found["text_a"], found["text_b"], found["label"], len(names)


def read_pair_tsv(path: str, *, skip_bad_lines: bool = False,
                  label_names: Mapping[str, int] | None = None, num_labels: int | None = None,
                  columns: tuple[int, int, int] | None = None, has_header: bool = True,
                  num_fields: int | None = None) -> PairData:
    """Reads a sentence-pair classification TSV (UER-py's classifier format).

    The UER format is a header line naming `text_a`, `text_b` and `label` (any order, other columns
    allowed), then one pair per line with an integer label. Empty texts are kept (UER tokenizes
    them to [CLS] [SEP]). A line is malformed when its field count differs from the header's, or
    its label is not a non-negative integer (or a known name, with `label_names`), or is
    >= `num_labels` when that is given.

    Args:
      path: the file.
      skip_bad_lines: skip malformed lines and record them in `skipped_lines` instead of raising.
      label_names: map label strings to ids (e.g. `NLI_LABELS` for raw CNLI files) instead of
        parsing integers.
      num_labels: the number of classes; default max label + 1 (or max of `label_names` + 1).
      columns: (text_a, text_b, label) field indices; overrides the header's names. Required with
        has_header=False.
      has_header: the first line is a header (skipped; used for column names unless `columns`).
      num_fields: fields a good line has; default the header's count, or max(columns) + 1 for a
        headerless file.

    Returns:
      The pairs, in file order.

    Raises:
      DataError: unreadable file, bad header, no examples, or malformed lines without
        skip_bad_lines. The message lists the first few bad lines as `path:line: reason` and
        the total count.
    """
    lines = _read_lines(path)
    first_line = 1
    if has_header:
        if not lines:
            raise DataError(f"{path}: empty file, expected a header line naming text_a, text_b, label")
        ia, ib, il, header_fields = _header_columns(path, lines[0]) if columns is None else (
            *columns, len(lines[0].split("\t")))
        lines = lines[1:]
        first_line = 2
    else:
        if columns is None:
            raise DataError(f"{path}: has_header=False needs columns=(text_a, text_b, label) indices")
        ia, ib, il = columns
        header_fields = max(columns) + 1
    expected = num_fields if num_fields is not None else header_fields
    if min(ia, ib, il) < 0 or max(ia, ib, il) >= expected:
        raise DataError(f"{path}: columns {(ia, ib, il)} out of range for {expected} fields per line")
    if num_labels is not None and num_labels < 1:
        raise DataError(f"{path}: num_labels must be >= 1, got {num_labels}")

    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[int] = []
    bad: list[tuple[int, str]] = []
    for lineno, line in enumerate(lines, start=first_line):
        fields = line.split("\t")
        if len(fields) != expected:
            why = "empty line" if line.strip() == "" else (
                f"expected {expected} tab-separated fields, got {len(fields)}")
            bad.append((lineno, why))
            continue
        raw_label = fields[il]
        if label_names is not None:
            label = label_names.get(raw_label.strip())
            if label is None:
                bad.append((lineno, f"unknown label {raw_label!r} (known: {sorted(label_names)})"))
                continue
        elif _INT_RE.fullmatch(raw_label):
            label = int(raw_label)
            if label > _MAX_LABEL:
                bad.append((lineno, f"label {label} is too large for a class id"))
                continue
        elif _NEG_RE.fullmatch(raw_label):
            bad.append((lineno, f"negative label {raw_label.strip()}"))
            continue
        else:
            bad.append((lineno, f"label {raw_label!r} is not an integer"))
            continue
        if num_labels is not None and label >= num_labels:
            bad.append((lineno, f"label {label} >= num_labels {num_labels}"))
            continue
        text_a.append(fields[ia])
        text_b.append(fields[ib])
        labels.append(label)

    if bad and not skip_bad_lines:
        shown = "; ".join(f"{path}:{n}: {why}" for n, why in bad[:_MAX_REPORTED])
        more = f" (first {_MAX_REPORTED} shown)" if len(bad) > _MAX_REPORTED else ""
        raise DataError(f"{path}: {len(bad)} malformed line(s){more}: {shown}. Fix the file, or "
                        "skip them with skip_bad_lines=True (--skip_bad_lines)")
    if not labels:
        raise DataError(f"{path}: no examples" + (f" ({len(bad)} malformed lines skipped)" if bad else ""))
    if num_labels is None:
        num_labels = (max(label_names.values()) if label_names else max(labels)) + 1
    return PairData(text_a=text_a, text_b=text_b, labels=np.asarray(labels, dtype=np.int32),
                    num_labels=int(num_labels), path=path,
                    skipped_lines=tuple(n for n, _ in bad))


def tokenize_pairs(data: PairData, tokenizer: Tokenizer, seq_length: int) -> TokenizedPairs:
    """Tokenizes each side on its own, `[CLS] a [SEP]` and `[CLS] b [SEP]`, like UER's siamese.

    Truncation keeps the final [SEP] (the tokenizer's); UER-py's script cuts at `seq_length`
    tokens and can drop it, which only matters for sentences longer than seq_length.
    """
    if seq_length < 2:
        raise DataError(f"seq_length must be >= 2 ([CLS] and [SEP]), got {seq_length}")
    return TokenizedPairs(a=tokenizer.encode(data.text_a, seq_length),
                          b=tokenizer.encode(data.text_b, seq_length),
                          labels=np.asarray(data.labels, dtype=np.int32),
                          pad_id=tokenizer.pad_id)


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def _check_process(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch < 1:
        raise DataError(f"global_batch must be >= 1, got {global_batch}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} out of range for process_count {process_count}")
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by the process count "
                        f"{process_count}; every process must feed the same number of rows")
    return global_batch // process_count


def _bucket_groups(pairs: TokenizedPairs, order: np.ndarray, seq_length: int,
                   buckets: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """(padded length, example indices in `order`'s order) for each non-empty bucket, ascending."""
    blens = bucket_lengths(seq_length, sorted(buckets))
    lengths = pairs.lengths()
    if len(lengths) and lengths.max() > seq_length:
        i = int(np.argmax(lengths))
        raise DataError(f"example {i} has {lengths[i]} tokens > seq_length {seq_length}; tokenize "
                        "with the same seq_length you batch with")
    # searchsorted(side="left") is bucket_for vectorised: the smallest bucket >= length.
    which = np.searchsorted(np.asarray(blens), lengths[order], side="left")
    return [(blens[k], order[which == k]) for k in range(len(blens)) if np.any(which == k)]


def _make_batch(pairs: TokenizedPairs, idx: np.ndarray, length: int, rows: int) -> Batch:
    """Packs examples `idx` into `rows` rows of `length` tokens; missing rows are zero-weight pads."""
    a_ids = np.full((rows, length), pairs.pad_id, dtype=np.int32)
    b_ids = np.full((rows, length), pairs.pad_id, dtype=np.int32)
    a_mask = np.zeros((rows, length), dtype=np.int32)
    b_mask = np.zeros((rows, length), dtype=np.int32)
    labels = np.zeros((rows,), dtype=np.int32)
    weights = np.zeros((rows,), dtype=np.float32)
    index = np.full((rows,), -1, dtype=np.int32)
    for r, i in enumerate(idx):
        a, b = pairs.a[i], pairs.b[i]
        a_ids[r, : len(a)] = a
        a_mask[r, : len(a)] = 1
        b_ids[r, : len(b)] = b
        b_mask[r, : len(b)] = 1
    n = len(idx)
    labels[:n] = pairs.labels[idx]
    weights[:n] = 1.0
    index[:n] = idx
    return {"a_ids": a_ids, "a_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask, "labels": labels,
            "weights": weights, "index": index}


def _plan(pairs: TokenizedPairs, *, global_batch: int, seq_length: int, buckets: Sequence[int],
          rng: np.random.Generator | None) -> list[tuple[int, np.ndarray]]:
    """The epoch's global batches as (padded length, example indices); short ones get pad rows."""
    order = rng.permutation(len(pairs)) if rng is not None else np.arange(len(pairs))
    plan: list[tuple[int, np.ndarray]] = []
    for length, idx in _bucket_groups(pairs, order, seq_length, buckets):
        plan.extend((length, idx[s: s + global_batch]) for s in range(0, len(idx), global_batch))
    if rng is not None:
        plan = [plan[j] for j in rng.permutation(len(plan))]
    return plan


def _iter_batches(pairs: TokenizedPairs, *, global_batch: int, seq_length: int,
                  buckets: Sequence[int], rng: np.random.Generator | None, process_index: int,
                  process_count: int, start: int, with_index: bool) -> Iterator[Batch]:
    # Not a generator itself: bad arguments raise here, at the call, not at the first batch.
    rows = _check_process(global_batch, process_index, process_count)
    if start < 0:
        raise DataError(f"start must be >= 0, got {start}")
    plan = _plan(pairs, global_batch=global_batch, seq_length=seq_length, buckets=buckets, rng=rng)
    lo = process_index * rows

    def gen() -> Iterator[Batch]:
        for length, idx in plan[start:]:
            # Only this process's rows are built: a slice of the global row list, pads included.
            batch = _make_batch(pairs, idx[lo: lo + rows], length, rows)
            if not with_index:
                del batch["index"]
            yield batch

    return gen()


def epoch_batches(pairs: TokenizedPairs, *, global_batch: int, seq_length: int, seed: int,
                  epoch: int, shuffle: bool = True, buckets: Sequence[int] = TRAIN_BUCKETS,
                  process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """One epoch of training batches, the same global batches for any process count.

    Examples are shuffled with `np.random.default_rng((seed, epoch))`, grouped by bucket (the
    smallest bucket >= the longer side), cut into batches of `global_batch` within each bucket
    (the last partial one padded with zero-weight rows), and the batch order is shuffled with the
    same generator. `shuffle=False` keeps file order within each bucket and orders batches by
    bucket. `buckets=()` pads every batch to seq_length: UER-py's own batching (random batches,
    last one partial), at the cost of padding.

    Args:
      pairs: tokenized pairs (each side at most `seq_length` tokens).
      global_batch: rows per batch across all processes.
      seq_length: the longest padded length; buckets above it are dropped and it becomes the last.
      seed: data seed.
      epoch: epoch number (0-based); each epoch gets its own order.
      shuffle: shuffle examples and batches.
      buckets: padded lengths to choose from.
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()).

    Returns:
      Batches of this process's `global_batch // process_count` rows: `a_ids`, `a_mask`, `b_ids`,
      `b_mask` int32 [rows, L]; `labels` int32 [rows]; `weights` float32 [rows] (1 real, 0 pad).

    Raises:
      DataError: global_batch not divisible by process_count, or a sequence longer than
        seq_length.
    """
    return list(iter_epoch_batches(
        pairs, global_batch=global_batch, seq_length=seq_length, seed=seed, epoch=epoch,
        shuffle=shuffle, buckets=buckets, process_index=process_index, process_count=process_count))


def iter_epoch_batches(pairs: TokenizedPairs, *, global_batch: int, seq_length: int, seed: int,
                       epoch: int, shuffle: bool = True, buckets: Sequence[int] = TRAIN_BUCKETS,
                       process_index: int = 0, process_count: int = 1,
                       start: int = 0) -> Iterator[Batch]:
    """`epoch_batches` built one batch at a time, from batch `start` on.

    Holds one batch in memory instead of the epoch, and resuming mid-epoch with `start=n` skips
    the first n batches without building them. Yields exactly `epoch_batches(...)[start:]`.
    """
    rng = np.random.default_rng((seed, epoch)) if shuffle else None
    return _iter_batches(pairs, global_batch=global_batch, seq_length=seq_length, buckets=buckets,
                         rng=rng, process_index=process_index, process_count=process_count,
                         start=start, with_index=False)


def eval_batches(pairs: TokenizedPairs, *, global_batch: int, seq_length: int,
                 buckets: Sequence[int] = TRAIN_BUCKETS, process_index: int = 0,
                 process_count: int = 1) -> list[Batch]:
    """Unshuffled batches (file order within each bucket, buckets ascending) for evaluation.

    Same as `epoch_batches(..., shuffle=False)` plus `index` int32 [rows]: each row's example
    index in `pairs` (-1 for pad rows), so predictions can be put back in file order with
    `preds[index[index >= 0]] = ...`.
    """
    return list(_iter_batches(pairs, global_batch=global_batch, seq_length=seq_length,
                              buckets=buckets, rng=None, process_index=process_index,
                              process_count=process_count, start=0, with_index=True))


def steps_per_epoch(pairs: TokenizedPairs, global_batch: int, seq_length: int,
                    buckets: Sequence[int] = TRAIN_BUCKETS) -> int:
    """The number of batches `epoch_batches` yields per epoch (the same for every seed/epoch)."""
    if global_batch < 1:
        raise DataError(f"global_batch must be >= 1, got {global_batch}")
    groups = _bucket_groups(pairs, np.arange(len(pairs)), seq_length, buckets)
    return sum(-(-len(idx) // global_batch) for _, idx in groups)


def skip_batches(batches: Iterable[T], n: int) -> Iterable[T]:
    """Drops the first `n` batches of an epoch (resume mid-epoch); a list stays a list."""
    if n < 0:
        raise ValueError(f"cannot skip {n} batches")
    if isinstance(batches, list):
        return batches[n:]
    return itertools.islice(batches, n, None)


def bucket_of(length: int, seq_length: int, buckets: Sequence[int] = TRAIN_BUCKETS) -> int:
    """The padded length an example of `length` tokens trains at."""
    return bucket_for(length, bucket_lengths(seq_length, sorted(buckets)))
