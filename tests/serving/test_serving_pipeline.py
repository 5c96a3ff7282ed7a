"""The batcher's pipeline: the bounded wait for concurrent requests, the next round launched while
one computes, failures of a launched round, and the rows a round is cut to (`trim_rows`).

Fakes whose device work can be held (`launch` returns at once, `result` blocks until released),
then a tiny real model: the overlapped, trimmed path gives a direct encode's embeddings."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from test_serving_batcher import WARMUP, FakeBackend, seq

from sbert_flax.inference.packing import Packer
from sbert_flax.serving.backend import EncoderBackend, trim_rows
from sbert_flax.serving.batcher import Batcher, BatchFailed
from sbert_flax.serving.prometheus import ServeMetrics


def make(backend, budget: int = 10, max_wait: float = 0.0) -> Batcher:
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    return Batcher(backend, budget, metrics, warmup=True, max_wait=max_wait)


async def started(batcher: Batcher) -> None:
    batcher.start()
    assert await asyncio.to_thread(batcher.ready.wait, 10)


# ---- the bounded wait ------------------------------------------------------------------------------

def test_wait_lets_concurrent_requests_share_one_batch():
    """Two requests announced (being tokenized): the first waits for the second, one batch."""
    backend = FakeBackend()
    # A bound far past the ceiling below: were it applied, the wait for the answers fails.
    batcher = make(backend, budget=100, max_wait=600.0)

    async def run():
        await started(batcher)
        batcher.expect()
        batcher.expect()
        a = batcher.submit([seq(1, 3)])
        await asyncio.sleep(0.1)  # the worker is free, and holds `a` for `b`
        b = batcher.submit([seq(2, 3), seq(3, 3)])
        batcher.arrived()
        batcher.arrived()
        # Nothing is left to wait for once both arrived: answered well before the 600 s bound.
        return await asyncio.wait_for(asyncio.gather(a.future, b.future), 120)

    a, b = asyncio.run(run())
    batcher.stop(10)
    assert backend.batches == [[WARMUP], [1, 2, 3]]
    assert a[:, 0].tolist() == [1] and b[:, 0].tolist() == [2, 3]


@pytest.mark.parametrize("case", ["lone", "at_budget", "bound"])
def test_wait_is_bounded(case):
    """A lone request and a queue at the budget are never held; a request announced but never
    submitted holds a partial batch for `max_wait` at most."""
    backend = FakeBackend()
    # Lone / at budget: a bound far past the ceiling below, so a request held by it fails the
    # wait; "bound": a request announced but never submitted would hold forever without it.
    bound = 0.3 if case == "bound" else 600.0
    batcher = make(backend, budget=6, max_wait=bound)

    async def run():
        await started(batcher)
        if case != "lone":
            batcher.expect()  # another request is being tokenized (and never comes)
        t0 = time.monotonic()
        job = batcher.submit([seq(1, 6 if case == "at_budget" else 3)])
        await asyncio.wait_for(job.future, 120)
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    batcher.stop(10)
    assert backend.batches == [[WARMUP], [1]]
    if case == "bound":
        assert elapsed >= 0.25, elapsed  # held for the bound (a lower bound: no speed in it)


# ---- the overlapped rounds -------------------------------------------------------------------------

class HeldRound:
    """A launched round whose rows come back once `release` is set; `error` makes it fail."""

    def __init__(self, rows: np.ndarray, error: Exception | None):
        self.rows, self.error = rows, error
        self.release = threading.Event()

    def result(self) -> np.ndarray:
        assert self.release.wait(10), "round never released"
        if self.error is not None:
            raise self.error
        return self.rows


class LaunchingBackend(FakeBackend):
    """`launch` returns at once (as JAX's dispatch does); each round is held until released.
    Rows are [marker, length, 0, 0]; a round holding `fail_marker` fails in `result`."""

    def __init__(self, fail_marker: int | None = None):
        super().__init__()
        self.rounds: list[HeldRound] = []
        self.launched = threading.Semaphore(0)
        self.fail_marker = fail_marker

    def launch(self, ids, output: str = "sentence"):
        assert output == "sentence", output
        markers = [int(x[0]) for x in ids]
        self.batches.append(markers)
        rows = np.array([[m, len(x), 0, 0] for m, x in zip(markers, ids, strict=True)], np.float32)
        rnd = HeldRound(rows, RuntimeError("device error") if self.fail_marker in markers else None)
        self.rounds.append(rnd)
        self.launched.release()
        return rnd


async def launched(backend: LaunchingBackend, n: int) -> None:
    for _ in range(n):
        assert await asyncio.to_thread(backend.launched.acquire, True, 10)


def test_next_round_launches_while_one_computes_and_results_keep_their_order():
    backend = LaunchingBackend()
    batcher = make(backend, budget=10)

    async def run():
        await started(batcher)
        a = batcher.submit([seq(1, 3)])
        await launched(backend, 1)  # round 1 computes (held)
        b = batcher.submit([seq(2, 4)])
        c = batcher.submit([seq(3, 4)])
        await asyncio.sleep(0.1)
        partial = backend.batches[1:]  # 8 tokens queued: they wait for the device
        d = batcher.submit([seq(4, 5), seq(5, 5)])  # now over the budget: round 2 is packed
        await launched(backend, 1)
        overlapped = backend.batches[1:]
        for rnd in backend.rounds[:2]:
            rnd.release.set()
        await launched(backend, 1)  # round 3: d, once a round has come back
        backend.rounds[2].release.set()
        return partial, overlapped, await asyncio.wait_for(
            asyncio.gather(a.future, b.future, c.future, d.future), 10)

    partial, overlapped, (a, b, c, d) = asyncio.run(run())
    batcher.stop(10)
    assert partial == [[1]]  # a partial queue is not launched behind a computing round
    assert overlapped == [[1], [2, 3]]  # a full one is, before round 1 returned
    assert backend.batches[3:] == [[4, 5]]
    assert [x[:, 0].tolist() for x in (a, b, c, d)] == [[1], [2], [3], [4, 5]]
    assert [x[:, 1].tolist() for x in (a, b, c, d)] == [[3], [4], [4], [5, 5]]
    assert batcher.queued_inputs == 0 and batcher.fatal is None


def test_a_failed_launched_round_fails_only_its_requests():
    """Round 1 fails in `result` (on the collector) while round 2 is already launched behind it:
    round 1's requests get BatchFailed, round 2's their rows, and the worker carries on."""
    backend = LaunchingBackend(fail_marker=66)
    batcher = make(backend, budget=4)

    async def run():
        await started(batcher)
        bad = batcher.submit([seq(66, 2), seq(67, 2)])  # a full round
        await launched(backend, 1)
        good = batcher.submit([seq(7, 4)])  # a full round too: launched behind the first
        await launched(backend, 1)
        held = backend.batches[1:]
        backend.rounds[0].release.set()
        with pytest.raises(BatchFailed, match="device error"):
            await asyncio.wait_for(bad.future, 120)
        backend.rounds[1].release.set()
        out = await asyncio.wait_for(good.future, 120)
        after = batcher.submit([seq(8, 2)])
        await launched(backend, 1)
        backend.rounds[-1].release.set()
        return held, out, await asyncio.wait_for(after.future, 120)

    held, out, after = asyncio.run(run())
    batcher.stop(10)
    assert held == [[66, 67], [7]]
    assert out[:, 0].tolist() == [7] and after[:, 0].tolist() == [8]
    assert batcher.fatal is None and batcher.queued_inputs == 0


# ---- trimmed rows, and a real model ----------------------------------------------------------------

def test_trim_rows_cuts_padding_rows_into_compiled_shapes():
    packer = Packer(max_batch_tokens=512, max_seq_length=64)  # 8 rows of 64 when full
    seqs = [np.arange(1, 41, dtype=np.int32) + i for i in range(5)]  # 40 tokens: one per row
    (batch,) = packer.pack(seqs)
    assert batch.shape == (8, 64)  # 5 rows filled, padded to 8
    parts = trim_rows(batch, packer)
    assert [p.shape for p in parts] == [(4, 64), (1, 64)]
    assert all(p.shape[0] in packer.row_options(64) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), batch.ids[:5])
    got = {int(i): (p.ids[r, s:s + n]) for p in parts
           for i, r, s, n in zip(p.index, p.row, p.start, p.length, strict=True)}
    assert sorted(got) == list(range(5))
    for i, x in enumerate(seqs):
        np.testing.assert_array_equal(got[i], x)
    full = packer.pack([np.ones(60, np.int32)] * 8)[0]
    assert trim_rows(full, packer) == [full]  # nothing to cut


def test_overlapped_trimmed_rounds_equal_a_direct_encode(tiny_bert, one_device, zh_vocab,
                                                         monkeypatch):
    """Concurrent requests through the real backend (pack, trim, launch, collect) get a direct
    encode's embeddings, each at its own position."""
    import helpers

    from sbert_flax import SentenceEncoder
    from sbert_flax.serving import backend as backend_module

    cut: list[int] = []

    def spy(batch, packer):
        parts = trim_rows(batch, packer)
        cut.append(batch.shape[0] - sum(p.shape[0] for p in parts))
        return parts

    monkeypatch.setattr(backend_module, "trim_rows", spy)

    enc = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean"), max_seq_length=64,
                                          devices=one_device, max_batch_tokens=256)
    texts = helpers.random_zh_sentences(23, min_len=3, max_len=40, seed=3, vocab_file=zh_vocab)
    want = enc.encode(texts)
    backend = EncoderBackend(enc)
    metrics = ServeMetrics(compile_count=lambda: 0, queue_size=lambda: 0)
    batcher = Batcher(backend, 256, metrics, warmup=False)
    groups = [texts[:1], texts[1:9], texts[9:10], texts[10:23]]

    async def run():
        # All queued before the worker starts: the rounds (256-token budget, as test_serving's
        # server: the same 1, 2 and 4-row shapes) do not depend on timing.
        jobs = [batcher.submit(backend.tokenize(g, truncate=True, direction="right"))
                for g in groups]
        batcher.start()
        return await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 120)

    outs = asyncio.run(run())
    batcher.stop(10)
    got = np.concatenate(outs)
    assert max(cut) > 0, cut  # some round ran on fewer rows than the packer padded it to
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_max_batch_wait_flag_and_limits():
    import argparse

    from sbert_flax.cli.serve import add_arguments, settings_from_args
    from sbert_flax.serving.settings import ServeSettings

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert settings_from_args(p.parse_args([])).max_batch_wait == 0.002
    assert settings_from_args(p.parse_args(["--max-batch-wait", "0"])).max_batch_wait == 0
    for bad in (-0.001, float("nan"), 2.0):
        with pytest.raises(ValueError, match="max_batch_wait"):
            ServeSettings(max_batch_wait=bad)
    with pytest.raises(ValueError, match="max_wait"):
        make(FakeBackend(), max_wait=float("nan"))
