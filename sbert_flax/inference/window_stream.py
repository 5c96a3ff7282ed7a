"""The window stream behind `SentenceEncoder.encode_chunks`: prepared ahead, reassembled in order.

Input is read in windows of sentences. A window is prepared (tokenized into one flat buffer,
packed longest-first into fixed-shape batches, its result buffer allocated) on background threads,
a bounded number of windows ahead of the one being dispatched (`prefetch`), so the caller's thread
only dispatches batches and files results while the host work of later windows overlaps the device
compute of earlier ones. Each batch's result is filed into its `Window`; complete windows go to a
`Reassembly`, which hands out chunks of rows in input order.

Memory stays bounded: at most `depth` windows are being prepared or waiting, plus the windows whose
batches are still on the devices, plus the rows not yet handed out.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from sbert_flax.inference.packing import PackedBatch

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass
class Window:
    """One window of the input: its packed batches and its rows' results as they come back.

    Attributes:
      start: input index of the window's first sentence.
      size: sentences in the window.
      batches: the packed batches (their `index` is the sentence's place in the window).
      result: float32 [size, dim] for sentence output; for token output a list of size
        [tokens_i, dim] arrays, filled in as batches finish.
      pending: batches whose results are not filed yet.
    """

    start: int
    size: int
    batches: list[PackedBatch]
    result: np.ndarray | list
    pending: int = -1

    def __post_init__(self) -> None:
        if self.pending < 0:
            self.pending = len(self.batches)

    @property
    def done(self) -> bool:
        return self.pending == 0

    def store(self, batch: PackedBatch, out: np.ndarray) -> None:
        """Files one batch's host result: [rows, slots, D] pooled, or [rows, length, D] tokens."""
        if isinstance(self.result, np.ndarray):
            self.result[batch.index] = out[batch.row, batch.slot]
        else:
            for j, i in enumerate(batch.index):
                s, m = batch.start[j], batch.length[j]
                self.result[i] = out[batch.row[j], s:s + m].copy()
        self.pending -= 1


class Reassembly:
    """Complete windows in, chunks of `chunk_size` rows out, in input order.

    Args:
      chunk_size: rows per chunk (the last may be shorter).
      finish: applied to each sentence-output chunk (truncation, normalisation).
    """

    def __init__(self, chunk_size: int, finish: Callable[[np.ndarray], np.ndarray]):
        self.chunk_size = chunk_size
        self.finish = finish
        self._parts: collections.deque[tuple[int, np.ndarray | list]] = collections.deque()
        self._buffered = 0  # rows held, not handed out yet

    def add(self, window: Window) -> None:
        """Takes a complete window; windows must come in input order."""
        self._parts.append((window.start, window.result))
        self._buffered += window.size

    def chunks(self, final: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | list]]:
        """(input indices int64 [k], results) for every full chunk held; with `final`, the rest."""
        while self._parts and (self._buffered >= self.chunk_size or final):
            take = min(self.chunk_size, self._buffered)
            first, got, pieces = self._parts[0][0], 0, []
            while got < take:
                start, res = self._parts[0]
                k = min(take - got, len(res))
                pieces.append(res[:k])
                if k == len(res):
                    self._parts.popleft()
                else:
                    self._parts[0] = (start + k, res[k:])
                got += k
            self._buffered -= take
            rows = np.arange(first, first + take, dtype=np.int64)
            if isinstance(pieces[0], np.ndarray):
                yield rows, self.finish(np.concatenate(pieces))
            else:
                yield rows, [t for piece in pieces for t in piece]


@dataclasses.dataclass(frozen=True)
class _Failed:
    """Reading the input raised: re-raised in order, after the windows read before it."""

    error: BaseException


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[R]:
    """`map(fn, items)` in order, with up to `depth` items in preparation on `workers` threads.

    `items` is read on the caller's thread (generators and files need not be thread-safe), one
    item ahead when the caller asks for the next result. An error reading `items` is raised only
    after the results of the items before it; an error in `fn` is raised in its item's place.
    Input of a single item, or `workers` < 1, runs `fn` on the caller's thread (no pool: small
    calls pay nothing for threads). Closing the iterator early cancels what has not started.

    Args:
      fn: the preparation, safe to run on several threads at once.
      items: the input, read lazily.
      workers: threads.
      depth: items submitted and not yet returned, at most (>= 1).
    """
    it = iter(items)
    end = object()

    def read():
        try:
            return next(it, end)
        except Exception as e:  # raised in order, after the items read before it
            return _Failed(e)

    if workers < 1:
        for x in it:
            yield fn(x)
        return
    first = read()
    if first is end:
        return
    second = read() if not isinstance(first, _Failed) else end
    if second is end:  # one item: nothing to overlap with
        if isinstance(first, _Failed):
            raise first.error
        yield fn(first)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="sbert-flax-prepare")

    def submit(x) -> Future | _Failed:
        return x if isinstance(x, _Failed) else pool.submit(fn, x)

    queue: collections.deque[Future | _Failed] = collections.deque([submit(first), submit(second)])
    more = not isinstance(second, _Failed)
    try:
        while queue:
            while more and len(queue) < max(depth, 1):
                x = read()
                if x is end:
                    more = False
                else:
                    queue.append(submit(x))
                    more = not isinstance(x, _Failed)
            head = queue.popleft()
            if isinstance(head, _Failed):
                raise head.error
            yield head.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
