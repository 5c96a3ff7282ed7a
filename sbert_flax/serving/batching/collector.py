"""The collector thread: waits for each launched round's rows and writes them back.

Rounds come from the worker in launch order; each row goes into its request's output at its own
position, and a request's future is resolved once all its rows are in. Waiting here, not on the
worker, is what lets the worker pack the next round while this one computes.
"""

from __future__ import annotations

import time

import numpy as np

from sbert_flax.serving.backend import EncoderBackend
from sbert_flax.serving.batching.jobs import Job, post, row_width
from sbert_flax.serving.batching.state import BatchState
from sbert_flax.serving.batching.supervision import Supervisor
from sbert_flax.serving.prometheus import ServeMetrics


class Collector:
    """The collector thread's body (`run`).

    Args:
      state: the batcher's shared fields.
      supervisor: counts its failed rounds, and kills the batcher if it ends.
      backend: the encoder adapter (its widths, to check the rows).
      metrics: where device and inference times go.
    """

    def __init__(self, state: BatchState, supervisor: Supervisor, backend: EncoderBackend,
                 metrics: ServeMetrics):
        self.state = state
        self.supervisor = supervisor
        self.backend = backend
        self.metrics = metrics

    def run(self) -> None:
        try:
            self._collect()
        except BaseException as e:  # noqa: BLE001 -- the thread's last word: report, fail, die
            self.supervisor.die(e)
        finally:
            with self.state.cond:
                self.state.collector_done = True
                self.state.cond.notify_all()

    def _collect(self) -> None:
        s = self.state
        while True:
            with s.cond:
                while not s.rounds and s.fatal is None and not s.worker_done:
                    s.cond.wait()
                if s.fatal is not None or not s.rounds:  # dead, or drained and stopped
                    return
                rnd = s.rounds[0]
                s.round_started = time.monotonic()  # the watchdog's clock
            t0 = time.perf_counter()
            try:
                try:
                    emb = rnd.launched.result()
                finally:
                    with s.cond:  # the device is free: the worker may launch the next round
                        s.round_started = None
                        s.computing -= 1
                        s.cond.notify_all()
                self.metrics.batch_duration.observe(time.perf_counter() - t0)
                self._write_back(rnd.items, emb, rnd.output)
            except Exception as e:  # noqa: BLE001 -- fail these requests, keep serving
                self.supervisor.fail(rnd.jobs, e)
                with s.cond:
                    s.rounds.popleft()
                    s.cond.notify_all()
                    self.supervisor.failed()
                continue
            with s.cond:
                s.rounds.popleft()
                self.supervisor.succeeded()
                s.cond.notify_all()

    def _write_back(self, items: list[tuple[Job, int]], emb, output: str) -> None:
        dim = row_width(self.backend, output) if output != "token" else self.backend.dim
        if output != "token" and emb.shape != (len(items), dim):
            raise RuntimeError(f"the backend returned {emb.shape} for {len(items)} inputs of "
                               f"width {dim}")
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
            post(job, job.out)
