"""Data-parallel encode over the 8 fake CPU devices equals single-device encode.

conftest.py sets `jax_num_cpu_devices=8`; `SentenceEncoder` without `devices=` uses all of them
and rounds the batch up to a multiple of the device count, padding with all-mask rows.
"""

import jax
import numpy as np
import pytest
from helpers import ZH_SENTENCES, random_zh_sentences

from sbert_flax.inference.encoder import SentenceEncoder

# 37 sentences: not a multiple of 8, nor of the batch sizes below.
SENTENCES = ZH_SENTENCES + random_zh_sentences(25, 1, 120, seed=7)


@pytest.fixture(scope="module")
def folder(tiny_bert):
    return tiny_bert(hidden=48, heads=3, layers=2, pooling="mean")


@pytest.fixture(scope="module")
def single(folder, one_device):
    enc = SentenceEncoder.from_pretrained(folder, devices=one_device, buckets=(128,))
    return enc.encode(SENTENCES, batch_size=64)


@pytest.fixture(scope="module")
def multi(folder):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (conftest sets jax_num_cpu_devices=8)")
    # One bucket: every batch size below is one compilation.
    return SentenceEncoder.from_pretrained(folder, buckets=(128,))


def test_default_uses_all_devices(multi):
    assert len(multi.devices) == 8
    assert multi.mesh.devices.size == 8
    leaf = jax.tree.leaves(multi.params)[0]
    assert len(leaf.sharding.device_set) == 8  # params replicated on every device


@pytest.mark.parametrize("batch_size", [5, 13, 64])
def test_eight_devices_equal_one(multi, single, batch_size):
    got = multi.encode(SENTENCES, batch_size=batch_size)
    rows = {r for r, _ in multi.last_stats.shapes}
    assert all(r % 8 == 0 for r in rows)  # batch rounded up to the device count
    assert got.shape == single.shape
    assert np.abs(got - single).max() <= 1e-5


def test_single_sentence_on_eight_devices(multi, single):
    got = multi.encode(SENTENCES[3])
    assert multi.last_stats.shapes == ((8, 128),)  # one real row, seven padding rows
    assert np.abs(got[0] - single[3]).max() <= 1e-5


def test_three_devices_equal_one(folder, single):
    # A device count that divides neither 8 nor the batch: rows are multiples of 3.
    enc = SentenceEncoder.from_pretrained(folder, devices=jax.devices()[:3], buckets=(128,))
    got = enc.encode(SENTENCES, batch_size=5)
    assert all(r % 3 == 0 for r, _ in enc.last_stats.shapes)
    assert np.abs(got - single).max() <= 1e-5


def test_token_output_on_eight_devices(multi, folder, one_device):
    one = SentenceEncoder.from_pretrained(folder, devices=one_device, buckets=(128,))
    want = one.encode(SENTENCES, batch_size=64, output="token")
    got = multi.encode(SENTENCES, batch_size=13, output="token")
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-5
