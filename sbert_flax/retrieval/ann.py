"""Approximate (and quantized) search over faiss or usearch, as sentence-transformers has it.

`semantic_search_faiss` and `semantic_search_usearch` take the arguments and give the results of
`sentence_transformers.util.semantic_search_faiss` / `semantic_search_usearch` (6.3): the corpus
is searched at its own precision (the float query is quantized to match), and with `rescore`
the `top_k * rescore_multiplier` candidates of a quantized corpus are re-ranked by the dot
product of the float query with the (dequantized or unpacked) candidate vectors.

The scores are what the index returns unless rescored, so their meaning depends on the library
and precision, as in sentence-transformers: faiss float32 / uint8 give inner products (of the
quantized values for uint8), faiss ubinary and usearch binary / ubinary give Hamming distances
(lower is closer), usearch float32 gives cosine distances (1 - cosine), usearch int8 its
inner-product distance. Rescored results are always float dot products, higher is closer.

One difference, where sentence-transformers has no useful behaviour: a float corpus passed with
a quantized `corpus_precision` is quantized here (sentence-transformers hands the floats to the
index as if they were codes); integer codes of another precision are refused.

faiss and usearch are optional (`pip install "sbert-flax[index]"`) and imported when called.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Literal

import numpy as np

from sbert_flax.common.arraylike import to_numpy
from sbert_flax.inference.quantization import _quantization_ranges, quantize_embeddings

logger = logging.getLogger(__name__)

FAISS_PRECISIONS: tuple[str, ...] = ("float32", "uint8", "ubinary")
USEARCH_PRECISIONS: tuple[str, ...] = ("float32", "int8", "binary", "ubinary")
# The dtype a corpus quantized by `quantize_embeddings` has at each precision.
_CODE_DTYPES = {"uint8": np.uint8, "ubinary": np.uint8, "int8": np.int8, "binary": np.int8}
# HNSW graph degree of the indexes built here (sentence-transformers' choice for faiss).
_HNSW_M = 16

Hits = list[list[dict[str, int | float]]]


def import_optional(module: str) -> Any:
    """Imports faiss / usearch, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{module} is not installed; install the index extra: "
                                  'pip install "sbert-flax[index]"', name=e.name) from None


