"""sbert_flax.util against sentence-transformers: search, mining, quantization; embeddings files."""

import os
import warnings

import jax
import numpy as np
import pytest
import torch
from sentence_transformers import util as st_util

from sbert_flax import util
from sbert_flax.common.files import read_json

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers import quantization as st_quant


def _emb(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _assert_same_hits(ours, ref):
    assert len(ours) == len(ref)
    for q, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert [h["corpus_id"] for h in a] == [h["corpus_id"] for h in b], f"query {q}"
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], rtol=0,
                                   atol=1e-5, err_msg=f"query {q}")
        assert all(type(h["corpus_id"]) is int and type(h["score"]) is float for h in a)


# ---------------------------------------------------------------------------------------------
# semantic_search
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["cos", "dot"])
@pytest.mark.parametrize("n_q,n_c,qcs,ccs,top_k", [
    (23, 200, 7, 37, 50),      # 6 corpus chunks (last one 15 rows < top_k), 4 query chunks
    (5, 300, 100, 500000, 10),  # the defaults: one chunk each
    (3, 6, 2, 4, 10),           # top_k > corpus: every row returned
])
def test_semantic_search_matches_sentence_transformers(score, n_q, n_c, qcs, ccs, top_k):
    q, c = _emb(n_q, seed=1), _emb(n_c, seed=2)
    st_fn = st_util.cos_sim if score == "cos" else st_util.dot_score
    ref = st_util.semantic_search(torch.from_numpy(q), torch.from_numpy(c), query_chunk_size=qcs,
                                  corpus_chunk_size=ccs, top_k=top_k, score_function=st_fn)
    ours = util.semantic_search(q, c, query_chunk_size=qcs, corpus_chunk_size=ccs, top_k=top_k,
                                score_function=None if score == "cos" else "dot")
    _assert_same_hits(ours, ref)
    assert [len(r) for r in ours] == [min(top_k, n_c)] * n_q
    # sentence-transformers' own score functions, jax and torch inputs are accepted as well.
    _assert_same_hits(util.semantic_search(jax.numpy.asarray(q), torch.from_numpy(c),
                                           query_chunk_size=qcs, corpus_chunk_size=ccs,
                                           top_k=top_k, score_function=st_fn), ref)


def test_semantic_search_single_query_and_unnormalised_rows():
    c = _emb(50, seed=3) * np.linspace(0.1, 30, 50, dtype=np.float32)[:, None]
    q = _emb(1, seed=4)[0] * 7
    ref = st_util.semantic_search(torch.from_numpy(q), torch.from_numpy(c), top_k=5)
    _assert_same_hits(util.semantic_search(q, c, top_k=5), ref)


def test_semantic_search_compiles_a_bounded_number_of_shapes():
    kw = dict(query_chunk_size=7, corpus_chunk_size=37, top_k=12)  # top_k unique to this test
    start = dict(util.TRACE_COUNTS)
    util.semantic_search(_emb(23), _emb(200, seed=5), **kw)
    before = dict(util.TRACE_COUNTS)
    # One shape per kernel for 4 query chunks x 6 corpus chunks (the last ones padded).
    assert {n: before[n] - start.get(n, 0) for n in before} == {
        "prepare": 1, "chunk_topk": 1, "merge": 1}
    # Other corpus / query sizes above the chunk sizes pad to the same chunk shapes.
    for n_q, n_c in [(9, 41), (30, 1000), (8, 333)]:
        ref = st_util.semantic_search(torch.from_numpy(_emb(n_q, seed=n_q)),
                                      torch.from_numpy(_emb(n_c, seed=n_c)), **kw)
        _assert_same_hits(util.semantic_search(_emb(n_q, seed=n_q), _emb(n_c, seed=n_c), **kw), ref)
    assert dict(util.TRACE_COUNTS) == before


