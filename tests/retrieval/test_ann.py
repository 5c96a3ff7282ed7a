"""`semantic_search_faiss` / `semantic_search_usearch` against sentence-transformers' own functions,
on real embeddings: STS-B-zh sentences encoded by m3e-small."""

import logging
import sys

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
usearch_index = pytest.importorskip("usearch.index")
stq = pytest.importorskip("sentence_transformers.util.quantization")

from sbert_flax import util  # noqa: E402
from sbert_flax.retrieval import ann  # noqa: E402

N_QUERIES = 200
N_SENTENCES = 2000  # encoding dominates the file's time
CASES = ([("faiss", p) for p in ann.FAISS_PRECISIONS]
         + [("usearch", p) for p in ann.USEARCH_PRECISIONS])


@pytest.fixture(scope="module")
def stsb_emb(m3e_dir, stsb_test, one_device):
    """(queries [200, 512], corpus [1800, 512]): the first 2000 unique STS-B-zh test sentences,
    L2-normalised. The queries are s1 sentences, so their s2 paraphrases are in the corpus."""
    from sbert_flax import SentenceEncoder

    s1, s2, _ = stsb_test
    texts = list(dict.fromkeys(s1 + s2))[:N_SENTENCES]
    enc = SentenceEncoder.from_pretrained(m3e_dir, devices=one_device)
    e = np.asarray(enc.encode(texts, batch_size=64), np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return e[:N_QUERIES], e[N_QUERIES:]


@pytest.fixture(autouse=True)
def _quiet(caplog):
    # Both libraries warn on rescore=True with a float32 corpus (by design here).
    caplog.set_level(logging.ERROR)


def _fns(lib):
    return getattr(ann, f"semantic_search_{lib}"), getattr(stq, f"semantic_search_{lib}")


def _quantized(corpus, precision):
    return stq.quantize_embeddings(corpus, precision, calibration_embeddings=corpus)


def _contents(index):
    """What an index holds: its type and every stored vector by id."""
    if isinstance(index, usearch_index.Index):
        keys = np.arange(len(index))
        return (index.ndim, str(index.metric), str(index.dtype),
                np.stack(index.get(keys)) if len(index) else None)
    return type(index).__name__, index.d, index.ntotal, index.reconstruct_n(0, index.ntotal)


def _assert_same_contents(a, b):
    ca, cb = _contents(a), _contents(b)
    assert ca[:-1] == cb[:-1]
    np.testing.assert_array_equal(ca[-1], cb[-1])


def _assert_same_hits(ours, theirs):
    assert [[h["corpus_id"] for h in r] for r in ours] == \
        [[h["corpus_id"] for h in r] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b],
                                   rtol=0, atol=1e-5)


def _compare(lib, precision, queries, corpus, **kw):
    ours_fn, st_fn = _fns(lib)
    coded = _quantized(corpus, precision)
    kw = {"corpus_precision": precision, "calibration_embeddings": corpus, **kw}
    ours, ours_s, our_index = ours_fn(queries, coded, output_index=True, **kw)
    theirs, _, their_index = st_fn(queries, coded, output_index=True, **kw)
    _assert_same_contents(our_index, their_index)
    if lib == "usearch" and precision.endswith("binary"):
        # usearch's multi-threaded add stores the vectors in slots of a random order, and an exact
        # search breaks Hamming ties by slot: two builds of the same vectors (sentence-transformers'
        # own, twice) return different ids among ties. So both search one index; the builds were
        # compared above by content.
        ours = ours_fn(queries, corpus_index=their_index, **kw)[0]
    assert isinstance(ours_s, float) and ours_s >= 0
    _assert_same_hits(ours, theirs)
    return ours


@pytest.mark.parametrize("rescore", [True, False])
@pytest.mark.parametrize("lib,precision", CASES)
def test_exact_matches_sentence_transformers(stsb_emb, lib, precision, rescore):
    queries, corpus = stsb_emb
    hits = _compare(lib, precision, queries, corpus, top_k=10, rescore=rescore)
    assert all(len(r) == 10 for r in hits)


@pytest.mark.parametrize("lib,precision", CASES)
def test_fewer_rows_than_top_k_matches_sentence_transformers(stsb_emb, lib, precision):
    # The index pads the candidate lists (faiss: id -1, usearch: past `counts`): dropped, and
    # never rescored into the results.
    queries, corpus = stsb_emb
    hits = _compare(lib, precision, queries[:20], corpus[:7], top_k=10, rescore=True,
                    rescore_multiplier=3)
    assert all(len(r) == 7 for r in hits)


def _recall_at_k(approx, exact) -> float:
    """Share of the exact top-k found; a hit scored like the exact k-th (a tie) counts too."""
    found = 0
    for a, e in zip(approx, exact, strict=True):
        ids, last = {h["corpus_id"] for h in e}, e[-1]["score"]
        found += sum(h["corpus_id"] in ids or abs(h["score"] - last) < 1e-6 for h in a)
    return found / sum(len(e) for e in exact)


