"""The host pipeline's parts without a model: `stream.prefetch` (ordered, bounded, errors in
their place), `stream.Reassembly` (chunks in input order), and vectorised packing (the batches of
the plain per-sentence loop, bit for bit)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sbert_flax.inference.packing import PackedBatch, Packer, TrainPacking
from sbert_flax.inference.window_stream import Reassembly, Window, prefetch
from sbert_flax.models.tokenization import TokenIds

# ---- prefetch --------------------------------------------------------------------------------


def test_prefetch_keeps_order_and_bounds_the_work_ahead():
    read, started, lock = [0], [], threading.Lock()
    live, peak = [0], [0]

    def items():
        for i in range(40):
            read[0] += 1
            yield i

    def fn(i: int) -> tuple[int, str]:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            started.append(i)
        time.sleep(0.002 * (i % 3))  # uneven work: later items may finish first
        with lock:
            live[0] -= 1
        return i * i, threading.current_thread().name

    out = []
    for got, name in prefetch(fn, items(), workers=2, depth=3):
        # Read on demand: the caller holds one result, at most 3 more are submitted.
        assert read[0] <= len(out) + 1 + 3
        out.append((got, name))
    assert [g for g, _ in out] == [i * i for i in range(40)]
    assert all(n.startswith("sbert-flax-prepare") for _, n in out)
    assert peak[0] <= 2  # two workers
    assert sorted(started) == list(range(40))


def test_prefetch_small_input_and_zero_workers_stay_on_the_callers_thread():
    me = threading.current_thread().name

    def fn(x):
        return x, threading.current_thread().name

    assert list(prefetch(fn, [7], workers=2, depth=3)) == [(7, me)]
    assert list(prefetch(fn, [1, 2, 3], workers=0, depth=3)) == [(1, me), (2, me), (3, me)]
    assert list(prefetch(fn, [], workers=2, depth=3)) == []


@pytest.mark.parametrize("bad_at", [0, 1, 5])
def test_prefetch_read_error_comes_after_the_items_before_it(bad_at):
    def items():
        yield from range(bad_at)
        raise TypeError(f"item {bad_at} is bad")

    got = []
    with pytest.raises(TypeError, match=f"item {bad_at} is bad"):
        for x in prefetch(lambda i: i + 100, items(), workers=2, depth=3):
            got.append(x)
    assert got == [i + 100 for i in range(bad_at)]


def test_prefetch_work_error_is_raised_in_its_place():
    def fn(i):
        if i == 4:
            raise ValueError("window 4 failed")
        return i

    got = []
    with pytest.raises(ValueError, match="window 4 failed"):
        for x in prefetch(fn, range(10), workers=2, depth=3):
            got.append(x)
    assert got == [0, 1, 2, 3]


def test_prefetch_closed_early_reads_no_further():
    read = [0]

    def items():
        for i in range(1000):
            read[0] += 1
            yield i

    gen = prefetch(lambda i: i, items(), workers=2, depth=3)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert read[0] <= 3 + 3
    assert all(not t.name.startswith("sbert-flax-prepare") or not t.is_alive()
               for t in _wait_threads())


def _wait_threads(timeout: float = 120.0) -> list[threading.Thread]:
    """The threads alive once the preparation threads had time to finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [t for t in threading.enumerate() if t.name.startswith("sbert-flax-prepare")]
        if not alive:
            break
        time.sleep(0.01)
    return threading.enumerate()


# ---- Window and Reassembly -------------------------------------------------------------------


def _window(start: int, size: int, dim: int = 3) -> Window:
    w = Window(start, size, [], np.zeros((size, dim), np.float32), pending=1)
    w.result[:] = np.arange(start, start + size, dtype=np.float32)[:, None]  # row i holds i
    w.pending = 0
    return w


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 25, 1000])
def test_reassembly_hands_out_rows_in_order(chunk_size):
    sizes = [10, 3, 0, 12]
    out = Reassembly(chunk_size, finish=lambda x: x * 2)
    got, start = [], 0
    for n in sizes:
        out.add(_window(start, n))
        start += n
        got += list(out.chunks())
        assert all(len(rows) == chunk_size for rows, _ in got)  # only full chunks before the end
    got += list(out.chunks(final=True))
    rows = np.concatenate([r for r, _ in got])
    np.testing.assert_array_equal(rows, np.arange(start))
    np.testing.assert_array_equal(np.concatenate([c for _, c in got])[:, 0], 2.0 * np.arange(start))
    assert list(out.chunks(final=True)) == []


