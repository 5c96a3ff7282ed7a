"""Dynamic batching: one queue, one supervised worker thread that owns the encoder.

Requests put their tokenized inputs on the queue and await a future; the worker takes inputs in
arrival order until the token budget is full (so concurrent requests share a device batch, and a
big request is split over several), runs them on the precompiled shapes, writes each row into its
request's output at its own position, and resolves a request's future once all its rows are in.
The asyncio event loop never waits on the device: it only hands work over and is called back.

Supervision: an exception anywhere in one round of the worker (taking from the queue, the device
call, writing the rows back) fails only the requests that round touched, with `BatchFailed`, and
the worker carries on. `max_failures` rounds failing in a row (the device is broken, not one bad
request), the thread ending any other way, or one device call running past `stuck_after` seconds
(a hung device; a watchdog thread notices) make the batcher *dead*: every waiting request fails
with `Unavailable`, nothing new is taken, `fatal` says why and `on_fatal` is called, so the
server can report 503 on /health and exit for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from sbert_flax.serving.backend import EncoderBackend
from sbert_flax.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)

WARMUP_TEXT = "sbert-flax warm-up 句子"
# Failed rounds in a row after which the worker gives up. One bad request fails one round and the
# next good one resets the count; five in a row means the device (or the program on it) is
# broken, and a fresh process is the likeliest cure.
MAX_CONSECUTIVE_FAILURES = 5


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
    """The batcher takes no work now: the warm-up failed, the worker died, or the server is
    draining for shutdown.

    Not the request's fault: the routes answer 503 with Retry-After, the status README tells
    clients to retry on another replica.
    """

    error_type = "unhealthy"


class BatchFailed(Unavailable):
    """The round of the worker that carried this request's inputs raised; the worker carries on.

    503 too: the same request may well succeed on a retry (a transient device error) and is not
    known to be at fault.
    """

    error_type = "backend"


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the request was cancelled (client gone, timed out, server stopping)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(job: Job, result=None, error: BaseException | None = None) -> None:
    """Resolves `job.future` on its event loop (from the worker thread)."""
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class Batcher:
    """The queue and the worker thread.

    Args:
      backend: the encoder adapter; only the worker thread calls its device methods.
      max_batch_tokens: real tokens gathered per `embed_ids` call.
      metrics: where batch sizes and timings go.
      warmup: compile every shape and run a test batch before `ready` is set.
      max_failures: failed rounds in a row after which the worker gives up (the batcher is dead).
      on_fatal: called once, from the worker or the watchdog thread, when the batcher dies (the
        serve command shuts the server down from there).
      stuck_after: seconds one round may run before the worker counts as hung (None: never).
    """

    def __init__(self, backend: EncoderBackend, max_batch_tokens: int, metrics: ServeMetrics,
                 warmup: bool = True, max_failures: int = MAX_CONSECUTIVE_FAILURES,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 stuck_after: float | None = None):
        if max_failures < 1:
            raise ValueError(f"max_failures={max_failures} must be >= 1")
        # The test batch is tokenized here, on the caller's thread, before any request can be.
        self._warmup_ids = backend.tokenize([WARMUP_TEXT], truncate=True, direction="right")
        self.backend = backend
        self.max_batch_tokens = int(max_batch_tokens)
        self.metrics = metrics
        self.max_failures = int(max_failures)
        self.on_fatal = on_fatal
        self._warmup = warmup
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._started = False
        self._queued_inputs = 0
        self._fatal: BaseException | None = None
        self._in_hand: list[Job] = []  # the jobs of the round on the device (worker thread only)
        self._round_started: float | None = None  # time.monotonic() of the round on the device
        self.stuck_after = stuck_after
        self._dying = threading.Lock()
        self.ready = threading.Event()
        self.error: BaseException | None = None  # the warm-up's
        self.warmup_shapes = 0
        self._thread = threading.Thread(target=self._run, name="sbert-flax-batcher", daemon=True)

    # ---- called from the event loop -------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._thread.start()
        if self.stuck_after is not None:
            threading.Thread(target=self._watch, name="sbert-flax-batcher-watchdog",
                             daemon=True).start()

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    @property
    def fatal(self) -> BaseException | None:
        """Why the worker is gone for good (None while it serves, warms up or drains)."""
        if self._fatal is None and self._started and not self._stopping \
                and not self._thread.is_alive():
            # Only `_run` ends the thread and it records why; this is the belt to its braces.
            return RuntimeError("the batcher thread ended")
        return self._fatal

    def submit(self, ids: Sequence[np.ndarray]) -> Job:
        """Queues one request's inputs; await `job.future` for the [n, dim] embeddings."""
        job = Job(ids, self.backend.dim, asyncio.get_running_loop())
        if job.n == 0:
            job.future.set_result(job.out)
            return job
        with self._cond:
            fatal = self.fatal
            if fatal is not None:
                raise Unavailable(f"the batcher's worker died ({_describe(fatal)}); this replica "
                                  "is restarting, retry on another one")
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
        if self._thread.is_alive() and self._fatal is None:  # a hung worker is not waited for
            self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm()
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- the thread's last word: report, fail, die
            self._die(e)

    def _warm(self) -> None:
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
        except Exception as e:  # noqa: BLE001 -- reported by /health, the server stays up
            log.exception("warm-up failed")
            self.error = e
        else:
            self.ready.set()
            self.metrics.ready.set(1)

    def _serve(self) -> None:
        failures = 0
        while True:
            items: list[tuple[Job, int]] = []
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue or self._fatal is not None:  # the watchdog gave up on us
                    return
                try:
                    self._take(items)
                except Exception as e:  # noqa: BLE001 -- the head job's inputs are unusable
                    bad = [job for job, _ in items]
                    if self._queue:
                        bad.append(head := self._queue.popleft())
                        self._queued_inputs -= head.n - head.taken
                    self._fail(bad, e)
                    items = []
                    failures += 1
            if items:
                self._in_hand = [job for job, _ in items]
                self._round_started = time.monotonic()
                try:
                    self._process(items)
                    failures = 0
                except Exception as e:  # noqa: BLE001 -- fail these requests, keep serving
                    self._fail(self._in_hand, e)
                    # A failed warm-up fails requests without being the worker's failure.
                    failures += not isinstance(e, Unavailable)
                self._round_started = None
                self._in_hand = []
            if failures >= self.max_failures:
                raise RuntimeError(f"{failures} rounds failed in a row (--max-consecutive-failures)"
                                   "; the last error is logged above")

    def _take(self, items: list[tuple[Job, int]]) -> None:
        """Inputs in arrival order until the token budget is full (at least one) into `items`.

        Holds the lock. Fills `items` in place, so that if it raises the caller knows what was
        taken.
        """
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
                    return
                items.append((job, job.taken))
                tokens += length
                job.taken += 1
                self._queued_inputs -= 1
            self._queue.popleft()

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
        if self.error is not None:  # queued while the warm-up was still running
            raise Unavailable(f"the model failed to warm up: {self.error}")
        emb = self.backend.embed_ids(ids)
        if emb.shape != (len(ids), self.backend.dim):
            raise RuntimeError(f"the backend returned {emb.shape} for {len(ids)} inputs of dim "
                               f"{self.backend.dim}")
        self.metrics.batch_duration.observe(time.perf_counter() - now)
        finished = []
        for k, (job, i) in enumerate(items):
            job.out[i] = emb[k]
            job.done += 1
            if job.done == job.n:
                finished.append(job)
        # Resolved only once every row is written: a failure above fails them all alike.
        for job in finished:
            self.metrics.inference_duration.observe(time.perf_counter() - job.t_first)
            _post(job, job.out)

    def _fail(self, jobs: Iterable[Job], error: BaseException) -> None:
        """Fails `jobs` with 503 and drops their inputs still queued."""
        if isinstance(error, Unavailable):  # the warm-up's: say that, not "a batch failed"
            failure = error
        else:
            log.error("worker round failed", exc_info=error)
            failure = BatchFailed(f"the device batch carrying this request failed "
                                  f"({_describe(error)}); retry")
        for job in {id(job): job for job in jobs}.values():
            job.cancelled = True  # its other inputs need not run
            _post(job, error=failure)

    def _watch(self) -> None:
        """The watchdog: a round on the device for longer than `stuck_after` kills the batcher."""
        period = min(1.0, self.stuck_after / 4)
        while not self._stopping and self._fatal is None:
            time.sleep(period)
            started = self._round_started
            if started is not None and time.monotonic() - started > self.stuck_after:
                self._die(RuntimeError(f"a device call has run for more than {self.stuck_after:g}"
                                       " s: the device is stuck"))
                return

    def _die(self, error: BaseException) -> None:
        """The worker ends for good: record why, fail every waiting request, tell the owner.

        Runs once, from the worker thread or the watchdog.
        """
        with self._dying:
            if self._fatal is not None:
                return
            self._fatal = error
        log.critical("the batcher's worker died; this replica cannot serve any more",
                     exc_info=error)
        self.ready.clear()
        failure = Unavailable(f"the batcher's worker died ({_describe(error)}); this replica is "
                              "restarting, retry on another one")
        with self._cond:
            jobs, self._queue = [*self._in_hand, *self._queue], collections.deque()
            self._queued_inputs = 0
        try:
            self.metrics.ready.set(0)
            for job in jobs:
                _post(job, error=failure)
        finally:
            if self.on_fatal is not None:
                self.on_fatal(error)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