def test_semantic_search_sharded_equals_one_device():
    assert len(jax.local_devices()) == 8
    q, c = _emb(19, seed=6), _emb(301, seed=7)
    kw = dict(query_chunk_size=8, corpus_chunk_size=64, top_k=40)  # 40 > one device's 8 rows
    one = util.semantic_search(q, c, devices=jax.local_devices()[:1], **kw)
    eight = util.semantic_search(q, c, **kw)
    assert [[h["corpus_id"] for h in r] for r in one] == [[h["corpus_id"] for h in r] for r in eight]
    np.testing.assert_allclose([[h["score"] for h in r] for r in one],
                               [[h["score"] for h in r] for r in eight], rtol=0, atol=1e-6)


def test_semantic_search_custom_score_function():
    q, c = _emb(4, seed=14), _emb(90, seed=15)

    def neg_l2(a, b):  # a jax function, traced into the kernel
        return -jax.numpy.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)

    ours = util.semantic_search(q, c, corpus_chunk_size=40, top_k=7, score_function=neg_l2)
    ref = st_util.semantic_search(
        torch.from_numpy(q), torch.from_numpy(c), corpus_chunk_size=40, top_k=7,
        score_function=lambda a, b: -torch.cdist(a, b) ** 2)
    _assert_same_hits(ours, ref)
    with pytest.raises(ValueError, match="score_function"):
        util.semantic_search(q, c, score_function="manhattan")


def test_semantic_search_ties_go_to_the_lower_corpus_id():
    c = np.tile(_emb(3, seed=8), (5, 1))  # rows i, i+3, i+6, ... are identical
    hits = util.semantic_search(c[:1], c, corpus_chunk_size=4, top_k=6)[0]
    assert [h["corpus_id"] for h in hits[:5]] == [0, 3, 6, 9, 12]


def test_semantic_search_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        util.semantic_search(_emb(2, dim=8), _emb(5, dim=16))
    with pytest.raises(ValueError, match="top_k"):
        util.semantic_search(_emb(2), _emb(5), top_k=0)
    assert util.semantic_search(_emb(2), np.zeros((0, 16), np.float32)) == [[], []]


# ---------------------------------------------------------------------------------------------
# paraphrase_mining
# ---------------------------------------------------------------------------------------------

def _assert_same_pairs(ours, ref):
    assert [(i, j) for _, i, j in ours] == [(i, j) for _, i, j in ref]
    np.testing.assert_allclose([s for s, _, _ in ours], [s for s, _, _ in ref], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(query_chunk_size=16, corpus_chunk_size=23, top_k=5, max_pairs=40),
    dict(top_k=100, max_pairs=500000),
    dict(query_chunk_size=10, corpus_chunk_size=7, top_k=3, max_pairs=1000),
])
def test_paraphrase_mining_embeddings_matches_sentence_transformers(kw):
    emb = _emb(60, seed=9)
    ref = st_util.paraphrase_mining_embeddings(torch.from_numpy(emb), **kw)
    ours = util.paraphrase_mining_embeddings(emb, **kw)
    _assert_same_pairs(ours, ref)
    assert all(i < j for _, i, j in ours)


class _StubEncoder:
    """Maps each sentence to a fixed random row; counts encode calls."""

    def __init__(self, sentences, dim=16):
        self.table = dict(zip(sentences, _emb(len(sentences), dim, seed=11), strict=True))
        self.calls = 0

    def encode(self, sentences, batch_size=32):
        self.calls += 1
        return np.stack([self.table[s] for s in sentences])


class _STStub(_StubEncoder):
    def encode(self, sentences, convert_to_tensor=False, **kw):
        return torch.from_numpy(super().encode(sentences))


def test_paraphrase_mining_through_an_encoder():
    sents = [f"句子 {i}" for i in range(40)]
    ref = st_util.paraphrase_mining(_STStub(sents), sents, top_k=4, max_pairs=30)
    stub = _StubEncoder(sents)
    _assert_same_pairs(util.paraphrase_mining(stub, sents, top_k=4, max_pairs=30), ref)
    assert stub.calls == 1


