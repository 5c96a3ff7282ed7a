"""One request's inputs on their way through the batcher, and how its future is resolved.

A `Job` is made on the event loop and its future is only ever touched there: the batcher's threads
resolve it with `post`, which hands the outcome to the loop (`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

# What a job asks for: pooled rows [n, dim], or each token's hidden state [len_i, dim] per input.
# ---- rerank (serving/rerank_backend.py): "score" asks a cross-encoder's logits [n, labels] for
# token-id pairs; the batcher treats it as one more output (its own rounds, one row per input).
OUTPUTS = ("sentence", "token", "score")

# The logger of every piece of the batcher: one name for its lines, wherever they come from.
LOGGER = "sbert_flax.serving.batcher"


class Job:
    """One request's inputs on their way through the queue.

    Who touches which field is the table in `serving/batcher.py`: `ids`, `n`, `output`, `loop`,
    `future` and `t_submit` never change; `taken` and `cancelled` are under the batcher's
    condition; `t_first` is the worker's; `out` and `done` are the collector's.
    """

    __slots__ = ("ids", "n", "output", "taken", "done", "out", "future", "loop", "cancelled",
                 "t_submit", "t_first")

    def __init__(self, ids: Sequence[np.ndarray], dim: int, loop: asyncio.AbstractEventLoop,
                 output: str = "sentence"):
        self.ids = ids
        self.n = len(ids)
        self.output = output
        self.taken = 0  # inputs handed to the device so far (the worker, under the condition)
        self.done = 0  # rows written into `out` (the collector only)
        self.out = np.empty((self.n, dim), np.float32) if output != "token" else [None] * self.n
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False  # its inputs still queued need not run (under the condition)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None  # its first launch (the worker)


class Unavailable(RuntimeError):
    """The batcher takes no work now: the warm-up failed, the worker died, or the server is
    draining for shutdown.

    Not the request's fault: the routes answer 503 with Retry-After, the status README tells
    clients to retry on another replica.
    """

    kind = "unhealthy"


class BatchFailed(Unavailable):
    """The round of the worker that carried this request's inputs raised; the worker carries on.

    503 too: the same request may well succeed on a retry (a transient device error) and is not
    known to be at fault.
    """

    kind = "backend"


def row_width(backend, output: str) -> int:
    """Floats per input of a row output: the embedding's dim, or (rerank) the labels."""
    return int(backend.num_labels) if output == "score" else backend.dim


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def unique(jobs) -> list[Job]:
    """`jobs` without repeats (a job split over several rounds, or listed twice), in order."""
    return list({id(job): job for job in jobs}.values())


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the request was cancelled (client gone, timed out, server stopping)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def post(job: Job, result=None, error: BaseException | None = None) -> None:
    """Resolves `job.future` on its event loop (from any of the batcher's threads)."""
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
