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

Three outputs share the queue: a job asks for pooled rows (`"sentence"`, /embed), each token's
hidden state (`"token"`, /embed_all) or, on a server with a cross-encoder, logits per token-id
pair (`"score"`, /rerank and /predict; see `serving/rerank_backend.py`). A round carries one output
only (they are different device programs), so the worker closes a round at the first input of
another kind. Every kind goes through the same warm-up, drain, dead-worker and watchdog checks.

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

The pieces (`serving/batching/`): `jobs` (Job, the errors, resolving futures on their loop),
`state` (the shared fields), `intake` (the queue), `worker`, `collector`, `supervision`; this
module assembles them into `Batcher`.

Which thread owns which state
-----------------------------
The threads: the *caller* (the event loop: `submit`, `expect`, `arrived`, `cancel`, the
properties; and whoever calls `start` and `stop`), the *worker*, the *collector*, the *watchdog*,
and the *dying* thread (whichever of worker, collector, watchdog or `stop` kills the batcher).

The rule: a field that one thread writes and another reads lives in `BatchState` and is read and
written only with `BatchState.cond` held (one lock, so no lock order to get wrong). Everything else
is immutable once `start` is called (the constructor's arguments, the pieces, the thread objects,
a launched `Round`), a `threading.Event` (`ready`), or touched by one thread only.

    BatchState field   written by                          read by (under `cond`)
    queue              caller (admit), worker (take),      worker (wait, take), dying
                       dying (emptied)
    queued_inputs      caller, worker, dying               caller (`queued_inputs`, /metrics)
    arriving           caller (expect / arrived)           worker (wait for work)
    started            caller (`start`)                    caller (`fatal`), `stop`
    stopping           `stop`                              caller (admit, `draining`, `fatal`),
                                                           worker (wait for work)
    error              worker (warm-up)                    caller (admit, `error`), worker
    warmup_shapes      worker (warm-up)                    caller (/info)
    taking             worker                              dying
    rounds             worker (append), collector (pop)    worker (wait), collector, dying
    computing          worker (+1), collector (-1)         worker (wait for work)
    launch_started     worker, around a launch             watchdog
    round_started      collector, around a result          watchdog
    failures           worker, collector                   worker, collector
    fatal              dying (once)                        all of them
    on_fatal           caller (constructor, `on_fatal =`)  dying
    worker_done        worker, at its end                  collector, watchdog, `stop`
    collector_done     collector, at its end               watchdog, `stop`
    ready (an Event)   worker (set after the warm-up,      caller (/health, /info)
                       unless dead), dying (clear)

    Job field          written by                          read by
    ids, n, output,    caller (constructor), never again   all
      loop, t_submit
    future             resolved on its loop only: `post` hands the outcome over from a thread
    taken              worker, under `cond`                worker
    cancelled          caller (`cancel`), worker and       worker (take), under `cond`
                       collector (a failed round); under
                       `cond`
    t_first            worker (first launch)               collector (inference time): published
                                                           by `cond` with the round
    out, done          collector only                      caller, once the future resolved
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import numpy as np

from sbert_flax.serving.backend import EncoderBackend
from sbert_flax.serving.batching.collector import Collector
from sbert_flax.serving.batching.intake import Intake
from sbert_flax.serving.batching.jobs import OUTPUTS, BatchFailed, Job, Unavailable, row_width
from sbert_flax.serving.batching.state import MAX_ROUNDS, BatchState
from sbert_flax.serving.batching.supervision import Supervisor
from sbert_flax.serving.batching.worker import Worker
from sbert_flax.serving.prometheus import ServeMetrics

__all__ = ["MAX_CONSECUTIVE_FAILURES", "MAX_ROUNDS", "MAX_WAIT", "OUTPUTS", "WARMUP_TEXT",
           "BatchFailed", "Batcher", "Job", "Unavailable"]

