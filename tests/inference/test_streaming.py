"""Streaming encode: any iterable in, bounded work in flight, chunks in input order."""

import io
import threading

import numpy as np
import pytest
from helpers import random_zh_sentences

from sbert_flax.inference import encoder as encoder_mod
from sbert_flax.inference.encoder import SentenceEncoder


@pytest.fixture(scope="module")
def enc(tiny_bert, one_device):
    path = tiny_bert(hidden=32, heads=4, layers=2, pooling="mean", max_position=128)
    return SentenceEncoder.from_pretrained(path, devices=one_device)


SENTS = random_zh_sentences(600, 1, 100, seed=21)


@pytest.fixture(scope="module")
def base(enc):
    return enc.encode(SENTS)


def test_generator_and_file_equal_list(enc, base):
    assert np.abs(enc.encode(s for s in SENTS) - base).max() <= 1e-6
    f = io.StringIO("".join(s + "\n" for s in SENTS))  # lines keep their newline: stripped
    assert np.abs(enc.encode(f) - base).max() <= 1e-6


def test_chunks_in_input_order(enc, base):
    ids, parts = zip(*enc.encode_chunks(iter(SENTS), chunk_size=77), strict=True)
    assert [len(i) for i in ids] == [77] * (len(SENTS) // 77) + [len(SENTS) % 77]
    np.testing.assert_array_equal(np.concatenate(ids), np.arange(len(SENTS)))
    assert np.abs(np.concatenate(parts) - base).max() <= 1e-6


def test_many_windows_equal_one(enc, base, monkeypatch):
    # A 64-token budget makes windows of 1,024 sentences: 2,400 sentences span three windows.
    sents = SENTS * 4
    want = np.concatenate([base] * 4)
    seen: list[tuple[int, int]] = []  # (first sentence, sentences) of every window read
    windows = SentenceEncoder._windows

    def recording_windows(self, *a, **k):
        for start, texts in windows(self, *a, **k):
            seen.append((start, len(texts)))
            yield start, texts

    monkeypatch.setattr(SentenceEncoder, "_windows", recording_windows)
    got = enc.encode(iter(sents), batch_size=1)
    assert seen == [(0, 1024), (1024, 1024), (2048, 352)]
    assert enc.last_stats.sentences == len(sents)
    assert np.abs(got - want).max() <= 1e-5


def test_bounded_batches_in_flight(enc, monkeypatch):
    live, peak = [0], [0]
    dispatch, run = SentenceEncoder._dispatch, SentenceEncoder._run

    def counting_dispatch(self, *a, **k):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return dispatch(self, *a, **k)

    def counting_run(self, *a, **k):
        for item in run(self, *a, **k):
            live[0] -= 1  # this batch's result is on the host now
            yield item

    monkeypatch.setattr(SentenceEncoder, "_dispatch", counting_dispatch)
    monkeypatch.setattr(SentenceEncoder, "_run", counting_run)
    enc.encode(SENTS, batch_size=2)
    assert enc.last_stats.batches > 10
    assert live[0] == 0 and peak[0] <= encoder_mod.IN_FLIGHT


def test_bad_item_in_generator_names_index(enc):
    def gen():
        yield from SENTS[:5]
        yield 42

    with pytest.raises(TypeError, match=r"sentences\[5\] is int"):
        enc.encode(gen())


def test_truncate_dim_then_normalize(enc, base):
    got = enc.encode(SENTS[:50], truncate_dim=8, normalize=True)
    want = base[:50, :8] / np.linalg.norm(base[:50, :8], axis=1, keepdims=True)
    assert got.shape == (50, 8) and np.abs(got - want).max() <= 1e-6
    with pytest.raises(ValueError, match="truncate_dim"):
        enc.encode(SENTS[:2], truncate_dim=enc.dim + 1)


def test_empty_input(enc):
    assert enc.encode([]).shape == (0, enc.dim)
    assert list(enc.encode_chunks(iter([]))) == []


def test_packing_waste_on_stsb(enc, stsb_test):
    # The target: <= 5% of token slots padding on STS-B-zh test (both columns).
    s1, s2, _ = stsb_test
    enc.encode(list(s1) + list(s2))
    assert enc.last_stats.padding_waste <= 0.05, enc.last_stats


def test_background_preparation_is_bit_identical_and_streams(enc, base, monkeypatch):
    # (`base` first: its shapes, compiled already, are most of the ones used here.)
    # Windows of 100 sentences: 12 windows of a 1,200-sentence generator, each window the same
    # 100 sentences in another order (the same few shapes to compile; a window's results filed
    # into another window would come out in the wrong order).
    monkeypatch.setattr(encoder_mod, "MIN_WINDOW", 100)
    monkeypatch.setattr(encoder_mod, "WINDOW_BATCHES", 0)
    sents = [s for k in range(12) for s in SENTS[7 * k:100] + SENTS[:7 * k]]
    read, threads = [0], set()

    def gen():
        for s in sents:
            read[0] += 1
            yield s

    prepare = SentenceEncoder._prepare_window

    def recording_prepare(self, *a, **k):
        threads.add(threading.current_thread().name)
        return prepare(self, *a, **k)

    monkeypatch.setattr(SentenceEncoder, "_prepare_window", recording_prepare)
    assert enc.host_workers >= 1
    chunks = []
    for rows, part in enc.encode_chunks(gen(), chunk_size=100):
        chunks.append((read[0], int(rows[-1]) + 1, part))
    # Streaming: when a chunk is handed out, the input was read at most a few windows past it
    # (the window on the devices, the batches in flight, workers + 1 windows prepared ahead).
    assert chunks[0][0] <= 600 < len(sents)
    assert all(r <= end + 500 for r, end, _ in chunks)
    assert any(t.startswith("sbert-flax-prepare") for t in threads)
    serial = SentenceEncoder(enc.model, devices=enc.devices, host_workers=0)
    threads.clear()
    want = serial.encode(sents)
    assert threads == {threading.current_thread().name}
    np.testing.assert_array_equal(np.concatenate([p for *_, p in chunks]), want)