@pytest.mark.parametrize("rescore", [True, False])
@pytest.mark.parametrize("lib,precision", CASES)
def test_approximate_recall(stsb_emb, lib, precision, rescore):
    queries, corpus = stsb_emb
    fn = _fns(lib)[0]
    coded = _quantized(corpus, precision)
    kw = {"corpus_precision": precision, "calibration_embeddings": corpus, "rescore": rescore,
          "top_k": 10}
    exact = fn(queries, coded, exact=True, **kw)[0]
    approx, _, index = fn(queries, coded, exact=False, output_index=True, **kw)
    graph = {"faiss": (faiss.IndexBinaryHNSW if precision == "ubinary" else faiss.IndexHNSWFlat),
             "usearch": usearch_index.Index}[lib]
    assert isinstance(index, graph)
    assert _recall_at_k(approx, exact) >= 0.95


@pytest.mark.parametrize("lib,precision", [("faiss", "uint8"), ("usearch", "int8"),
                                           ("faiss", "float32"), ("usearch", "binary")])
def test_output_index_is_reused(stsb_emb, lib, precision):
    queries, corpus = stsb_emb
    fn = _fns(lib)[0]
    ranges = np.vstack([corpus.min(axis=0), corpus.max(axis=0)])
    coded = stq.quantize_embeddings(corpus, precision, ranges=ranges)
    first = fn(queries, coded, corpus_precision=precision, ranges=ranges, output_index=True)
    assert len(first) == 3
    again = fn(queries, corpus_index=first[2], corpus_precision=precision, ranges=ranges)
    assert len(again) == 2
    _assert_same_hits(again[0], first[0])
    # With the corpus' ranges, rescored int8 / uint8 candidates score within a bucket of the
    # float cosine.
    if precision.endswith("int8"):
        top = [r[0] for r in again[0]]
        cos = np.einsum("qd,qd->q", queries, corpus[[h["corpus_id"] for h in top]])
        steps = (ranges[1] - ranges[0]) / 255
        bound = np.abs(queries) @ steps
        assert np.all(np.abs(np.array([h["score"] for h in top]) - cos) <= bound + 1e-6)


@pytest.mark.parametrize("lib,bad", [("faiss", "int8"), ("faiss", "binary"),
                                     ("usearch", "uint8"), ("usearch", "float16")])
def test_unsupported_precision_is_refused(lib, bad):
    fn = _fns(lib)[0]
    x = np.ones((3, 16), np.float32)
    with pytest.raises(ValueError, match=f"corpus_precision='{bad}' is not supported for {lib}"):
        fn(x, x, corpus_precision=bad)


@pytest.mark.parametrize("lib", ["faiss", "usearch"])
def test_bad_corpus_arguments(lib):
    fn = _fns(lib)[0]
    x = np.ones((3, 16), np.float32)
    with pytest.raises(ValueError, match="exactly one of corpus_embeddings and corpus_index"):
        fn(x)
    with pytest.raises(ValueError, match="exactly one of .* \\(got both\\)"):
        fn(x, x, corpus_index=object())
    # Codes of another precision would be searched as garbage by the index.
    with pytest.raises(ValueError, match="'ubinary' expects float embeddings or uint8 codes .* "
                       "got int8"):
        fn(x, x.astype(np.int8), corpus_precision="ubinary")
    with pytest.raises(ValueError, match="'float32' expects float embeddings .* got uint8"):
        fn(x, x.astype(np.uint8))


@pytest.mark.parametrize("lib,precision", [c for c in CASES if c[1] != "float32"])
def test_float_corpus_is_quantized_with_the_queries_ranges(stsb_emb, lib, precision):
    """A float corpus with a quantized precision searches like its codes would, the queries
    quantized with the corpus' own ranges (sentence-transformers would index the floats as
    codes)."""
    queries, corpus = stsb_emb
    fn = _fns(lib)[0]
    ranges = np.vstack([corpus.min(axis=0), corpus.max(axis=0)])
    coded = stq.quantize_embeddings(corpus, precision, ranges=ranges)
    for rescore in (True, False):
        kw = {"corpus_precision": precision, "rescore": rescore}
        got, _, index = fn(queries, corpus, output_index=True, **kw)  # no ranges given
        want, _, coded_index = fn(queries, coded, ranges=ranges, output_index=True, **kw)
        _assert_same_contents(index, coded_index)
        # usearch breaks Hamming ties by its slot order, random per build (see _compare): there
        # the equal contents above are the check.
        if not (lib == "usearch" and precision.endswith("binary")):
            _assert_same_hits(got, want)


@pytest.mark.parametrize("module,fn", [("faiss", "semantic_search_faiss"),
                                       ("usearch.index", "semantic_search_usearch")])
def test_missing_library_names_the_extra(monkeypatch, module, fn):
    monkeypatch.setitem(sys.modules, module, None)
    x = np.ones((3, 16), np.float32)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "sbert-flax\[index\]"'):
        getattr(ann, fn)(x, x)


def test_util_exports():
    assert util.semantic_search_faiss is ann.semantic_search_faiss
    assert util.semantic_search_usearch is ann.semantic_search_usearch
    assert {"semantic_search_faiss", "semantic_search_usearch"} <= set(util.__all__)
