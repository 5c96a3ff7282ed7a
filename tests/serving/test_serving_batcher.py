"""The dynamic batcher alone, on a fake backend whose device call can be held: concurrent
requests merge under the token budget, a big request is split and reassembled in order, a
cancelled request's queued inputs never reach the device, a failed batch fails only its
requests, a failed warm-up keeps the server unready, /embed_all's token rounds never mix with
sentence rounds, and a device that hangs in the drain still ends `stop`."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from helpers import wait_for

from sbert_flax.serving.batcher import Batcher, BatchFailed, Unavailable
from sbert_flax.serving.prometheus import ServeMetrics

WAIT_S = 120  # ceiling of every wait on the batcher's threads (a loaded CI host is slow)


class FakeBackend:
    """embed_ids returns [marker, length, 0, 0] per input (marker = the input's token id), and
    embed_tokens [marker, position, 0, 0] per token; while `gate` is clear the device call
    blocks, so requests pile up in the queue; an input of `HANG` blocks it until `hang` is set.
    `outputs` lists each round's output kind in order."""

    dim = 4

    def __init__(self, fail_marker: int | None = None, fail_warmup: bool = False):
        self.batches: list[list[int]] = []
        self.token_batches: list[list[int]] = []
        self.outputs: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.hang = threading.Event()
        self.entered = threading.Semaphore(0)
        self.fail_marker = fail_marker
        self.fail_warmup = fail_warmup

    def tokenize(self, texts, *, truncate, direction):
        return [np.array([WARMUP, 2], np.int32) for _ in texts]

    def warmup(self) -> int:
        if self.fail_warmup:
            raise RuntimeError("no device")
        return 1

    def _device(self, markers: list[int]) -> None:
        if markers != [WARMUP]:  # the warm-up batch is never held
            self.entered.release()
            self.gate.wait()
        if HANG in markers:
            self.hang.wait(WAIT_S)
        if self.fail_marker in markers:
            raise RuntimeError("device error")

    def embed_ids(self, ids):
        markers = [int(x[0]) for x in ids]
        self.outputs.append("sentence")
        self.batches.append(markers)
        self._device(markers)
        return np.array([[m, len(x), 0, 0] for m, x in zip(markers, ids, strict=True)], np.float32)

    def embed_tokens(self, ids):
        markers = [int(x[0]) for x in ids]
        self.outputs.append("token")
        self.token_batches.append(markers)
        self._device(markers)
        return [np.array([[m, i, 0, 0] for i in range(len(x))], np.float32)
                for m, x in zip(markers, ids, strict=True)]


WARMUP = 999
HANG = 77


def seq(marker: int, length: int) -> np.ndarray:
    return np.full(length, marker, np.int32)


def counted(counter) -> float:
    """A counter's value (sbert_flax.serving.prometheus' own metric objects)."""
    return counter.value


def make(backend: FakeBackend, budget: int = 10) -> tuple[Batcher, ServeMetrics]:
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    return Batcher(backend, budget, metrics, warmup=True), metrics


async def hold_first_batch(backend: FakeBackend, batcher: Batcher):
    """Submits one input and returns once the worker is blocked inside the device call."""
    backend.gate.clear()
    job = batcher.submit([seq(100, 3)])
    await asyncio.to_thread(backend.entered.acquire)  # our batch, now held
    return job


def test_merge_split_reassemble_in_order():
    backend = FakeBackend()
    batcher, metrics = make(backend, budget=10)

    async def run():
        batcher.start()
        first = await hold_first_batch(backend, batcher)
        a = batcher.submit([seq(1, 4), seq(2, 4)])
        b = batcher.submit([seq(3, 2)])
        c = batcher.submit([seq(10 + i, 5) for i in range(5)])  # 25 tokens: three batches
        backend.gate.set()
        return await asyncio.gather(first.future, a.future, b.future, c.future)

    first, a, b, c = asyncio.run(run())
    batcher.stop(10)
    # Warm-up, the held batch, then a and b merged with c's head, c's rest split by the budget.
    assert backend.batches[1:] == [[100], [1, 2, 3], [10, 11], [12, 13], [14]]
    assert a[:, 0].tolist() == [1, 2] and b[:, 0].tolist() == [3]
    assert c[:, 0].tolist() == [10, 11, 12, 13, 14] and c[:, 1].tolist() == [5] * 5
    assert batcher.ready.is_set() and batcher.queued_inputs == 0


def test_cancelled_requests_never_reach_the_device():
    backend = FakeBackend()
    batcher, metrics = make(backend)

    async def run():
        batcher.start()
        first = await hold_first_batch(backend, batcher)
        gone = batcher.submit([seq(7, 2), seq(8, 2), seq(9, 2)])
        stays = batcher.submit([seq(5, 2)])
        batcher.cancel(gone)  # the client disconnected
        backend.gate.set()
        await first.future
        out = await stays.future
        with pytest.raises(asyncio.CancelledError):
            await gone.future
        return out

    out = asyncio.run(run())
    batcher.stop(10)
    assert out[:, 0].tolist() == [5]
    assert not {7, 8, 9} & {m for batch in backend.batches for m in batch}
    assert counted(metrics.dropped_inputs) == 3


def test_a_failed_batch_fails_only_its_requests():
    backend = FakeBackend(fail_marker=66)
    batcher, _ = make(backend, budget=2)

    async def run():
        batcher.start()
        bad = batcher.submit([seq(66, 2), seq(67, 2)])
        good = batcher.submit([seq(4, 2)])
        with pytest.raises(RuntimeError, match="device error"):
            await bad.future
        return await good.future

    assert asyncio.run(run())[:, 0].tolist() == [4]
    batcher.stop(10)
    assert [67] not in backend.batches  # the rest of the failed request was dropped


def test_failed_warmup_keeps_unready_and_fails_requests():
    batcher, metrics = make(FakeBackend(fail_warmup=True))

    async def run():
        batcher.start()
        job = batcher.submit([seq(1, 2)])
        with pytest.raises(RuntimeError, match="failed to warm up"):
            await job.future

    asyncio.run(run())
    batcher.stop(10)
    assert not batcher.ready.is_set() and "no device" in str(batcher.error)


def test_stop_drains_the_queue():
    backend = FakeBackend()
    batcher, _ = make(backend, budget=4)

    async def run():
        batcher.start()
        first = await hold_first_batch(backend, batcher)
        jobs = [batcher.submit([seq(20 + i, 3)]) for i in range(4)]
        stopper = asyncio.get_running_loop().run_in_executor(None, batcher.stop, 10)
        await asyncio.sleep(0.05)
        backend.gate.set()
        await stopper
        return await asyncio.gather(first.future, *(j.future for j in jobs))

    outs = asyncio.run(run())
    assert [int(o[0, 0]) for o in outs] == [100, 20, 21, 22, 23]
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(_submit_after_stop(batcher))


async def _submit_after_stop(batcher: Batcher):
    batcher.submit([seq(1, 2)])


class Crash(BaseException):
    """What no `except Exception` catches: the worker thread itself ends."""


class FaultyBackend(FakeBackend):
    """FakeBackend with faults by marker: 70 returns rows that cannot be written back (strings),
    71 raises Crash; `always_fail` fails every batch after the warm-up."""

    def __init__(self, always_fail: bool = False):
        super().__init__()
        self.always_fail = always_fail

    def embed_ids(self, ids):
        out = super().embed_ids(ids)
        markers = {int(x[0]) for x in ids}
        if 71 in markers:
            raise Crash("worker thread killed")
        if self.always_fail and markers != {WARMUP}:
            raise RuntimeError("device lost")
        if 70 in markers:
            return np.full(out.shape, "x", object)
        return out


def test_faults_outside_the_device_call_fail_only_their_requests():
    """Packing (an input without a length) and write-back (rows that are not numbers) raise
    outside the device call; each fails its own request with BatchFailed and the next is served."""
    backend = FaultyBackend()
    batcher, _ = make(backend, budget=2)

    async def run():
        batcher.start()
        unsized = batcher.submit([np.int32(5)])  # len() raises inside Intake.take
        with pytest.raises(BatchFailed, match="TypeError"):
            await asyncio.wait_for(unsized.future, WAIT_S)  # the old worker died here: no answer
        garbage = batcher.submit([seq(70, 2)])
        with pytest.raises(BatchFailed, match="ValueError"):
            await asyncio.wait_for(garbage.future, WAIT_S)
        return await asyncio.wait_for(batcher.submit([seq(4, 2)]).future, WAIT_S)

    assert asyncio.run(run())[:, 0].tolist() == [4]
    assert batcher.fatal is None and batcher.queued_inputs == 0
    batcher.stop(10)


def test_consecutive_failures_kill_the_worker_and_fail_everything_waiting():
    backend = FaultyBackend(always_fail=True)
    died: list[BaseException] = []
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    batcher = Batcher(backend, 2, metrics, max_failures=3, on_fatal=died.append)

    async def run():
        batcher.start()
        jobs = [batcher.submit([seq(1, 2), seq(2, 2)]) for _ in range(3)]  # 2 rounds each
        results = await asyncio.wait_for(
            asyncio.gather(*(j.future for j in jobs), return_exceptions=True), WAIT_S)
        await asyncio.to_thread(batcher._thread.join, WAIT_S)  # the third failure ends it
        with pytest.raises(Unavailable, match="worker died"):
            batcher.submit([seq(3, 2)])
        return results

    results = asyncio.run(run())
    assert all(isinstance(r, Unavailable) for r in results), results
    assert wait_for(lambda: died, WAIT_S), "on_fatal was never called"
    assert "3 rounds failed in a row" in str(batcher.fatal) and len(died) == 1
    assert not batcher.ready.is_set() and batcher.queued_inputs == 0
    batcher.stop(10)


def test_a_dead_worker_thread_fails_its_batch_and_the_queue():
    """A BaseException ends the thread: the batch it carried and everything queued fail with
    Unavailable at once (nobody waits forever), and `fatal` says why."""
    backend = FaultyBackend()
    died: list[BaseException] = []
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    batcher = Batcher(backend, 2, metrics, on_fatal=died.append)

    async def run():
        batcher.start()
        await asyncio.to_thread(batcher.ready.wait, WAIT_S)
        backend.gate.clear()
        doomed = batcher.submit([seq(71, 2)])
        await asyncio.to_thread(backend.entered.acquire)  # on the device
        queued = batcher.submit([seq(5, 2)])
        backend.gate.set()
        return await asyncio.wait_for(asyncio.gather(doomed.future, queued.future,
                                                     return_exceptions=True), WAIT_S)

    results = asyncio.run(run())
    assert all(isinstance(r, Unavailable) and "Crash" in str(r) for r in results), results
    # The owner is told after the waiting requests are failed (`Supervisor.die`): on a loaded
    # machine the answers can come back first, so wait for the call rather than race it.
    assert wait_for(lambda: died, WAIT_S), "on_fatal was never called"
    assert isinstance(batcher.fatal, Crash) and died == [batcher.fatal]
    batcher._thread.join(WAIT_S)
    assert not batcher._thread.is_alive()
    batcher.stop(10)


def test_token_and_sentence_inputs_never_share_a_round():
    """/embed_all's inputs (output "token") queue with /embed's: in arrival order, but a round
    carries one output only (they are two device programs), each row back to its request."""
    backend = FakeBackend()
    batcher, _ = make(backend, budget=20)

    async def run():
        batcher.start()
        first = await hold_first_batch(backend, batcher)
        a = batcher.submit([seq(1, 2)])
        t = batcher.submit([seq(2, 3), seq(3, 2)], "token")
        b = batcher.submit([seq(4, 2)])
        backend.gate.set()
        return await asyncio.wait_for(
            asyncio.gather(first.future, a.future, t.future, b.future), WAIT_S)

    first, a, t, b = asyncio.run(run())
    batcher.stop(WAIT_S)
    # Warm-up, the held round, then a alone: the budget had room for all, the output had not.
    assert backend.outputs == ["sentence", "sentence", "sentence", "token", "sentence"]
    assert backend.batches[1:] == [[100], [1], [4]] and backend.token_batches == [[2, 3]]
    assert a[:, 0].tolist() == [1] and b[:, 0].tolist() == [4]
    assert [x.tolist() for x in t] == [[[2, i, 0, 0] for i in range(3)],
                                       [[3, i, 0, 0] for i in range(2)]]
    with pytest.raises(ValueError, match="output"):
        asyncio.run(_submit(batcher, "pooled"))


async def _submit(batcher: Batcher, output: str):
    batcher.submit([seq(1, 2)], output)


def _drain_into_a_hang(batcher: Batcher, backend: FakeBackend, stop_timeout: float):
    """A round on the device, a request queued behind it that hangs the device, then `stop`
    (the drain), and only then the first round released: the hang begins inside the drain.
    Returns (what `stop` returned, the queued request's outcome, seconds `stop` took)."""

    async def run():
        batcher.start()
        first = await hold_first_batch(backend, batcher)
        doomed = batcher.submit([seq(HANG, 2)])
        t0 = time.monotonic()
        stopping = asyncio.get_running_loop().run_in_executor(None, batcher.stop, stop_timeout)
        assert await asyncio.to_thread(wait_for, lambda: batcher.draining), "stop never began"
        backend.gate.set()
        stopped = await asyncio.wait_for(stopping, WAIT_S + stop_timeout)
        await asyncio.gather(first.future, return_exceptions=True)
        seconds = time.monotonic() - t0
        outcome = (await asyncio.wait_for(asyncio.gather(doomed.future, return_exceptions=True),
                                          WAIT_S))[0]
        return stopped, outcome, seconds

    try:
        return asyncio.run(run())
    finally:
        backend.hang.set()  # let the hung thread go


def test_watchdog_keeps_watching_through_the_drain():
    """A device call that hangs while `stop` drains: the watchdog (which used to end at `stop`)
    declares the device stuck, the waiting request fails, and `stop` returns (False) instead of
    waiting forever for a thread that never ends."""
    backend = FakeBackend()
    died: list[BaseException] = []
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    batcher = Batcher(backend, 10, metrics, on_fatal=died.append, stuck_after=1.0)
    stopped, outcome, _ = _drain_into_a_hang(batcher, backend, stop_timeout=WAIT_S)
    assert stopped is False
    assert wait_for(lambda: died, WAIT_S), "on_fatal was never called"
    assert "device is stuck" in str(batcher.fatal) and died == [batcher.fatal]
    assert isinstance(outcome, Unavailable) and "worker died" in str(outcome), outcome


def test_stop_is_bounded_without_a_watchdog():
    """No watchdog (stuck_after=None): `stop(timeout)` itself declares the drain hung once the
    timeout passes (it used to return with the batcher alive and its threads stuck)."""
    backend = FakeBackend()
    died: list[BaseException] = []
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    batcher = Batcher(backend, 10, metrics, on_fatal=died.append)
    stopped, outcome, seconds = _drain_into_a_hang(batcher, backend, stop_timeout=0.5)
    assert stopped is False and seconds >= 0.5
    assert wait_for(lambda: died, WAIT_S), "on_fatal was never called"
    assert "drain did not finish within 0.5 s" in str(batcher.fatal) and died == [batcher.fatal]
    assert isinstance(outcome, Unavailable), outcome
