"""The queue side of the batcher: requests come in, the worker takes rounds out.

The event loop admits jobs, announces requests still being tokenized (`expect` / `arrived`) and
cancels jobs whose client is gone; the worker waits for work and takes one round's inputs, in
arrival order, under the token budget. The loop's half takes the batcher's condition itself (or
is called with it held: `admit`); the worker's half is called with it held.
"""

from __future__ import annotations

import time

from sbert_flax.serving.batching.jobs import Job, Unavailable, describe
from sbert_flax.serving.batching.state import MAX_ROUNDS, BatchState
from sbert_flax.serving.prometheus import ServeMetrics


class Intake:
    """The queue of `state` and the rules for taking from it.

    Args:
      state: the batcher's shared fields.
      max_batch_tokens: real tokens gathered per round.
      max_wait: seconds a partial batch may wait for requests still being tokenized (0: never).
      metrics: where dropped inputs are counted.
    """

    def __init__(self, state: BatchState, max_batch_tokens: int, max_wait: float,
                 metrics: ServeMetrics):
        self.state = state
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait
        self.metrics = metrics

    # ---- the event loop ---------------------------------------------------------------------------

    def admit(self, job: Job, fatal: BaseException | None) -> None:
        """Queues `job`, or refuses it: raises `Unavailable` when the batcher is dead (`fatal`)
        or draining, fails its future when the warm-up failed. Holds the condition."""
        s = self.state
        if fatal is not None:
            raise Unavailable(f"the batcher's worker died ({describe(fatal)}); this replica "
                              "is restarting, retry on another one")
        if s.stopping:
            raise Unavailable("the batcher is stopped: the server is shutting down (draining); "
                              "retry on another replica")
        if s.error is not None:  # fail at once rather than queue behind a dead model
            job.future.set_exception(Unavailable(f"the model failed to warm up: {s.error}"))
            return
        s.queue.append(job)
        s.queued_inputs += job.n
        s.cond.notify_all()

    def expect(self) -> None:
        with self.state.cond:
            self.state.arriving += 1

    def arrived(self) -> None:
        with self.state.cond:
            self.state.arriving -= 1
            self.state.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drops the job's inputs that have not reached the device yet."""
        with self.state.cond:
            job.cancelled = True
        job.future.cancel()

    # ---- the worker -------------------------------------------------------------------------------

    def wait_for_work(self) -> bool:
        """Holds the condition; returns once a round should be taken (False: the worker ends).

        A round is taken when the device is idle, or when one round computes and the queue holds
        a full budget (packed now, it is ready the moment the device is). With the device idle
        and a partial queue, waits up to `max_wait` for requests still being tokenized.
        """
        s = self.state
        while True:
            if s.fatal is not None:  # the watchdog or the collector gave up on us
                return False
            if not s.queue:
                if s.stopping:
                    return False
            elif len(s.rounds) < MAX_ROUNDS and (s.computing == 0 or self._queue_full()):
                break
            s.cond.wait()
        if s.computing == 0 and self.max_wait > 0 and s.arriving > 0:
            deadline = time.monotonic() + self.max_wait
            while (s.arriving > 0 and not s.stopping and s.fatal is None
                   and not self._queue_full()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.cond.wait(left)
        return s.fatal is None and bool(s.queue)

    def _queue_full(self) -> bool:
        """The queue holds at least a budget of tokens (holds the condition; stops counting
        there)."""
        tokens = 0
        for job in self.state.queue:
            if job.cancelled:
                continue
            for i in range(job.taken, job.n):
                try:
                    tokens += len(job.ids[i])
                except TypeError:  # unusable input: take it now, `take` fails its request
                    return True
                if tokens >= self.max_batch_tokens:
                    return True
        return False

    def take(self, items: list[tuple[Job, int]]) -> None:
        """Inputs in arrival order until the token budget is full (at least one) into `items`.

        Holds the condition. Fills `items` in place, so that if it raises the caller knows what
        was taken. A round carries one output kind: it ends at the first input of another.
        """
        s = self.state
        tokens = 0
        while s.queue:
            job = s.queue[0]
            if job.cancelled:
                s.queue.popleft()
                left = job.n - job.taken
                s.queued_inputs -= left
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
                s.queued_inputs -= 1
            s.queue.popleft()

    def pop_head(self) -> Job | None:
        """Removes the job at the head of the queue, whose input `take` could not use (holds the
        condition)."""
        s = self.state
        if not s.queue:
            return None
        head = s.queue.popleft()
        s.queued_inputs -= head.n - head.taken
        return head
