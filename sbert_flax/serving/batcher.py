"""Dynamic batching: one queue, a supervised worker thread that owns the encoder, a collector.

Requests put their tokenized inputs on the queue and await a future; the worker takes inputs in
arrival order until the token budget is full (so concurrent requests share a device batch, and a
big request is split over several), packs them and launches them on the precompiled shapes without
waiting (JAX dispatch is asynchronous); the collector thread waits for each round's rows, writes
each row into its request's output at its own position, and resolves a request's future once all
its rows are in. The asyncio event loop never waits on the device: it only hands work over and is
called back.

The pipeline: while one round computes, the worker takes and packs the next as soon as the queue
holds a full budget (it waits behind the first on the device), and the previous round's rows are
written back by the collector meanwhile. A partial queue waits for the device instead: what
arrives meanwhile joins it. With the device idle and the queue below the budget, the worker waits
up to `max_wait` seconds while requests are still being tokenized (`expect` / `arrived`, called by
the app), so that concurrent requests share one batch rather than the first of them running alone;
a lone request is never held (nothing else is arriving), nor a queue at the budget.

Two outputs share the queue: a job asks for pooled rows (`"sentence"`, /embed) or each token's
hidden state (`"token"`, /embed_all); a round carries one output only (they are different device
programs), so the worker closes a round at the first input of the other kind. Either way the work
goes through the same warm-up, drain, dead-worker and watchdog checks.

Supervision: an exception anywhere in one round (taking from the queue, packing, the device call,
writing the rows back) fails only the requests that round touched, with `BatchFailed`, and the
worker carries on. `max_failures` rounds failing in a row (the device is broken, not one bad
request), either thread ending any other way, or one device call running past `stuck_after`
seconds (a hung device; a watchdog thread notices) make the batcher *dead*: every waiting request
fails with `Unavailable`, nothing new is taken, `fatal` says why and `on_fatal` is called, so the
server can report 503 on /health and exit for its supervisor to restart it. The watchdog stays on
until both threads have ended, the drain of `stop` included, and `stop(timeout)` declares the
batcher dead when the drain outlasts it: a device that hangs while the server shuts down still
ends the process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from sbert_flax.serving.backend import EncoderBackend, Launched
from sbert_flax.serving.prometheus import ServeMetrics

log = logging.getLogger(__name__)

WARMUP_TEXT = "sbert-flax warm-up 句子"
# Failed rounds in a row after which the worker gives up. One bad request fails one round and the
# next good one resets the count; five in a row means the device (or the program on it) is
# broken, and a fresh process is the likeliest cure.
MAX_CONSECUTIVE_FAILURES = 5
# Seconds the worker may hold a partial batch for requests still being tokenized (--max-batch-wait).
# Long enough for a burst of concurrent requests to reach the queue, short beside any device call
# worth batching; a lone request is never held.
MAX_WAIT = 0.002
# Rounds launched and not yet written back: one computing, one packed and queued behind it.
MAX_ROUNDS = 2
# What a job asks for: pooled rows [n, dim], or each token's hidden state [len_i, dim] per input.
OUTPUTS = ("sentence", "token")


class Job:
    """One request's inputs on their way through the queue."""

    __slots__ = ("ids", "n", "output", "taken", "done", "out", "future", "loop", "cancelled",
                 "t_submit", "t_first")

    def __init__(self, ids: Sequence[np.ndarray], dim: int, loop: asyncio.AbstractEventLoop,
                 output: str = "sentence"):
        self.ids = ids
        self.n = len(ids)
        self.output = output
        self.taken = 0  # inputs handed to the device so far (worker thread only)
        self.done = 0  # rows written into `out` (worker thread only)
        self.out = np.empty((self.n, dim), np.float32) if output == "sentence" else [None] * self.n
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

    kind = "unhealthy"


class BatchFailed(Unavailable):
    """The round of the worker that carried this request's inputs raised; the worker carries on.

    503 too: the same request may well succeed on a retry (a transient device error) and is not
    known to be at fault.
    """

    kind = "backend"


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


class _Round:
    """One device batch on its way: its inputs, the launched work, when it was launched."""

    __slots__ = ("items", "launched", "t_launch", "output")

    def __init__(self, items: list[tuple[Job, int]], launched: Launched, t_launch: float,
                 output: str):
        self.items = items
        self.launched = launched
        self.t_launch = t_launch
        self.output = output