def test_window_files_sentence_and_token_results():
    batch = PackedBatch(np.zeros((2, 8), np.int32), np.zeros((2, 8), np.int32),
                        np.zeros((2, 8), np.int32), np.array([2, 0, 1]),
                        *np.array([[0, 0, 1], [0, 1, 0], [0, 3, 0], [3, 2, 4]], np.int32))
    pooled = np.arange(2 * 2 * 1, dtype=np.float32).reshape(2, 2, 1)  # [rows, slots, D]
    w = Window(0, 3, [batch], np.zeros((3, 1), np.float32))
    w.store(batch, pooled)
    assert w.done and w.result[:, 0].tolist() == [1.0, 2.0, 0.0]
    tokens = np.arange(2 * 8, dtype=np.float32).reshape(2, 8, 1)  # [rows, length, D]
    w = Window(0, 3, [batch], [None] * 3)
    w.store(batch, tokens)
    assert [t[:, 0].tolist() for t in w.result] == [[3.0, 4.0], [8.0, 9.0, 10.0, 11.0],
                                                     [0.0, 1.0, 2.0]]


# ---- vectorised packing ----------------------------------------------------------------------


def _reference_batch(rows: list[list[int]], num_rows: int, length: int, seqs, index, pad_id):
    """The batch packing builds, one sentence at a time: the specification."""
    ids = np.full((num_rows, length), pad_id, np.int32)
    seg, pos = np.zeros_like(ids), np.zeros_like(ids)
    where, order = [], []
    for r, row in enumerate(rows):
        off = 0
        for slot, i in enumerate(row):
            m = len(seqs[i])
            ids[r, off:off + m] = seqs[i]
            seg[r, off:off + m] = slot + 1
            pos[r, off:off + m] = np.arange(m)
            where.append((r, slot, off, m))
            order.append(index[i])
            off += m
    return ids, seg, pos, np.array(order, np.int64), np.array(where, np.int32).T


def _rows_of(batch: PackedBatch, index: np.ndarray) -> list[list[int]]:
    """Which sequence (position in the input) sits in each row, left to right."""
    where = {int(v): k for k, v in enumerate(index)}
    rows: list[list[int]] = [[] for _ in range(batch.shape[0])]
    for j in np.lexsort((batch.slot, batch.row)):
        rows[batch.row[j]].append(where[int(batch.index[j])])
    return [r for r in rows if r]


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_packing_equals_the_per_sentence_loop(seed):
    rng = np.random.default_rng(seed)
    msl = int(rng.choice([16, 64, 128, 256]))
    seqs = [rng.integers(0, 21128, int(rng.integers(1, msl + 1))).astype(np.int32)
            for _ in range(int(rng.integers(1, 1500)))]
    index = rng.permutation(len(seqs)) + 10
    packer = Packer(int(rng.choice([64, 512, 4096])), msl, int(rng.choice([1, 2, 8])))
    batches = packer.pack(seqs, index, pad_id=7)
    flat = packer.pack(TokenIds.from_arrays(seqs), index, pad_id=7)
    assert sum(len(b.index) for b in batches) == len(seqs)
    for b, f in zip(batches, flat, strict=True):
        ids, seg, pos, order, where = _reference_batch(_rows_of(b, index), b.shape[0], b.shape[1],
                                                       seqs, index, 7)
        for got in (b, f):
            for name, want in (("ids", ids), ("segments", seg), ("positions", pos),
                               ("index", order)):
                arr = getattr(got, name)
                assert arr.dtype == want.dtype and np.array_equal(arr, want), name
            np.testing.assert_array_equal(np.stack([got.row, got.slot, got.start, got.length]),
                                          where)


def test_train_packing_places_every_text_once():
    rng = np.random.default_rng(5)
    cols = [[rng.integers(1, 100, int(rng.integers(1, 30))).astype(np.int32) for _ in range(12)]
            for _ in range(3)]
    out = TrainPacking(32, groups=2, row_multiple=2).pack(cols, pad_id=0)
    for c, col in enumerate(cols):
        for i, seq in enumerate(col):
            r, s = out["row"][c, i], out["slot"][c, i]
            mine = out["segments"][r] == s + 1
            np.testing.assert_array_equal(out["ids"][r][mine], seq)
            np.testing.assert_array_equal(out["positions"][r][mine], np.arange(len(seq)))
            assert r % 2 == i % 2  # group k = text i mod 2 owns rows k::2


def test_token_ids_round_trip():
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    ids = TokenIds.from_arrays(seqs)
    assert len(ids) == 3 and ids.flat.dtype == np.int32
    assert ids.lengths.tolist() == [3, 1, 2] and ids.offsets.tolist() == [0, 3, 4, 6]
    assert [x.tolist() for x in ids] == [[1, 2, 3], [4], [5, 6]]
    assert len(TokenIds.from_arrays([])) == 0


def test_rows_are_filled_first_fit_decreasing_in_input_order():
    # Lengths 3, 5, 3, 5, 2 into rows of 8 tokens (2 slots): the longest left first, the first
    # of equal lengths first, then the longest that still fits.
    seqs = [np.full(n, n, np.int32) for n in (3, 5, 3, 5, 2)]
    (batch,) = Packer(24, 8, lengths=(8,)).pack(seqs)
    assert _rows_of(batch, np.arange(5)) == [[1, 0], [3, 2], [4]]
