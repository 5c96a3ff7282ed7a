"""The batcher's supervision: failed rounds, the watchdog, death, and the drain of `stop`.

An exception in one round fails only the requests that round touched (`fail`); `max_failures`
rounds failing in a row (`failed`), either thread ending any other way, one device call running
past `stuck_after` seconds (`watch`) or a drain outlasting `stop`'s timeout make the batcher dead
(`die`): every waiting request fails with `Unavailable`, nothing new is taken, and `on_fatal` is
called once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from sbert_flax.serving.batching.jobs import (
    LOGGER,
    BatchFailed,
    Job,
    Unavailable,
    describe,
    post,
    unique,
)
from sbert_flax.serving.batching.state import BatchState
from sbert_flax.serving.prometheus import ServeMetrics

log = logging.getLogger(LOGGER)


class Supervisor:
    """Counts failures, watches the device calls, and kills the batcher when it must.

    Args:
      state: the batcher's shared fields.
      metrics: its `ready` gauge drops when the batcher dies.
      max_failures: failed rounds in a row after which the batcher is dead.
      stuck_after: seconds one device call may run before it counts as hung (None: never).
    """

    def __init__(self, state: BatchState, metrics: ServeMetrics, max_failures: int,
                 stuck_after: float | None):
        self.state = state
        self.metrics = metrics
        self.max_failures = max_failures
        self.stuck_after = stuck_after

    # ---- one round ------------------------------------------------------------------------------

    def failed(self) -> None:
        """Counts one failed round (holds the condition); too many in a row raise, which ends
        the calling thread and so the batcher."""
        self.state.failures += 1
        if self.state.failures >= self.max_failures:
            raise RuntimeError(f"{self.state.failures} rounds failed in a row "
                               "(--max-consecutive-failures); the last error is logged above")

    def succeeded(self) -> None:
        """A round was written back: the failures in a row start over (holds the condition)."""
        self.state.failures = 0

    def fail(self, jobs: Iterable[Job], error: BaseException) -> None:
        """Fails `jobs` with 503 and drops their inputs still queued."""
        if isinstance(error, Unavailable):  # the warm-up's: say that, not "a batch failed"
            failure = error
        else:
            log.error("worker round failed", exc_info=error)
            failure = BatchFailed(f"the device batch carrying this request failed "
                                  f"({describe(error)}); retry")
        jobs = unique(jobs)
        with self.state.cond:
            for job in jobs:
                job.cancelled = True  # its other inputs need not run
        for job in jobs:
            post(job, error=failure)

    # ---- the batcher's life -------------------------------------------------------------------

    def watch(self) -> None:
        """The watchdog thread: a device call running longer than `stuck_after` kills the
        batcher.

        It watches until both threads have ended, not until `stop`: the drain's device calls
        hang as well as any.
        """
        s = self.state
        period = min(1.0, self.stuck_after / 4)
        while True:
            with s.cond:
                if s.fatal is not None or s.ended:
                    return
            time.sleep(period)
            now = time.monotonic()
            with s.cond:
                calls = (s.launch_started, s.round_started)
            for started in calls:
                if started is not None and now - started > self.stuck_after:
                    self.die(RuntimeError(f"a device call has run for more than "
                                          f"{self.stuck_after:g} s: the device is stuck"))
                    return

    def stop(self, timeout: float | None) -> bool:
        """Lets the threads finish everything queued and waits for them to end (True), or for
        the batcher to die (False); a drain that outlasts `timeout` seconds kills it."""
        s = self.state
        with s.cond:
            s.stopping = True
            s.cond.notify_all()
            if not s.started:
                return s.fatal is None
            ended = s.cond.wait_for(lambda: s.fatal is not None or s.ended, timeout)
        if not ended:
            self.die(RuntimeError(f"the drain did not finish within {timeout:g} s of the "
                                  "shutdown: the device is stuck"))
        with s.cond:
            return s.fatal is None

    def die(self, error: BaseException) -> None:
        """The batcher ends for good: record why, fail every waiting request, tell the owner.

        Runs once, from the worker, the collector, the watchdog or `stop`'s thread.
        """
        s = self.state
        with s.cond:
            if s.fatal is not None:
                return
            s.fatal = error
            s.ready.clear()
            jobs = s.clear()
            on_fatal = s.on_fatal
            s.cond.notify_all()  # the other threads see `fatal` and end
        log.critical("the batcher's worker died; this replica cannot serve any more",
                     exc_info=error)
        failure = Unavailable(f"the batcher's worker died ({describe(error)}); this replica is "
                              "restarting, retry on another one")
        try:
            self.metrics.ready.set(0)
            for job in unique(jobs):
                post(job, error=failure)
        finally:
            if on_fatal is not None:
                on_fatal(error)