def _check_args(corpus_embeddings: Any, corpus_index: Any, precision: str,
                allowed: tuple[str, ...], library: str, ranges: np.ndarray | None,
                calibration_embeddings: np.ndarray | None
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validates the corpus arguments: (the corpus at `precision`, or None with an index; the
    int8 / uint8 ranges)."""
    if (corpus_embeddings is None) == (corpus_index is None):
        raise ValueError("pass exactly one of corpus_embeddings and corpus_index "
                         f"(got {'both' if corpus_index is not None else 'neither'})")
    if precision not in allowed:
        raise ValueError(f"corpus_precision={precision!r} is not supported for {library}; "
                         f"expected one of {allowed}")
    if corpus_embeddings is None:
        return None, ranges
    corpus = to_numpy(corpus_embeddings)
    if corpus.ndim != 2:
        raise ValueError(f"corpus_embeddings must be 2-D [n, dim], got shape {corpus.shape}")
    want = _CODE_DTYPES.get(precision)
    if np.issubdtype(corpus.dtype, np.floating):
        if want is None:
            return corpus, ranges
        # sentence-transformers would hand float rows to the index as if they were codes (the
        # index casts them: garbage); quantize them here instead, and the queries with the same
        # ranges: `ranges`, else the calibration set's, else the corpus' own.
        if precision.endswith("int8") and ranges is None:
            ranges = _quantization_ranges(corpus, precision, calibration_embeddings)
        return quantize_embeddings(corpus, precision, ranges=ranges), ranges
    if want is None or corpus.dtype != want:
        raise ValueError(f"corpus_precision={precision!r} expects float embeddings or "
                         f"{np.dtype(want or np.float32).name} codes from "
                         f"quantize_embeddings(..., {precision!r}), got {corpus.dtype.name}")
    return corpus, ranges


def _prepare_queries(query_embeddings: Any, precision: str, ranges: np.ndarray | None,
                     calibration_embeddings: np.ndarray | None, rescore: bool,
                     rescore_multiplier: int, top_k: int, caller: str
                     ) -> tuple[np.ndarray, np.ndarray | None, int, np.ndarray | None]:
    """(queries at the corpus precision, float queries to rescore with or None, how many
    candidates to fetch, the int8/uint8 ranges)."""
    if top_k < 1 or rescore_multiplier < 1:
        raise ValueError(f"top_k={top_k} and rescore_multiplier={rescore_multiplier} must be >= 1")
    queries = to_numpy(query_embeddings)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.dtype in (np.uint8, np.int8):  # already quantized: nothing to rescore with
        if rescore:
            logger.warning("%s: rescore=True, but the query embeddings are quantized; pass float "
                           "queries to rescore, or rescore=False", caller)
        return queries, None, top_k, ranges
    rescore_with, k = None, top_k
    if rescore and precision != "float32":
        rescore_with, k = queries, top_k * rescore_multiplier
    elif rescore:
        logger.warning("%s: rescore=True, but the corpus is float32, so there is nothing to "
                       "rescore; pass rescore=False, or quantize the corpus and pass its "
                       "corpus_precision", caller)
    if precision.endswith("int8") and ranges is None:
        # From the calibration set, else the queries themselves: the same buckets quantize the
        # queries and dequantize the candidates (they must be the corpus's to mean anything).
        ranges = _quantization_ranges(queries, precision, calibration_embeddings)
    coded = quantize_embeddings(queries, precision, ranges=ranges)
    return coded, rescore_with, k, ranges


def _dequantize(codes: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """int8 / uint8 codes -> the bucket starts in the float space (float64), the inverse of
    `quantize_embeddings` up to the bucket width."""
    ranges = to_numpy(ranges).astype(np.float32, copy=False)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    values = codes.astype(np.float64) + (128 if precision == "int8" else 0)
    return values * steps + ranges[0]


def _candidate_vectors(codes: np.ndarray, precision: str, ranges: np.ndarray | None,
                       dim: int) -> np.ndarray:
    """Stored candidate codes [q, k, bytes or dim] -> vectors comparable with the float query."""
    if precision.endswith("binary"):
        # packbits padded the last byte; the query's dim says how many bits are real.
        return np.unpackbits(codes.astype(np.uint8), axis=-1)[..., :dim].astype(np.float64)
    if precision.endswith("int8"):
        return _dequantize(codes, precision, ranges)
    return codes.astype(np.float64)


def _rescore(queries: np.ndarray, candidates: np.ndarray, ids: np.ndarray, valid: np.ndarray,
             top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-ranks the candidates by float dot product: (scores, ids, valid), each [q, <=top_k]."""
    scores = np.einsum("qd,qkd->qk", queries.astype(np.float64), candidates)
    scores[~valid] = -np.inf  # padding slots never outrank a real candidate
    # Stable: equal scores keep the index's order.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(scores), take(ids), take(valid)


def _hits(scores: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> Hits:
    return [[{"corpus_id": int(i), "score": float(s)}
             for s, i, ok in zip(sr, ir, vr, strict=True) if ok]
            for sr, ir, vr in zip(scores.tolist(), ids.tolist(), valid.tolist(), strict=True)]


def semantic_search_faiss(query_embeddings: Any, corpus_embeddings: Any = None,
                          corpus_index: Any = None,
                          corpus_precision: Literal["float32", "uint8", "ubinary"] = "float32",
                          top_k: int = 10, ranges: np.ndarray | None = None,
                          calibration_embeddings: np.ndarray | None = None, rescore: bool = True,
                          rescore_multiplier: int = 2, exact: bool = True,
                          output_index: bool = False) -> tuple:
    """Top-k search with faiss, like `sentence_transformers.util.semantic_search_faiss`.

    Args:
      query_embeddings: [n_q, D] float queries (quantized here to the corpus precision; kept as
        float for rescoring), or queries already quantized (uint8: no rescoring).
      corpus_embeddings: [n_c, D] codes from `quantize_embeddings(..., corpus_precision)`, or
        floats (quantized here; int8 / uint8 with `ranges`, else the calibration set's, else
        the corpus' own, which then quantize the queries too); exactly one of this and
        `corpus_index`.
      corpus_index: a faiss index from an earlier call's `output_index=True`.
      corpus_precision: "float32", "uint8" or "ubinary".
      top_k: results per query (fewer when the index holds fewer).
      ranges: [2, D] uint8 buckets, as given to `quantize_embeddings` for the corpus.
      calibration_embeddings: where to take the uint8 ranges from when `ranges` is None
        (default: the queries, which rarely matches the corpus's buckets).
      rescore: re-rank `top_k * rescore_multiplier` candidates of a quantized corpus by the
        float query's dot product with the dequantized / unpacked candidates.
      rescore_multiplier: candidates fetched per result when rescoring.
      exact: a flat (brute force) index; False builds an HNSW graph (M=16).
      output_index: also return the index, to pass as `corpus_index` next time.

    Returns:
      (hits, search seconds) or (hits, search seconds, index); hits per query are
      `{"corpus_id", "score"}` best first (scores as the module docstring says).

    Raises:
      ValueError: both or neither corpus argument, an unsupported precision, or integer codes
        of another precision.
      ModuleNotFoundError: faiss is absent.
    """
    faiss = import_optional("faiss")
    corpus, ranges = _check_args(corpus_embeddings, corpus_index, corpus_precision,
                                 FAISS_PRECISIONS, "faiss", ranges, calibration_embeddings)
    binary = corpus_precision == "ubinary"
    if corpus_index is None:
        if binary:
            nbits = corpus.shape[1] * 8
            corpus_index = (faiss.IndexBinaryFlat(nbits) if exact
                            else faiss.IndexBinaryHNSW(nbits, _HNSW_M))
            corpus_index.add(np.ascontiguousarray(corpus, np.uint8))
        else:
            dim = corpus.shape[1]
            # uint8 codes are stored as float32 values 0..255: an inner product of the codes.
            corpus_index = (faiss.IndexFlatIP(dim) if exact else
                            faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT))
            corpus_index.add(np.ascontiguousarray(corpus, np.float32))
    queries, rescore_with, k, ranges = _prepare_queries(
        query_embeddings, corpus_precision, ranges, calibration_embeddings, rescore,
        rescore_multiplier, top_k, "semantic_search_faiss")
    queries = np.ascontiguousarray(queries, np.uint8 if binary else np.float32)

    start = time.perf_counter()
    scores, ids = corpus_index.search(queries, k)
    valid = ids != -1  # faiss pads short result lists with id -1
    if rescore_with is not None:
        codes = _reconstruct(corpus_index, ids, valid, binary)
        cands = _candidate_vectors(codes, corpus_precision, ranges, rescore_with.shape[1])
        scores, ids, valid = _rescore(rescore_with, cands, ids, valid, top_k)
    seconds = time.perf_counter() - start

    hits = _hits(scores, ids, valid)
    return (hits, seconds, corpus_index) if output_index else (hits, seconds)


def _reconstruct(index: Any, ids: np.ndarray, valid: np.ndarray, binary: bool) -> np.ndarray:
    """The stored vectors of faiss candidates [q, k] -> [q, k, d] (zeros in padding slots)."""
    width = index.d // 8 if binary else index.d
    codes = np.zeros((ids.size, width), np.uint8 if binary else np.float32)
    flat = ids.ravel()
    rows = np.flatnonzero(valid.ravel())
    if not binary and hasattr(index, "reconstruct_batch"):
        codes[rows] = index.reconstruct_batch(flat[rows])
    else:  # binary indexes reconstruct one vector at a time
        for r in rows:
            codes[r] = index.reconstruct(int(flat[r]))
    return codes.reshape(*ids.shape, width)


def semantic_search_usearch(query_embeddings: Any, corpus_embeddings: Any = None,
                            corpus_index: Any = None,
                            corpus_precision: Literal["float32", "int8", "binary",
                                                      "ubinary"] = "float32",
                            top_k: int = 10, ranges: np.ndarray | None = None,
                            calibration_embeddings: np.ndarray | None = None,
                            rescore: bool = True, rescore_multiplier: int = 2, exact: bool = True,
                            output_index: bool = False) -> tuple:
    """Top-k search with usearch, like `sentence_transformers.util.semantic_search_usearch`.

    Args:
      query_embeddings: [n_q, D] float queries, or queries already quantized (no rescoring).
      corpus_embeddings: [n_c, D] codes from `quantize_embeddings(..., corpus_precision)`, or
        floats (quantized here, as in `semantic_search_faiss`); exactly one of this and
        `corpus_index`.
      corpus_index: a `usearch.index.Index` from an earlier call's `output_index=True` (keys
        are the corpus rows).
      corpus_precision: "float32" (cosine), "int8" (inner product), "binary" / "ubinary"
        (Hamming). "float32" also for an index that stores float16 / bfloat16.
      top_k, ranges, calibration_embeddings, rescore, rescore_multiplier, output_index: as in
        `semantic_search_faiss` (ranges: the int8 buckets).
      exact: brute force over every vector; False walks usearch's HNSW graph.

    Returns:
      (hits, search seconds) or (hits, search seconds, index).

    Raises:
      ValueError: both or neither corpus argument, an unsupported precision, or integer codes
        of another precision.
      ModuleNotFoundError: usearch is absent.
    """
    usearch_index = import_optional("usearch.index")
    corpus, ranges = _check_args(corpus_embeddings, corpus_index, corpus_precision,
                                 USEARCH_PRECISIONS, "usearch", ranges, calibration_embeddings)
    binary = corpus_precision.endswith("binary")
    if corpus_index is None:
        if binary:
            corpus_index = usearch_index.Index(ndim=corpus.shape[1] * 8, metric="hamming",
                                               dtype="b1")
            if corpus_precision == "binary":
                # A b1 index stores raw bit bytes: undo quantize_embeddings' -128 offset.
                corpus = _as_bits(corpus)
        elif corpus_precision == "int8":
            corpus_index = usearch_index.Index(ndim=corpus.shape[1], metric="ip", dtype="i8")
        else:
            corpus_index = usearch_index.Index(ndim=corpus.shape[1], metric="cos", dtype="f32")
        corpus_index.add(np.arange(len(corpus)), corpus)
    queries, rescore_with, k, ranges = _prepare_queries(
        query_embeddings, corpus_precision, ranges, calibration_embeddings, rescore,
        rescore_multiplier, top_k, "semantic_search_usearch")

    start = time.perf_counter()
    if corpus_precision == "binary":
        queries = _as_bits(queries)
    matches = corpus_index.search(queries, count=k, exact=exact)
    scores, ids = np.atleast_2d(matches.distances), np.atleast_2d(matches.keys)
    # A batch pads each row past its `counts`; one query's Matches holds only real matches.
    counts = np.reshape(getattr(matches, "counts", ids.shape[1]), (-1, 1))
    valid = np.arange(ids.shape[1])[None, :] < counts
    if rescore_with is not None and valid.any():
        # Padding slots look up any real key (get() has none for them); rescoring drops them.
        keys = np.where(valid, ids, ids[valid][0])
        codes = np.stack([np.asarray(v) for v in corpus_index.get(keys.ravel())])
        codes = codes.reshape(*keys.shape, -1)
        cands = _candidate_vectors(codes, corpus_precision, ranges, rescore_with.shape[1])
        scores, ids, valid = _rescore(rescore_with, cands, ids, valid, top_k)
    seconds = time.perf_counter() - start

    hits = _hits(scores, ids, valid)
    return (hits, seconds, corpus_index) if output_index else (hits, seconds)


def _as_bits(codes: np.ndarray) -> np.ndarray:
    """"binary" codes (int8, bytes offset by -128) -> the raw packed bytes (uint8)."""
    return codes.view(np.uint8) ^ np.uint8(0x80)