class Batcher:
    """The queue, the worker thread and the collector thread.

    Args:
      backend: the encoder adapter; only the worker thread calls its device methods (`launch`, or
        `embed_ids` / `embed_tokens` for a backend without it), only the collector waits for
        results.
      max_batch_tokens: real tokens gathered per round.
      metrics: where batch sizes and timings go.
      warmup: compile every shape and run a test batch before `ready` is set.
      max_failures: failed rounds in a row after which the worker gives up (the batcher is dead).
      on_fatal: called once, from the worker, collector or watchdog thread, when the batcher dies
        (the serve command shuts the server down from there).
      stuck_after: seconds one round may run before the worker counts as hung (None: never).
      max_wait: seconds a partial batch may wait for requests still being tokenized (0: never).
    """

    def __init__(self, backend: EncoderBackend, max_batch_tokens: int, metrics: ServeMetrics,
                 warmup: bool = True, max_failures: int = MAX_CONSECUTIVE_FAILURES,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 stuck_after: float | None = None, max_wait: float = MAX_WAIT):
        if max_failures < 1:
            raise ValueError(f"max_failures={max_failures} must be >= 1")
        if not max_wait >= 0:  # also refuses NaN
            raise ValueError(f"max_wait={max_wait} must be >= 0 seconds")
        # The test batch is tokenized here, on the caller's thread, before any request can be.
        self._warmup_ids = backend.tokenize([WARMUP_TEXT], truncate=True, direction="right")
        self.backend = backend
        self.max_batch_tokens = int(max_batch_tokens)
        self.metrics = metrics
        self.max_failures = int(max_failures)
        self.max_wait = float(max_wait)
        self.on_fatal = on_fatal
        self._warmup = warmup
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._started = False
        self._queued_inputs = 0
        self._arriving = 0  # requests being tokenized, on their way to `submit`
        self._fatal: BaseException | None = None
        self._failures = 0  # rounds failed in a row (under `_cond`)
        self._taking: list[Job] = []  # the jobs of the round the worker is packing/launching
        self._rounds: collections.deque[_Round] = collections.deque()  # launched, not written back
        self._computing = 0  # rounds launched whose rows have not come back yet
        self._worker_done = False
        self._collector_done = False
        self._launch_started: float | None = None  # time.monotonic() of the launch under way
        self._round_started: float | None = None  # ... of the round the collector waits for
        self.stuck_after = stuck_after
        self._dying = threading.Lock()
        self.ready = threading.Event()
        self.error: BaseException | None = None  # the warm-up's
        self.warmup_shapes = 0
        self._thread = threading.Thread(target=self._run, name="sbert-flax-batcher", daemon=True)
        self._collector = threading.Thread(target=self._run_collector,
                                           name="sbert-flax-batcher-collect", daemon=True)

    # ---- called from the event loop -------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._thread.start()
        self._collector.start()
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
                and not (self._thread.is_alive() and self._collector.is_alive()):
            # Only `_run` / `_run_collector` end the threads and they record why; this is the belt
            # to their braces.
            return RuntimeError("the batcher thread ended")
        return self._fatal

    def expect(self) -> None:
        """A request is being tokenized and will `submit` soon: a partial batch may wait for it.

        Pair each call with one `arrived`, after the request's `submit` (or its failure)."""
        with self._cond:
            self._arriving += 1

    def arrived(self) -> None:
        """The request `expect` announced is queued (or will not be)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, ids: Sequence[np.ndarray], output: str = "sentence") -> Job:
        """Queues one request's inputs; await `job.future` for the [n, dim] embeddings (`output=
        "token"`: a list of [len_i, dim] token embeddings)."""
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; expected one of {OUTPUTS}")
        job = Job(ids, self.backend.dim, asyncio.get_running_loop(), output)
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
            self._cond.notify_all()
        return job

    @property
    def draining(self) -> bool:
        """`stop` was called: what is queued finishes, nothing new is accepted."""
        return self._stopping

    def cancel(self, job: Job) -> None:
        """Drops the job's inputs that have not reached the device yet."""
        job.cancelled = True
        job.future.cancel()

    def stop(self, timeout: float | None = None) -> bool:
        """Finishes everything queued, then ends the worker and collector threads.

        Returns once both ended (True) or the batcher died (False): the watchdog caught a device
        call that hangs, or the drain outlasted `timeout` seconds, which makes the batcher dead
        too (`fatal` says so, `on_fatal` is called), so a process stopping on a hung device ends.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            if not self._started:
                return self._fatal is None
            ended = self._cond.wait_for(lambda: self._fatal is not None or self._ended, timeout)
        if not ended:
            self._die(RuntimeError(f"the drain did not finish within {timeout:g} s of the "
                                   "shutdown: the device is stuck"))
        return self._fatal is None

    @property
    def _ended(self) -> bool:
        """Both threads have returned."""
        return self._worker_done and self._collector_done

    # ---- the worker thread: take, pack, launch --------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm()
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- the thread's last word: report, fail, die
            self._die(e)
        finally:
            with self._cond:
                self._worker_done = True
                self._cond.notify_all()

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
        while True:
            items: list[tuple[Job, int]] = []
            with self._cond:
                if not self._wait_for_work():
                    return
                try:
                    self._take(items)
                except Exception as e:  # noqa: BLE001 -- the head job's inputs are unusable
                    bad = [job for job, _ in items]
                    if self._queue:
                        bad.append(head := self._queue.popleft())
                        self._queued_inputs -= head.n - head.taken
                    self._fail(bad, e)
                    self._failed()
                    continue
                if not items:  # every queued request was cancelled
                    continue
                self._taking = [job for job, _ in items]
            try:
                launched = self._launch(items)
            except Exception as e:  # noqa: BLE001 -- fail these requests, keep serving
                self._fail(self._taking, e)
                with self._cond:
                    self._taking = []
                    # A failed warm-up fails requests without being the worker's failure.
                    if not isinstance(e, Unavailable):
                        self._failed()
                continue
            with self._cond:
                self._rounds.append(_Round(items, launched, time.monotonic(), items[0][0].output))
                self._computing += 1
                self._taking = []
                self._cond.notify_all()

    def _wait_for_work(self) -> bool:
        """Holds the lock; returns once a round should be taken (False: the worker ends).

        A round is taken when the device is idle, or when one round computes and the queue holds
        a full budget (packed now, it is ready the moment the device is). With the device idle
        and a partial queue, waits up to `max_wait` for requests still being tokenized.
        """
        while True:
            if self._fatal is not None:  # the watchdog or the collector gave up on us
                return False
            if not self._queue:
                if self._stopping:
                    return False
            elif len(self._rounds) < MAX_ROUNDS and (self._computing == 0 or self._queue_full()):
                break
            self._cond.wait()
        if self._computing == 0 and self.max_wait > 0 and self._arriving > 0:
            deadline = time.monotonic() + self.max_wait
            while (self._arriving > 0 and not self._stopping and self._fatal is None
                   and not self._queue_full()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self._fatal is None and bool(self._queue)

    def _queue_full(self) -> bool:
        """The queue holds at least a budget of tokens (holds the lock; stops counting there)."""
        tokens = 0
        for job in self._queue:
            if job.cancelled:
                continue
            for i in range(job.taken, job.n):
                try:
                    tokens += len(job.ids[i])
                except TypeError:  # unusable input: take it now, `_take` fails its request
                    return True
                if tokens >= self.max_batch_tokens:
                    return True
        return False

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
            if items and job.output != items[0][0].output:  # another program: the next round
                return
            while job.taken < job.n:
                length = len(job.ids[job.taken])
                if items and tokens + length > self.max_batch_tokens:
                    return
                items.append((job, job.taken))
                tokens += length
                job.taken += 1
                self._queued_inputs -= 1
            self._queue.popleft()

    def _launch(self, items: list[tuple[Job, int]]) -> Launched:
        """Packs the round and starts it on the device (a backend without `launch`: runs it)."""
        output = items[0][0].output
        now = time.perf_counter()
        jobs = {id(job): job for job, _ in items}.values()
        for job in jobs:
            if job.t_first is None:
                job.t_first = now
                self.metrics.queue_duration.observe(now - job.t_submit)
        ids = [job.ids[i] for job, i in items]
        self.metrics.batch_size.observe(len(ids))
        tokens = sum(len(x) for x in ids)
        self.metrics.batch_tokens.observe(tokens)
        if self.error is not None:  # queued while the warm-up was still running
            raise Unavailable(f"the model failed to warm up: {self.error}")
        self._launch_started = time.monotonic()
        try:
            launch = getattr(self.backend, "launch", None)
            if launch is not None:
                launched = launch(ids, output)
            elif output == "sentence":
                launched = Launched.done(np.asarray(self.backend.embed_ids(ids)))
            else:
                launched = Launched.done_tokens(self.backend.embed_tokens(ids), self.backend.dim)
        finally:
            self._launch_started = None
        log.debug("round: %d inputs of %d requests, %d tokens, taken %.1f ms after the first "
                  "was queued, packed and launched in %.1f ms", len(ids), len(jobs), tokens,
                  1e3 * (now - min(job.t_submit for job in jobs)),
                  1e3 * (time.perf_counter() - now))
        return launched

    # ---- the collector thread: wait for rows, write them back ----------------------------------

    def _run_collector(self) -> None:
        try:
            self._collect()
        except BaseException as e:  # noqa: BLE001 -- the thread's last word: report, fail, die
            self._die(e)
        finally:
            with self._cond:
                self._collector_done = True
                self._cond.notify_all()

    def _collect(self) -> None:
        while True:
            with self._cond:
                while not self._rounds and self._fatal is None and not self._worker_done:
                    self._cond.wait()
                if self._fatal is not None or not self._rounds:  # dead, or drained and stopped
                    return
                rnd = self._rounds[0]
            t0 = time.perf_counter()
            self._round_started = time.monotonic()
            try:
                try:
                    emb = rnd.launched.result()
                finally:
                    self._round_started = None
                    with self._cond:  # the device is free: the worker may launch the next round
                        self._computing -= 1
                        self._cond.notify_all()
                self.metrics.batch_duration.observe(time.perf_counter() - t0)
                self._write_back(rnd.items, emb, rnd.output)
            except Exception as e:  # noqa: BLE001 -- fail these requests, keep serving
                self._fail([job for job, _ in rnd.items], e)
                with self._cond:
                    self._rounds.popleft()
                    self._cond.notify_all()
                    self._failed()
                continue
            with self._cond:
                self._rounds.popleft()
                self._failures = 0
                self._cond.notify_all()

    def _write_back(self, items: list[tuple[Job, int]], emb, output: str) -> None:
        dim = self.backend.dim
        if output == "sentence" and emb.shape != (len(items), dim):
            raise RuntimeError(f"the backend returned {emb.shape} for {len(items)} inputs of dim "
                               f"{dim}")
        if output == "token":
            shapes = [np.shape(e) for e in emb]
            if len(emb) != len(items) or any(len(sh) != 2 or sh[1] != dim for sh in shapes):
                raise RuntimeError(f"the backend returned token embeddings of shapes {shapes} "
                                   f"for {len(items)} inputs of dim {dim}")
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

    # ---- failures --------------------------------------------------------------------------------

    def _failed(self) -> None:
        """Counts one failed round (holds the lock); too many in a row end the calling thread."""
        self._failures += 1
        if self._failures >= self.max_failures:
            raise RuntimeError(f"{self._failures} rounds failed in a row "
                               "(--max-consecutive-failures); the last error is logged above")

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
        """The watchdog: a device call running longer than `stuck_after` kills the batcher.

        It watches until both threads have ended, not until `stop`: the drain's device calls
        hang as well as any.
        """
        period = min(1.0, self.stuck_after / 4)
        while self._fatal is None and not self._ended:
            time.sleep(period)
            now = time.monotonic()
            for started in (self._launch_started, self._round_started):
                if started is not None and now - started > self.stuck_after:
                    self._die(RuntimeError(f"a device call has run for more than "
                                           f"{self.stuck_after:g} s: the device is stuck"))
                    return

    def _die(self, error: BaseException) -> None:
        """The worker ends for good: record why, fail every waiting request, tell the owner.

        Runs once, from the worker, the collector or the watchdog thread.
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
            in_hand = [*self._taking, *(job for rnd in self._rounds for job, _ in rnd.items)]
            jobs, self._queue = [*in_hand, *self._queue], collections.deque()
            self._queued_inputs = 0
            self._cond.notify_all()  # the other thread sees `_fatal` and ends
        try:
            self.metrics.ready.set(0)
            for job in {id(job): job for job in jobs}.values():
                _post(job, error=failure)
        finally:
            if self.on_fatal is not None:
                self.on_fatal(error)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
