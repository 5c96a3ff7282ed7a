"""What the batcher's threads share: one condition and every mutable field it guards.

The rule (`serving/batcher.py` has the table of who writes each field): every field below but
`cond` and `ready` is read and written with `cond` held, whichever thread does it; `ready` is a
`threading.Event`. `cond` wraps a re-entrant lock, so a step that already holds it (the worker
failing a round inside its take) may call one that takes it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from sbert_flax.serving.backend import Launched
from sbert_flax.serving.batching.jobs import Job

# Rounds launched and not yet written back: one computing, one packed and queued behind it.
MAX_ROUNDS = 2


class Round:
    """One device batch on its way from the worker to the collector: its inputs, the launched
    work and its output kind. Never changed once made."""

    __slots__ = ("items", "launched", "output")

    def __init__(self, items: list[tuple[Job, int]], launched: Launched, output: str):
        self.items = items
        self.launched = launched
        self.output = output

    @property
    def jobs(self) -> list[Job]:
        return [job for job, _ in self.items]


class BatchState:
    """The batcher's shared fields, grouped by the piece that mostly writes them."""

    def __init__(self, on_fatal: Callable[[BaseException], None] | None):
        self.cond = threading.Condition(threading.RLock())
        self.ready = threading.Event()  # the warm-up passed and the batcher is alive
        # ---- intake
        self.queue: collections.deque[Job] = collections.deque()
        self.queued_inputs = 0  # inputs queued and not yet taken
        self.arriving = 0  # requests being tokenized, on their way to `submit`
        self.started = False
        self.stopping = False
        # ---- the worker's warm-up
        self.error: BaseException | None = None  # why the warm-up failed
        self.warmup_shapes = 0
        # ---- the pipeline: worker -> collector
        self.taking: list[Job] = []  # the jobs of the round the worker is packing/launching
        self.rounds: collections.deque[Round] = collections.deque()  # launched, not written back
        self.computing = 0  # rounds launched whose rows have not come back yet
        self.launch_started: float | None = None  # time.monotonic() of the launch under way
        self.round_started: float | None = None  # ... of the round the collector waits for
        # ---- supervision
        self.failures = 0  # rounds failed in a row
        self.fatal: BaseException | None = None  # why the batcher died
        self.on_fatal = on_fatal
        self.worker_done = False
        self.collector_done = False

    @property
    def ended(self) -> bool:
        """Both threads have returned (holds `cond`)."""
        return self.worker_done and self.collector_done

    def clear(self) -> list[Job]:
        """Every job in hand (being launched, or launched and not written back) or queued, in
        that order; the queue is emptied (holds `cond`)."""
        jobs = [*self.taking, *(job for rnd in self.rounds for job in rnd.jobs), *self.queue]
        self.queue = collections.deque()
        self.queued_inputs = 0
        return jobs
