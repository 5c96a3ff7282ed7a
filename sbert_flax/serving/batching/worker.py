"""The worker thread: warms the backend up, then takes, packs and launches one round at a time.

It is the only thread that calls the backend's device methods (`warmup`, `launch`, or `embed_ids`
/ `embed_tokens` / `score_ids` for a backend without `launch`). A launch does not wait for the
device (JAX dispatch is asynchronous): the round goes to the collector, and the worker takes the
next one as soon as `Intake.wait_for_work` says so.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from sbert_flax.serving.backend import EncoderBackend, Launched
from sbert_flax.serving.batching.intake import Intake
from sbert_flax.serving.batching.jobs import LOGGER, Job, Unavailable, unique
from sbert_flax.serving.batching.state import BatchState, Round
from sbert_flax.serving.batching.supervision import Supervisor
from sbert_flax.serving.prometheus import ServeMetrics

log = logging.getLogger(LOGGER)


class Worker:
    """The worker thread's body (`run`).

    Args:
      state: the batcher's shared fields.
      intake: the queue it takes rounds from.
      supervisor: counts its failed rounds, and kills the batcher if it ends.
      backend: the encoder adapter.
      metrics: where batch sizes and queue times go.
      warmup: compile every shape and run a test batch before `ready` is set.
      warmup_ids: the test batch's token ids.
    """

    def __init__(self, state: BatchState, intake: Intake, supervisor: Supervisor,
                 backend: EncoderBackend, metrics: ServeMetrics, warmup: bool,
                 warmup_ids: list[np.ndarray]):
        self.state = state
        self.intake = intake
        self.supervisor = supervisor
        self.backend = backend
        self.metrics = metrics
        self.warmup = warmup
        self.warmup_ids = warmup_ids

    def run(self) -> None:
        try:
            self._warm()
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- the thread's last word: report, fail, die
            self.supervisor.die(e)
        finally:
            with self.state.cond:
                self.state.worker_done = True
                self.state.cond.notify_all()

    def _warm(self) -> None:
        s = self.state
        try:
            if self.warmup:
                t0 = time.perf_counter()
                shapes = self.backend.warmup()
                with s.cond:
                    s.warmup_shapes = shapes
                # The test batch: tokenizer, device and result path all work end to end.
                test_round = getattr(self.backend, "test_round", None)  # rerank: its own checks
                if test_round is not None:
                    test_round(self.warmup_ids)
                else:
                    emb = self.backend.embed_ids(self.warmup_ids)
                    if emb.shape != (1, self.backend.dim) or not np.isfinite(emb).all():
                        raise RuntimeError(f"warm-up batch returned {emb.shape}, "
                                           f"finite={np.isfinite(emb).all()}")
                log.info("warm-up: %d shapes compiled in %.1f s", shapes,
                         time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- reported by /health, the server stays up
            log.exception("warm-up failed")
            with s.cond:
                s.error = e
        else:
            with s.cond:
                if s.fatal is None:  # a drain that timed out may have killed it meanwhile
                    s.ready.set()
                    self.metrics.ready.set(1)

    def _serve(self) -> None:
        s = self.state
        while True:
            items: list[tuple[Job, int]] = []
            with s.cond:
                if not self.intake.wait_for_work():
                    return
                try:
                    self.intake.take(items)
                except Exception as e:  # noqa: BLE001 -- the head job's inputs are unusable
                    bad = [job for job, _ in items]
                    head = self.intake.pop_head()
                    if head is not None:
                        bad.append(head)
                    self.supervisor.fail(bad, e)
                    self.supervisor.failed()
                    continue
                if not items:  # every queued request was cancelled
                    continue
                s.taking = jobs = unique(job for job, _ in items)
            try:
                launched = self._launch(items)
            except Exception as e:  # noqa: BLE001 -- fail these requests, keep serving
                self.supervisor.fail(jobs, e)
                with s.cond:
                    s.taking = []
                    # A failed warm-up fails requests without being the worker's failure.
                    if not isinstance(e, Unavailable):
                        self.supervisor.failed()
                continue
            with s.cond:
                s.rounds.append(Round(items, launched, items[0][0].output))
                s.computing += 1
                s.taking = []
                s.cond.notify_all()

    def _launch(self, items: list[tuple[Job, int]]) -> Launched:
        """Packs the round and starts it on the device (a backend without `launch`: runs it)."""
        s = self.state
        output = items[0][0].output
        now = time.perf_counter()
        jobs = unique(job for job, _ in items)
        for job in jobs:
            if job.t_first is None:
                job.t_first = now
                self.metrics.queue_duration.observe(now - job.t_submit)
        ids = [job.ids[i] for job, i in items]
        self.metrics.batch_size.observe(len(ids))
        tokens = sum(len(x) for x in ids)
        self.metrics.batch_tokens.observe(tokens)
        with s.cond:
            if s.error is not None:  # queued while the warm-up was still running
                raise Unavailable(f"the model failed to warm up: {s.error}")
            s.launch_started = time.monotonic()  # the watchdog's clock
        try:
            launch = getattr(self.backend, "launch", None)
            if launch is not None:
                launched = launch(ids, output)
            elif output == "sentence":
                launched = Launched.done(np.asarray(self.backend.embed_ids(ids)))
            elif output == "score":
                launched = Launched.done(np.asarray(self.backend.score_ids(ids)))
            else:
                launched = Launched.done_tokens(self.backend.embed_tokens(ids), self.backend.dim)
        finally:
            with s.cond:
                s.launch_started = None
        log.debug("round: %d inputs of %d requests, %d tokens, taken %.1f ms after the first "
                  "was queued, packed and launched in %.1f ms", len(ids), len(jobs), tokens,
                  1e3 * (now - min(job.t_submit for job in jobs)),
                  1e3 * (time.perf_counter() - now))
        return launched