# ---------------------------------------------------------------------------------------------
# quantize_embeddings
# ---------------------------------------------------------------------------------------------

def _assert_equal_arrays(a, b):
    assert type(a) is type(b)
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal_arrays(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_quantize_embeddings_matches_sentence_transformers(precision):
    emb = _emb(150, dim=33, seed=12)  # 33 dims: the packed binary rows end in a partial byte
    cal = _emb(400, dim=33, seed=13) * 0.8
    ranges = np.stack([np.full(33, -1.5), np.linspace(0.5, 2.0, 33)]).astype(np.float64)
    ranges[:, 3] = 0.25  # a zero-width range (step 1, as in sentence-transformers)
    for kw in [{}, {"calibration_embeddings": cal}, {"ranges": ranges}]:
        ours = util.quantize_embeddings(emb, precision, **kw)
        _assert_equal_arrays(ours, st_quant.quantize_embeddings(emb, precision, **kw))
    _assert_equal_arrays(util.quantize_embeddings(torch.from_numpy(emb), precision),
                         st_quant.quantize_embeddings(torch.from_numpy(emb), precision))
    # Multi-vector documents: a list of [tokens, dim] matrices with shared buckets.
    docs = [emb[:40], emb[40:41], emb[41:100]]
    _assert_equal_arrays(util.quantize_embeddings(docs, precision),
                         st_quant.quantize_embeddings(docs, precision))


def test_quantize_embeddings_errors():
    with pytest.raises(ValueError, match="single embedding"):
        util.quantize_embeddings(_emb(1), "int8")
    with pytest.raises(ValueError, match="not supported"):
        util.quantize_embeddings(_emb(3), "int4")
    with pytest.raises(TypeError, match="float"):
        util.quantize_embeddings(np.zeros((3, 4), np.uint8), "binary")


# ---------------------------------------------------------------------------------------------
# Embeddings files
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def _write_shards(out: str, parts: list[np.ndarray]) -> list[str]:
    paths = [util.shard_path(out, i, len(parts)) for i in range(len(parts))]
    for p, a in zip(paths, parts, strict=True):
        util.save_embeddings(p, a)
    util.write_manifest(out, [(p, len(a)) for p, a in zip(paths, parts, strict=True)],
                        dim=parts[0].shape[1], dtype="float32")
    return paths


def test_shards_manifest_load_and_merge(tmp_path, umask022):
    out = str(tmp_path / "emb.npy")
    parts = [_emb(5, 8, seed=1), _emb(0, 8), _emb(7, 8, seed=2)]  # a process may get no lines
    paths = _write_shards(out, parts)
    assert os.path.basename(paths[2]) == "emb.npy.shard-00002-of-00003.npy"
    manifest = util.manifest_path(out)
    assert {_mode(p) for p in [*paths, manifest]} == {0o644}
    m = read_json(manifest)
    assert m == {"format": "sbert-flax-embeddings", "version": 1, "rows": 12, "dim": 8,
                 "dtype": "float32", "shards": [
                     {"path": os.path.basename(paths[0]), "start": 0, "rows": 5},
                     {"path": os.path.basename(paths[1]), "start": 5, "rows": 0},
                     {"path": os.path.basename(paths[2]), "start": 5, "rows": 7}]}
    want = np.concatenate(parts)
    np.testing.assert_array_equal(util.load_embeddings(out), want)
    np.testing.assert_array_equal(util.load_embeddings(manifest, mmap=False), want)

    assert util.merge_shards(out, block_rows=3) == out
    assert _mode(out) == 0o644
    assert not any(os.path.exists(p) for p in [*paths, manifest])
    merged = util.load_embeddings(out)
    assert isinstance(merged, np.memmap) and merged.dtype == np.float32
    np.testing.assert_array_equal(merged, want)
    assert sorted(os.listdir(tmp_path)) == ["emb.npy"]  # no temp file left

    # A new sharded run replaces the merged file of the old one, which would shadow it.
    paths = _write_shards(out, parts[:1])
    assert not os.path.exists(out)
    np.testing.assert_array_equal(util.load_embeddings(out), parts[0])


def test_single_shard_is_memmapped_and_keep_shards(tmp_path):
    out = str(tmp_path / "one.npy")
    (path,) = _write_shards(out, [_emb(4, 8)])
    loaded = util.load_embeddings(out)
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, _emb(4, 8))
    util.merge_shards(out, keep_shards=True)
    assert os.path.exists(path) and os.path.exists(util.manifest_path(out))
    np.testing.assert_array_equal(util.load_embeddings(out), _emb(4, 8))  # the merged file wins


