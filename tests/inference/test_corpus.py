"""Corpus encoding: streamed file -> .npy (each precision), bad lines, 2 processes == 1."""

import os
import socket
import subprocess
import sys

import helpers
import numpy as np
import pytest
from helpers import random_zh_sentences

from sbert_flax import util
from sbert_flax.inference.corpus import encode_file, line_range
from sbert_flax.inference.encoder import SentenceEncoder

st_quant = pytest.importorskip("sentence_transformers.util.quantization")

DRIVER = os.path.join(helpers.TESTS, "encode_driver.py")
TIMEOUT_S = 600  # a ceiling against a hang: two encode processes on a loaded 2-core host


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_bert(hidden=32, heads=4, layers=2, pooling="mean", max_position=128)


@pytest.fixture(scope="module")
def enc(model, one_device):
    return SentenceEncoder.from_pretrained(model, devices=one_device)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    sents = random_zh_sentences(700, 1, 90, seed=11) + ["", "   ", "最后一行"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(sents) + "\n", encoding="utf-8")
    return str(path), sents


def test_line_ranges_partition():
    for total in (0, 1, 7, 100):
        for p in (1, 2, 3, 8):
            ranges = [line_range(total, i, p) for i in range(p)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_encode_file_equals_encode(enc, corpus, tmp_path):
    path, sents = corpus
    out = str(tmp_path / "emb.npy")
    res = encode_file(enc, path, out, chunk_size=97)
    got = np.load(out)
    assert res.rows == res.total_rows == len(sents) and got.shape == (len(sents), enc.dim)
    assert np.abs(got - enc.encode(sents)).max() <= 1e-6
    assert sorted(os.listdir(tmp_path)) == ["emb.npy"]  # no temp files left


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_precisions_equal_sentence_transformers(enc, corpus, tmp_path, precision):
    path, sents = corpus
    out = str(tmp_path / "q.npy")
    encode_file(enc, path, out, precision=precision, normalize=True)
    want = st_quant.quantize_embeddings(enc.encode(sents, normalize=True), precision)
    got = np.load(out)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(tmp_path)) == ["q.npy"]


@pytest.mark.parametrize("bad, what", [(b"\xff\xfe", "not valid UTF-8"), (b"a\x00b", "NUL byte")])
def test_bad_line_names_file_and_line(enc, tmp_path, bad, what):
    path = tmp_path / "bad.txt"
    path.write_bytes("第一行\n第二行\n".encode() + bad + b"\n")
    out = tmp_path / "out.npy"
    with pytest.raises(ValueError, match=rf"bad\.txt:3: .*{what}"):
        encode_file(enc, str(path), str(out))
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.txt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_two_processes_equal_one(model, corpus, tmp_path, precision):
    path, sents = corpus
    out = str(tmp_path / "emb.npy")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(DRIVER)), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    args = ["--model", model, "--input", path, "--output", out, "--precision", precision]
    procs = [subprocess.Popen([sys.executable, DRIVER, str(port), str(i), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    assert os.path.exists(util.manifest_path(out))
    got = util.load_embeddings(out)
    # One process, all 8 test devices.
    one = str(tmp_path / "one.npy")
    encode_file(SentenceEncoder.from_pretrained(model), path, one, precision=precision)
    want = np.load(one)
    assert got.shape == want.shape == (len(sents), want.shape[1]) and got.dtype == want.dtype
    if precision == "float32":
        assert np.abs(got - want).max() <= 1e-5
    else:  # same global calibration ranges: the same codes (a rounding tie may move one step)
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
        assert np.mean(got == want) > 0.999
