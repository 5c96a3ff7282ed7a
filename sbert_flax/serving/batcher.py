"""Dynamic batching: one queue, one worker thread that owns the encoder.

Requests put their tokenized inputs on the queue and await a future; the worker takes inputs in
arrival order until the token budget is full (so concurrent requests share a device batch, and a
big request is split over several), runs them on the precompiled shapes, writes each row into its
request's output at its own position, and resolves a request's future once all its rows are in.
The asyncio event loop never waits on the device: it only hands work over and is called back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from sbert_flax.serving.backend import EncoderBackend
from sbert_flax.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)

WARMUP_TEXT = "sbert-flax warm-up 句子"


class Job:
    """One request's inputs on their way through the queue."""

    __slots__ = ("ids", "n", "taken", "done", "out", "future", "loop", "cancelled", "t_submit",
                 "t_first")

    def __init__(self, ids: Sequence[np.ndarray], dim: int, loop: asyncio.AbstractEventLoop):
        self.ids = ids
        self.n = len(ids)
        self.taken = 0  # inputs handed to the device so far (worker thread only)
        self.done = 0  # rows written into `out` (worker thread only)
        self.out = np.empty((self.n, dim), np.float32)
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None


class Unavailable(RuntimeError):
    """The batcher takes no work now: the warm-up failed, or the server is draining for shutdown.

    Not the request's fault and not a bug in serving it: the routes answer 503 with Retry-After,
    the status README tells clients to retry on another replica.
    """


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the request was cancelled (client gone, server stopping)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """The queue and the worker thread.

    Args:
      backend: the encoder adapter; only the worker thread calls its device methods.
      max_batch_tokens: real tokens gathered per `embed_ids` call.
      metrics: where batch sizes and timings go.
      warmup: compile every shape and run a test batch before `ready` is set.
    """

    def __init__(self, backend: EncoderBackend, max_batch_tokens: int, metrics: ServeMetrics,
                 warmup: bool = True):
        # The test batch is tokenized here, on the caller's thread: once the server listens, only
        # the tokenizer thread may touch the tokenizer.
        self._warmup_ids = backend.tokenize([WARMUP_TEXT], truncate=True, direction="right")
        self.backend = backend
        self.max_batch_tokens = int(max_batch_tokens)
        self.metrics = metrics
        self._warmup = warmup
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._queued_inputs = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.warmup_shapes = 0
        self._thread = threading.Thread(target=self._run, name="sbert-flax-batcher", daemon=True)

    # ---- called from the event loop -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    def submit(self, ids: Sequence[np.ndarray]) -> Job:
        """Queues one request's inputs; await `job.future` for the [n, dim] embeddings."""
        job = Job(ids, self.backend.dim, asyncio.get_running_loop())
        if job.n == 0:
            job.future.set_result(job.out)
            return job
        with self._cond:
            if self._stopping:
                raise Unavailable("the batcher is stopped: the server is shutting down (draining); "
                                  "retry on another replica")
            if self.error is not None:  # fail at once rather than queue behind a dead model
                job.future.set_exception(Unavailable(f"the model failed to warm up: {self.error}"))
                return job
            self._queue.append(job)
            self._queued_inputs += job.n
            self._cond.notify()
        return job

    @property
    def draining(self) -> bool:
        """`stop` was called: what is queued finishes, nothing new is accepted."""
        return self._stopping

    def cancel(self, job: Job) -> None:
        """Drops the job's inputs that have not reached the device yet."""
        job.cancelled = True
        job.future.cancel()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes everything queued, then ends the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._warmup:
                t0 = time.perf_counter()
                self.warmup_shapes = self.backend.warmup()
                # The test batch: tokenizer, device and result path all work end to end.
                emb = self.backend.embed_ids(self._warmup_ids)
                if emb.shape != (1, self.backend.dim) or not np.isfinite(emb).all():
                    raise RuntimeError(f"warm-up batch returned {emb.shape}, finite={np.isfinite(emb).all()}")
                log.info("warm-up: %d shapes compiled in %.1f s", self.warmup_shapes,
                         time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 -- reported by /health, the server stays up
            log.exception("warm-up failed")
            self.error = e
        else:
            self.ready.set()
            self.metrics.ready.set(1)
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                items = self._take()
            if items:
                self._process(items)

    def _take(self) -> list[tuple[Job, int]]:
        """Inputs in arrival order until the token budget is full (at least one). Holds the lock."""
        items: list[tuple[Job, int]] = []
        tokens = 0
        while self._queue:
            job = self._queue[0]
            if job.cancelled:
                self._queue.popleft()
                left = job.n - job.taken
                self._queued_inputs -= left
                self.metrics.dropped_inputs.inc(left)
                continue
            while job.taken < job.n:
                length = len(job.ids[job.taken])
                if items and tokens + length > self.max_batch_tokens:
                    return items
                items.append((job, job.taken))
                tokens += length
                job.taken += 1
                self._queued_inputs -= 1
            self._queue.popleft()
        return items

    def _process(self, items: list[tuple[Job, int]]) -> None:
        now = time.perf_counter()
        jobs = {id(job): job for job, _ in items}.values()
        for job in jobs:
            if job.t_first is None:
                job.t_first = now
                self.metrics.queue_duration.observe(now - job.t_submit)
        ids = [job.ids[i] for job, i in items]
        self.metrics.batch_size.observe(len(ids))
        self.metrics.batch_tokens.observe(sum(len(x) for x in ids))
        try:
            if self.error is not None:  # queued while the warm-up was still running
                raise Unavailable(f"the model failed to warm up: {self.error}")
            emb = self.backend.embed_ids(ids)
        except Exception as e:  # noqa: BLE001 -- fail these requests, keep serving
            log.exception("device batch failed")
            for job in jobs:
                job.cancelled = True  # its other inputs need not run
                try:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, e)
                except RuntimeError:  # the loop is closed
                    pass
            return
        self.metrics.batch_duration.observe(time.perf_counter() - now)
        for k, (job, i) in enumerate(items):
            job.out[i] = emb[k]
            job.done += 1
            if job.done == job.n:
                self.metrics.inference_duration.observe(time.perf_counter() - job.t_first)
                try:
                    job.loop.call_soon_threadsafe(_resolve, job.future, job.out)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