def test_missing_and_corrupt_shards_are_named(tmp_path):
    out = str(tmp_path / "emb.npy")
    paths = _write_shards(out, [_emb(3, 8), _emb(4, 8, seed=1), _emb(2, 8, seed=2)])
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00003"):
        util.load_embeddings(out)
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00003"):
        util.merge_shards(out)
    assert not os.path.exists(out)

    util.save_embeddings(paths[1], _emb(5, 8))  # a stale shard: wrong row count
    with pytest.raises(ValueError, match=r"shard-00001-of-00003.*\(4, 8\)"):
        util.load_embeddings(out)
    with open(paths[2], "wb") as f:
        f.write(b"\x93NUMPY garbage")
    util.save_embeddings(paths[1], _emb(4, 8))
    with pytest.raises(ValueError, match="shard-00002-of-00003.*not a readable"):
        util.load_embeddings(out)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        util.load_embeddings(str(tmp_path / "nope.npy"))


# ---------------------------------------------------------------------------------------------
# search_corpus
# ---------------------------------------------------------------------------------------------

def test_search_corpus_caches_corpus_embeddings(tmp_path, umask022):
    corpus = [f"文档 {i}" for i in range(30)]
    queries = ["文档 3", "文档 17"]
    enc = _StubEncoder(corpus + queries)
    cache = str(tmp_path / "corpus.npy")
    ref = st_util.semantic_search(torch.from_numpy(enc.encode(queries)),
                                  torch.from_numpy(enc.encode(corpus)), top_k=4)
    enc.calls = 0
    hits = util.search_corpus(enc, corpus, queries, top_k=4, corpus_embeddings_path=cache)
    _assert_same_hits(hits, ref)
    assert [h[0]["corpus_id"] for h in hits] == [3, 17]
    assert enc.calls == 2 and _mode(cache) == 0o644
    _assert_same_hits(util.search_corpus(enc, corpus, queries, top_k=4,
                                         corpus_embeddings_path=cache), ref)
    assert enc.calls == 3  # queries only: the corpus came from the cache
    # A cache for another corpus (other line count) is re-encoded and replaced.
    hits = util.search_corpus(enc, corpus[:20], queries, top_k=4, corpus_embeddings_path=cache)
    assert enc.calls == 5 and util.load_embeddings(cache).shape == (20, 16)
    assert hits[0][0]["corpus_id"] == 3


@pytest.mark.parametrize("score", ["cos", "dot"])
def test_search_scores_are_computed_at_highest_precision(score):
    """The score matmul asks for HIGHEST precision: on TPU the default is one bf16 pass, which
    rounds scores to ~3 digits (ties where there are none; mining's margins on rounded scores).
    The CPU computes float32 either way, so the lowered program is what shows it."""
    import jax.numpy as jnp

    from sbert_flax.retrieval.search import _kernels

    devices = tuple(jax.devices()[:2])
    _, chunk_topk, *_ = _kernels(devices, score, 3, 3)
    q, c = jnp.zeros((4, 8), jnp.float32), jnp.zeros((8, 8), jnp.float32)
    text = chunk_topk.lower(q, c, 8, 0).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("HIGHEST" in line for line in dots), dots
