"""An on-disk vector index (faiss) built from what `sbert-flax encode` wrote, and its search.

Layout of an index folder::

    index.json      {"format": "sbert-flax-index", "version": 1, "kind", "precision", "metric",
                     "dim", "count", "build_seconds", "bytes", "bytes_per_vector", "params",
                     "embeddings": source path, "texts": {"path", "sha256", "lines"} | null, ...}
    vectors.faiss   the faiss index (faiss.write_index / write_index_binary)

Vector i is row i of the embeddings, which is line i (0-based) of the corpus text file that
`encode` read: the faiss ids are those line numbers, so the mapping needs no table of its own;
`texts` records the file (and its hash, checked when the texts are read back) so `search` can
print them. The folder is written under a temp name and renamed when complete.

The build streams the rows (`EmbeddingRows`: a block at a time, shards in order), so memory is
the index plus one block; a trained index (int8 scalar quantizer, IVF-PQ) first reads a random
sample by row id.

Kinds and precisions (the stored vectors):
- "flat": brute force; "hnsw": a graph (faiss HNSW, M neighbours); "ivf-pq": inverted lists over
  k-means cells, vectors product-quantized to `pq_m` bytes (precision must be "float32": the PQ
  codes are the compression).
- "float32", "float16", "int8" (faiss' 8-bit scalar quantizer, per-dimension min/max trained on
  a sample), "binary" (sign bits, Hamming distance).

faiss over usearch for HNSW too: one library covers the three kinds and every precision
(binary included), one file format, one set of search knobs; usearch only has HNSW.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import time
from typing import Any

import numpy as np

from sbert_flax.common.arraylike import as_matrix, l2_normalize_rows
from sbert_flax.common.files import (
    atomic_directory,
    count_text_lines,
    read_json,
    read_text_lines,
    write_json,
)
from sbert_flax.inference.quantization import quantize_embeddings
from sbert_flax.retrieval.ann import import_optional
from sbert_flax.retrieval.embedding_rows import EmbeddingRows

INDEX_FORMAT = "sbert-flax-index"
INDEX_VERSION = 1
INFO_FILE = "index.json"
VECTORS_FILE = "vectors.faiss"
KINDS: tuple[str, ...] = ("flat", "hnsw", "ivf-pq")
PRECISIONS: tuple[str, ...] = ("float32", "float16", "int8", "binary")
METRICS: tuple[str, ...] = ("cos", "dot")

Hits = list[list[dict[str, int | float]]]


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How to build an index. Fields that do not apply to the kind are ignored."""

    kind: str = "flat"  # "flat" | "hnsw" | "ivf-pq"
    precision: str = "float32"  # "float32" | "float16" | "int8" | "binary" (ivf-pq: "float32")
    metric: str = "cos"  # "cos": rows and queries L2-normalised, then inner product; "dot": as is
    # hnsw: faiss' own defaults; building is the cost on a CPU (M=32 / efConstruction=80
    # takes ~3x as long for a little recall).
    hnsw_m: int = 16  # hnsw: graph neighbours per node (more: better recall, bigger, slower)
    ef_construction: int = 40  # hnsw: candidate list while inserting
    ef_search: int = 64  # hnsw: default candidate list while searching (override per search)
    nlist: int | None = None  # ivf-pq: k-means cells (None: 4 * sqrt(count), at most count / 39)
    pq_m: int | None = None  # ivf-pq: bytes per vector (None: dim / 8); must divide dim
    pq_bits: int = 8  # ivf-pq: bits per sub-quantizer code
    nprobe: int = 16  # ivf-pq: default cells visited per query (override per search)
    train_rows: int | None = None  # int8 / ivf-pq: sample size (None: max(40 * nlist, 16384))
    chunk_rows: int = 16384  # rows read and added at a time (32 MiB of 512-d float32)
    seed: int = 0  # the training sample's draw

    def check(self) -> None:
        """Raises ValueError naming the field that is wrong."""
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; expected one of {PRECISIONS}")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}; expected one of {METRICS}")
        if self.kind == "ivf-pq" and self.precision != "float32":
            raise ValueError(f"kind='ivf-pq' stores product-quantized codes; precision must be "
                             f"'float32' (the input), got {self.precision!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "pq_bits", "nprobe", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ivf_params(cfg: IndexConfig, dim: int, count: int) -> tuple[int, int]:
    nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
    pq_m = cfg.pq_m or max(1, dim // 8)
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the embedding dim {dim}")
    need = max(nlist, 2 ** cfg.pq_bits)
    if count < need:
        raise ValueError(f"ivf-pq with nlist={nlist} and pq_bits={cfg.pq_bits} needs at least "
                         f"{need} vectors to train, the corpus has {count}; use kind 'flat' or "
                         "'hnsw', or lower pq_bits / nlist")
    return nlist, pq_m


def _new_index(faiss: Any, cfg: IndexConfig, dim: int, nlist: int, pq_m: int) -> Any:
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.precision == "binary":
        nbits = 8 * -(-dim // 8)  # packbits pads to whole bytes (zeros on both sides)
        if cfg.kind == "hnsw":
            index = faiss.IndexBinaryHNSW(nbits, cfg.hnsw_m)
            index.hnsw.efConstruction = cfg.ef_construction
            return index
        return faiss.IndexBinaryFlat(nbits)
    if cfg.kind == "ivf-pq":
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m, cfg.pq_bits, ip)
    qtype = {"float16": faiss.ScalarQuantizer.QT_fp16,
             "int8": faiss.ScalarQuantizer.QT_8bit}.get(cfg.precision)
    if cfg.kind == "hnsw":
        index = (faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip) if qtype is None
                 else faiss.IndexHNSWSQ(dim, qtype, cfg.hnsw_m, ip))
        index.hnsw.efConstruction = cfg.ef_construction
        return index
    return faiss.IndexFlatIP(dim) if qtype is None else faiss.IndexScalarQuantizer(dim, qtype, ip)


def _encode_rows(x: np.ndarray, precision: str, metric: str) -> np.ndarray:
    """float rows -> what the index stores / is queried with."""
    if precision == "binary":
        return quantize_embeddings(x, "ubinary")  # sign bits: the same with or without norm
    x = l2_normalize_rows(x) if metric == "cos" else x
    return np.ascontiguousarray(x, np.float32)


def build_index(embeddings_path: str, index_dir: str, texts_path: str | None = None,
                config: IndexConfig = IndexConfig(), overwrite: bool = False) -> dict[str, Any]:
    """Builds an index folder from `encode`'s output, streaming the rows.

    Args:
      embeddings_path: a float `.npy`, or the output path / manifest of a multi-process encode.
      index_dir: the folder to write (temp name, renamed when complete).
      texts_path: the corpus text file the embeddings came from (one line per row); recorded so
        searches can print the texts. Its line count must equal the rows.
      config: kind, precision, metric and the kind's parameters.
      overwrite: replace an existing non-empty `index_dir`.

    Returns:
      The index.json record (build seconds, bytes, ...).

    Raises:
      FileNotFoundError: the embeddings or texts are missing (named).
      ValueError: a bad file (named), a line count that differs from the rows, a bad config.
      FileExistsError: `index_dir` exists and `overwrite` is False.
    """
    config.check()
    faiss = import_optional("faiss")
    rows = EmbeddingRows(embeddings_path)
    if rows.count == 0:
        raise ValueError(f"{embeddings_path}: holds no rows; nothing to index")
    texts = None
    if texts_path is not None:
        lines = count_text_lines(texts_path)
        if lines != rows.count:
            raise ValueError(f"{texts_path} has {lines} lines but {embeddings_path} holds "
                             f"{rows.count} rows; pass the text file that was encoded")
        texts = {"path": os.path.abspath(texts_path), "sha256": _file_sha256(texts_path),
                 "lines": lines}
    nlist, pq_m = (_ivf_params(config, rows.dim, rows.count) if config.kind == "ivf-pq"
                   else (0, 0))
    start = time.perf_counter()
    index = _new_index(faiss, config, rows.dim, nlist, pq_m)
    train_rows = 0
    if not index.is_trained:  # int8 ranges, IVF cells, PQ codebooks
        train_rows = config.train_rows or max(40 * nlist, 16384)
        sample = rows.sample(train_rows, seed=config.seed)
        train_rows = len(sample)
        index.train(_encode_rows(sample, config.precision, config.metric))
        del sample
    for _, block in rows.chunks(config.chunk_rows):
        index.add(_encode_rows(block, config.precision, config.metric))
    build_seconds = time.perf_counter() - start
    if config.kind == "ivf-pq":
        index.nprobe = config.nprobe
    params = {"hnsw_m": config.hnsw_m, "ef_construction": config.ef_construction,
              "ef_search": config.ef_search} if config.kind == "hnsw" else {}
    if config.kind == "ivf-pq":
        params = {"nlist": nlist, "pq_m": pq_m, "pq_bits": config.pq_bits,
                  "nprobe": config.nprobe}
    if train_rows:
        params["train_rows"] = train_rows
    with atomic_directory(index_dir, overwrite=overwrite) as tmp:
        vec_path = os.path.join(tmp, VECTORS_FILE)
        (faiss.write_index_binary if config.precision == "binary"
         else faiss.write_index)(index, vec_path)
        nbytes = os.path.getsize(vec_path)
        info = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": config.kind,
                "precision": config.precision, "metric": config.metric, "dim": rows.dim,
                "count": rows.count, "ids": "vector i = row i of the embeddings = line i "
                "(0-based) of the texts", "build_seconds": round(build_seconds, 3),
                "bytes": nbytes, "bytes_per_vector": round(nbytes / rows.count, 2),
                "params": params, "embeddings": os.path.abspath(embeddings_path),
                "embedding_files": [os.path.abspath(f) for f in rows.files], "texts": texts,
                "faiss_version": faiss.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
        write_json(os.path.join(tmp, INFO_FILE), info)
    return info


class VectorIndex:
    """An index folder opened for search (`open_index`)."""

    def __init__(self, folder: str, info: dict[str, Any], index: Any):
        self.folder, self.info, self.index = folder, info, index

    @property
    def count(self) -> int:
        return int(self.info["count"])

    def texts(self) -> list[str]:
        """The corpus lines (id = line number), checked against the hash taken at build time.

        Raises:
          ValueError: the index was built without texts, or the file changed since.
          FileNotFoundError: the recorded file is gone.
        """
        t = self.info.get("texts")
        if not t:
            raise ValueError(f"{self.folder}: built without texts (index build --texts); the "
                             "hits have ids only")
        if not os.path.isfile(t["path"]):
            raise FileNotFoundError(f"{t['path']}: the texts of index {self.folder} are missing")
        if _file_sha256(t["path"]) != t["sha256"]:
            raise ValueError(f"{t['path']} changed since index {self.folder} was built (sha256 "
                             "differs); rebuild the index from its current embeddings")
        return read_text_lines(t["path"])

    def search(self, query_embeddings: Any, top_k: int = 10, *, ef_search: int | None = None,
               nprobe: int | None = None, rescore: bool = False,
               rescore_multiplier: int = 4) -> Hits:
        """Top-k per query, in the structure of `retrieval.search.semantic_search`.

        Scores: metric "cos": cosine (approximate for float16 / int8 / ivf-pq); "dot": the
        inner product; precision "binary": 1 - 2 * hamming / dim (the share of agreeing signs,
        in [-1, 1]). With `rescore`, `top_k * rescore_multiplier` candidates are re-scored
        exactly (cosine or dot) from the float rows of the embeddings the index was built from
        (read by id, never loaded whole).

        Args:
          query_embeddings: [n_q, D] or [D] floats (the same model as the corpus).
          top_k: results per query (fewer if the index holds fewer).
          ef_search: hnsw: the candidate list (default: the build's `ef_search`).
          nprobe: ivf-pq: cells visited (default: the build's `nprobe`).
          rescore: re-score candidates from the source embeddings (must still exist).
          rescore_multiplier: candidates per result when rescoring.
        """
        if top_k < 1 or rescore_multiplier < 1:
            raise ValueError(f"top_k={top_k} and rescore_multiplier={rescore_multiplier} must "
                             "be >= 1")
        info = self.info
        queries = as_matrix(query_embeddings, "query_embeddings")
        if queries.shape[1] != info["dim"]:
            raise ValueError(f"queries have dim {queries.shape[1]}, index {self.folder} holds "
                             f"dim {info['dim']}")
        k = top_k * rescore_multiplier if rescore else top_k
        if info["kind"] == "hnsw":
            self.index.hnsw.efSearch = max(ef_search or info["params"]["ef_search"], k)
        elif info["kind"] == "ivf-pq":
            self.index.nprobe = nprobe or info["params"]["nprobe"]
        scores, ids = self.index.search(_encode_rows(queries, info["precision"],
                                                     info["metric"]), k)
        scores = scores.astype(np.float32)
        if info["precision"] == "binary":
            scores = 1 - 2 * scores / info["dim"]
        if rescore:
            scores, ids = self._rescore(queries, ids, top_k)
        return [[{"corpus_id": i, "score": s} for s, i in zip(sr, ir, strict=True) if i >= 0]
                for sr, ir in zip(scores.tolist(), ids.tolist(), strict=True)]

    def _rescore(self, queries: np.ndarray, ids: np.ndarray, top_k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        rows = EmbeddingRows(self.info["embeddings"])
        if (rows.count, rows.dim) != (self.count, self.info["dim"]):
            raise ValueError(f"{self.info['embeddings']} now holds ({rows.count}, {rows.dim}), "
                             f"index {self.folder} was built from ({self.count}, "
                             f"{self.info['dim']}); rescoring needs the original rows")
        valid = ids >= 0
        cands = rows.take(np.where(valid, ids, 0)).reshape(*ids.shape, -1)  # [q, k, D]
        if self.info["metric"] == "cos":
            queries, cands = l2_normalize_rows(queries), l2_normalize_rows(cands)
        scores = np.einsum("qd,qkd->qk", queries, cands)
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return (np.take_along_axis(scores, order, axis=1),
                np.take_along_axis(np.where(valid, ids, -1), order, axis=1))


def open_index(folder: str, mmap: bool = False) -> VectorIndex:
    """Opens an index folder written by `build_index`.

    Args:
      folder: the index folder.
      mmap: memory-map the vectors instead of reading them (flat float32 / binary indexes; the
        OS pages them in as searches touch them).

    Raises:
      FileNotFoundError: no index.json / vectors file in `folder`.
      ValueError: not an sbert-flax index of a version this code reads (names the file).
    """
    faiss = import_optional("faiss")
    info_path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{folder}: not an index folder ({INFO_FILE} is missing); build "
                                "one with `sbert-flax index build`")
    info = read_json(info_path)
    if info.get("format") != INDEX_FORMAT or info.get("version") != INDEX_VERSION:
        raise ValueError(f"{info_path}: not a {INDEX_FORMAT} v{INDEX_VERSION} index "
                         f"(format={info.get('format')!r}, version={info.get('version')!r})")
    vec_path = os.path.join(folder, VECTORS_FILE)
    if not os.path.isfile(vec_path):
        raise FileNotFoundError(f"{vec_path}: missing; the index folder is incomplete")
    flags = faiss.IO_FLAG_MMAP if mmap else 0
    index = (faiss.read_index_binary(vec_path, flags) if info["precision"] == "binary"
             else faiss.read_index(vec_path, flags))
    if index.ntotal != info["count"]:
        raise ValueError(f"{vec_path}: holds {index.ntotal} vectors, {info_path} says "
                         f"{info['count']}")
    return VectorIndex(folder, info, index)