WARMUP_TEXT = "sbert-flax warm-up 句子"
# Failed rounds in a row after which the worker gives up. One bad request fails one round and the
# next good one resets the count; five in a row means the device (or the program on it) is
# broken, and a fresh process is the likeliest cure.
MAX_CONSECUTIVE_FAILURES = 5
# Seconds the worker may hold a partial batch for requests still being tokenized (--max-batch-wait).
# Long enough for a burst of concurrent requests to reach the queue, short beside any device call
# worth batching; a lone request is never held.
MAX_WAIT = 0.002


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
      on_fatal: called once, from the worker, collector, watchdog or `stop`'s thread, when the
        batcher dies (the serve command shuts the server down from there).
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
        warmup_ids = backend.tokenize([WARMUP_TEXT], truncate=True, direction="right")
        self.backend = backend
        self.max_batch_tokens = int(max_batch_tokens)
        self.metrics = metrics
        self.max_failures = int(max_failures)
        self.max_wait = float(max_wait)
        self.stuck_after = stuck_after
        self._state = state = BatchState(on_fatal)
        self.ready: threading.Event = state.ready
        self._intake = Intake(state, self.max_batch_tokens, self.max_wait, metrics)
        self._supervisor = Supervisor(state, metrics, self.max_failures, stuck_after)
        worker = Worker(state, self._intake, self._supervisor, backend, metrics, warmup,
                        warmup_ids)
        collector = Collector(state, self._supervisor, backend, metrics)
        self._thread = threading.Thread(target=worker.run, name="sbert-flax-batcher", daemon=True)
        self._collector = threading.Thread(target=collector.run,
                                           name="sbert-flax-batcher-collect", daemon=True)

    # ---- the owner ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._state.cond:
            self._state.started = True
        self._thread.start()
        self._collector.start()
        if self.stuck_after is not None:
            threading.Thread(target=self._supervisor.watch, name="sbert-flax-batcher-watchdog",
                             daemon=True).start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finishes everything queued, then ends the worker and collector threads.

        Returns once both ended (True) or the batcher died (False): the watchdog caught a device
        call that hangs, or the drain outlasted `timeout` seconds, which makes the batcher dead
        too (`fatal` says so, `on_fatal` is called), so a process stopping on a hung device ends.
        """
        return self._supervisor.stop(timeout)

    @property
    def on_fatal(self) -> Callable[[BaseException], None] | None:
        with self._state.cond:
            return self._state.on_fatal

    @on_fatal.setter
    def on_fatal(self, callback: Callable[[BaseException], None] | None) -> None:
        with self._state.cond:
            self._state.on_fatal = callback

    # ---- what the routes read ---------------------------------------------------------------------

    @property
    def queued_inputs(self) -> int:
        with self._state.cond:
            return self._state.queued_inputs

    @property
    def fatal(self) -> BaseException | None:
        """Why the worker is gone for good (None while it serves, warms up or drains)."""
        s = self._state
        with s.cond:
            if s.fatal is None and s.started and not s.stopping \
                    and not (self._thread.is_alive() and self._collector.is_alive()):
                # Only the threads' own `run` ends them, and it records why; this is the belt to
                # their braces.
                return RuntimeError("the batcher thread ended")
            return s.fatal

    @property
    def draining(self) -> bool:
        """`stop` was called: what is queued finishes, nothing new is accepted."""
        with self._state.cond:
            return self._state.stopping

    @property
    def error(self) -> BaseException | None:
        """Why the warm-up failed (None: it passed, or has not finished)."""
        with self._state.cond:
            return self._state.error

    @property
    def warmup_shapes(self) -> int:
        """The shapes the warm-up compiled (0 until it has)."""
        with self._state.cond:
            return self._state.warmup_shapes

    # ---- the requests -----------------------------------------------------------------------------

    def expect(self) -> None:
        """A request is being tokenized and will `submit` soon: a partial batch may wait for it.

        Pair each call with one `arrived`, after the request's `submit` (or its failure)."""
        self._intake.expect()

    def arrived(self) -> None:
        """The request `expect` announced is queued (or will not be)."""
        self._intake.arrived()

    def submit(self, ids: Sequence[np.ndarray], output: str = "sentence") -> Job:
        """Queues one request's inputs; await `job.future` for the [n, dim] embeddings (`output=
        "token"`: a list of [len_i, dim] token embeddings; `"score"`: [n, labels] logits)."""
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; expected one of {OUTPUTS}")
        job = Job(ids, row_width(self.backend, output), asyncio.get_running_loop(), output)
        if job.n == 0:
            job.future.set_result(job.out)
            return job
        # One step under the lock: a death or a `stop` cannot slip between the checks and the
        # append.
        with self._state.cond:
            self._intake.admit(job, self.fatal)
        return job

    def cancel(self, job: Job) -> None:
        """Drops the job's inputs that have not reached the device yet."""
        self._intake.cancel(job)
