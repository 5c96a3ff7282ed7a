"""Corpus utilities compatible with `sentence_transformers.util`: search, mining, quantization.

- `semantic_search` / `paraphrase_mining`: exact top-k by cosine (or dot) similarity, computed in
  jitted chunks sharded over the local devices; the full query x corpus matrix never exists.
- `quantize_embeddings`: float32 / int8 / uint8 / binary / ubinary, bit-for-bit what
  `sentence_transformers.quantization.quantize_embeddings` returns.
- Embeddings files: one `.npy`, or shards written by a multi-process encode plus a JSON manifest
  (format below); `load_embeddings` reads either as one array in input order.

Embeddings-file format (version 1). For an output path `P` and N processes, process i writes
`shard_path(P, i, N)` = `f"{P}.shard-{i:05d}-of-{N:05d}.npy"` (a standard 2-D `.npy`), and
process 0 writes `manifest_path(P)` = `f"{P}.manifest.json"`::

    {"format": "sbert-flax-embeddings", "version": 1, "rows": total, "dim": D,
     "dtype": "float32", "shards": [{"path": "<shard, relative to the manifest's folder>",
                                     "start": s, "rows": n}, ...]}

`merge_shards(P)` turns that into a single `P`, then deletes the shards and the manifest; `P`
always takes precedence over a manifest beside it, so a merge interrupted at any point leaves a
readable result.
"""

from __future__ import annotations

import collections
import functools
import heapq
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.files import read_json, write_json

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "sbert-flax-embeddings"
MANIFEST_VERSION = 1
_AXIS = "corpus"
# Traces of the jitted search kernels, by name: tests assert the compile count stays bounded.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

ScoreFunction = Literal["cos_sim", "dot_score"] | Callable[[jax.Array, jax.Array], jax.Array] | None


# ---------------------------------------------------------------------------------------------
# Array conversion
# ---------------------------------------------------------------------------------------------

def _to_numpy(x: Any) -> np.ndarray:
    """numpy / jax / torch (any device, bf16 included) -> a numpy array, without copying numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; torch is not imported here
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _as_matrix(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D [n, dim], got shape {a.shape}")
    # Sub-float32 inputs are upcast, as sentence-transformers does: bf16 matmul outputs would
    # round nearby scores into spurious ties.
    return a if a.dtype == np.float32 else a.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Semantic search
# ---------------------------------------------------------------------------------------------

def _normalize(x: jax.Array) -> jax.Array:
    # torch.nn.functional.normalize: x / max(||x||, 1e-12).
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _score_kind(score_function: ScoreFunction) -> str | Callable:
    """"cos" | "dot" | a user callable on jax arrays (traced inside the kernel)."""
    if score_function is None:
        return "cos"
    if isinstance(score_function, str):
        name = score_function
    else:
        # sentence_transformers.util.cos_sim / dot_score are torch functions: map them by name.
        name = getattr(score_function, "__name__", "")
        mod = getattr(score_function, "__module__", "") or ""
        if not mod.startswith("sentence_transformers"):
            return score_function
    if name in ("cos", "cos_sim", "cosine"):
        return "cos"
    if name in ("dot", "dot_score"):
        return "dot"
    raise ValueError(f"score_function={score_function!r}; expected None/'cos_sim' (cosine), "
                     "'dot' (dot product) or a callable (a [m, D], b [n, D]) -> [m, n] on jax arrays")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bucket(n: int, cap: int) -> int:
    """A padded size for n rows, at most `cap`: few distinct shapes, little padding.

    The next power of two up to 1024; above, the next multiple of 1/16 of it (< 12.5% padding,
    at most 8 shapes per doubling of n).
    """
    b = 1 << max(0, n - 1).bit_length()
    if b > 1024:
        b = _round_up(n, b // 16)
    return min(cap, b)


@functools.cache
def _kernels(devices: tuple[jax.Device, ...], score: str | Callable, k: int, kc: int):
    """Jitted (prepare, chunk top-k, merge) for one device set, score and (k, chunk k)."""
    mesh = Mesh(np.asarray(devices), (_AXIS,))
    rows = NamedSharding(mesh, P(_AXIS))

    def prepare(c):
        TRACE_COUNTS["prepare"] += 1
        return _normalize(c) if score == "cos" else c

    def chunk_topk(q, c, n_valid, offset):
        TRACE_COUNTS["chunk_topk"] += 1
        if score == "cos":
            q = _normalize(q)

        def local(q, c):  # q [Qc, D] whole, c [Cc / ndev, D] this device's rows
            s = q @ c.T if isinstance(score, str) else score(q, c)  # [Qc, Cl]
            cl = c.shape[0]
            row0 = jax.lax.axis_index(_AXIS) * cl
            ids = row0 + jnp.arange(cl, dtype=jnp.int32)
            s = jnp.where(ids[None, :] < n_valid, s.astype(jnp.float32), -jnp.inf)
            v, i = jax.lax.top_k(s, min(kc, cl))
            # Device order = row order, and top_k puts the lower index first among ties, so the
            # gathered candidates resolve ties exactly as one device would.
            v = jax.lax.all_gather(v, _AXIS, axis=1, tiled=True)
            i = jax.lax.all_gather(ids[i], _AXIS, axis=1, tiled=True)
            v, pos = jax.lax.top_k(v, kc)
            return v, jnp.take_along_axis(i, pos, axis=1) + offset

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(_AXIS)), out_specs=(P(), P()),
                             check_vma=False)(q, c)

    def merge(v0, i0, v1, i1):
        TRACE_COUNTS["merge"] += 1
        # The running best comes first: earlier corpus chunks (lower ids) win ties.
        v, pos = jax.lax.top_k(jnp.concatenate([v0, v1], axis=1), k)
        return v, jnp.take_along_axis(jnp.concatenate([i0, i1], axis=1), pos, axis=1)

    return (jax.jit(prepare, in_shardings=rows, out_shardings=rows), jax.jit(chunk_topk),
            jax.jit(merge), rows, NamedSharding(mesh, P()))


def _topk_blocks(queries: np.ndarray, corpus: np.ndarray, *, top_k: int, query_chunk_size: int,
                 corpus_chunk_size: int, score_function: ScoreFunction,
                 query_block: int | None = None, devices: Sequence[jax.Device] | None = None
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (first query row, scores [b, k], corpus ids [b, k]) per block of queries.

    Sorted by score descending, ties by lower corpus id; k = min(top_k, len(corpus)); id -1 marks
    an empty slot (only when fewer than k scores beat -inf). Within a
    block the corpus chunks are the outer loop, so each is sent to the devices once per block.
    """
    n_q, n_c = len(queries), len(corpus)
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != corpus dim {corpus.shape[1]}")
    if query_chunk_size < 1 or corpus_chunk_size < 1:
        raise ValueError(f"query_chunk_size={query_chunk_size} and corpus_chunk_size="
                         f"{corpus_chunk_size} must be >= 1")
    devices = tuple(devices if devices is not None else jax.local_devices())
    k = min(top_k, n_c)
    # Fixed shapes: every chunk is padded to (qc, cc), so an arbitrary corpus compiles once per
    # (bucket, k); cc is a multiple of the device count so its rows split evenly.
    qc = _bucket(n_q, query_chunk_size)
    cc = _round_up(_bucket(n_c, corpus_chunk_size), len(devices))
    kc = min(k, cc)
    prepare, chunk_topk, merge, rows, repl = _kernels(devices, _score_kind(score_function), k, kc)
    dim = corpus.shape[1]
    n_chunks = -(-n_c // cc)
    cached: list[jax.Array] = []

    def corpus_chunk(j: int) -> jax.Array:
        if cached:
            return cached[0]
        part = corpus[j * cc:(j + 1) * cc]
        if len(part) < cc:  # only the last chunk is short: pad with zero rows, masked as -inf
            part = np.concatenate([part, np.zeros((cc - len(part), dim), np.float32)])
        dev = prepare(jax.device_put(np.ascontiguousarray(part, np.float32), rows))
        if n_chunks == 1:  # reused by every query block
            cached.append(dev)
        return dev

    block = max(qc, _round_up(query_block or n_q, qc))
    for b0 in range(0, n_q, block):
        b1 = min(b0 + block, n_q)
        q_chunks = []
        for s in range(b0, b1, qc):
            part = queries[s:s + qc]
            if len(part) < qc:
                part = np.concatenate([part, np.zeros((qc - len(part), dim), np.float32)])
            q_chunks.append(jax.device_put(np.ascontiguousarray(part), repl))
        # Running best per query chunk, starting empty (-inf, id -1) so every merge has one shape
        # (and one sharding: replicated, like chunk_topk's outputs).
        empty = (jax.device_put(np.full((qc, k), -np.inf, np.float32), repl),
                 jax.device_put(np.full((qc, k), -1, np.int32), repl))
        best = [empty] * len(q_chunks)
        for j in range(n_chunks):
            c = corpus_chunk(j)
            for t, q in enumerate(q_chunks):
                v, i = chunk_topk(q, c, np.int32(min(cc, n_c - j * cc)), np.int32(j * cc))
                best[t] = merge(*best[t], v, i)
        vals = np.concatenate([np.asarray(b[0]) for b in best])[:b1 - b0]
        ids = np.concatenate([np.asarray(b[1]) for b in best])[:b1 - b0]
        yield b0, vals, ids


def semantic_search(query_embeddings: Any, corpus_embeddings: Any, query_chunk_size: int = 100,
                    corpus_chunk_size: int = 500000, top_k: int = 10,
                    score_function: ScoreFunction = None,
                    devices: Sequence[jax.Device] | None = None
                    ) -> list[list[dict[str, int | float]]]:
    """Top-k corpus entries per query, like `sentence_transformers.util.semantic_search`.

    Computed as jitted chunked matmuls + `jax.lax.top_k` with a running top-k merged on the
    device; each corpus chunk's rows are split over `jax.local_devices()`. Chunks are padded to
    a fixed shape (the chunk size, or the next power of two for a smaller input), so any corpus
    compiles a bounded number of shapes.

    Args:
      query_embeddings: [n_q, D] or [D] float array (numpy, jax or torch).
      corpus_embeddings: [n_c, D] float array (a memmap is read one chunk at a time).
      query_chunk_size: queries per kernel call.
      corpus_chunk_size: corpus rows per kernel call (over all devices together).
      top_k: results per query (fewer if the corpus is smaller).
      score_function: None or "cos_sim" (cosine, both sides L2-normalised with eps 1e-12),
        "dot" (dot product), sentence-transformers' `cos_sim` / `dot_score`, or a callable
        `(a [m, D], b [n, D]) -> [m, n]` on jax arrays, traced into the kernel (pass the same
        function object again to reuse its compilation).
      devices: the devices to split corpus chunks over (default `jax.local_devices()`).

    Returns:
      Per query, a list of `{"corpus_id": int, "score": float}` sorted by score descending;
      equal scores are ordered by ascending corpus id.

    Raises:
      ValueError: `top_k` < 1, or the query and corpus dims differ.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    queries = _as_matrix(query_embeddings, "query_embeddings")
    corpus = _as_matrix(corpus_embeddings, "corpus_embeddings")
    if len(corpus) == 0 or len(queries) == 0:
        return [[] for _ in range(len(queries))]
    (_, vals, ids), = _topk_blocks(queries, corpus, top_k=top_k, query_chunk_size=query_chunk_size,
                                   corpus_chunk_size=corpus_chunk_size,
                                   score_function=score_function, devices=devices)
    # id -1 survives only where fewer than k scores beat -inf (inf/nan inputs): not a result.
    return [[{"corpus_id": i, "score": v} for v, i in zip(vr, ir, strict=True) if i >= 0]
            for vr, ir in zip(vals.tolist(), ids.tolist(), strict=True)]


# ---------------------------------------------------------------------------------------------
# Paraphrase mining
# ---------------------------------------------------------------------------------------------

def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def paraphrase_mining(encoder: Any, sentences: Sequence[str], show_progress_bar: bool = False,
                      batch_size: int = 32, query_chunk_size: int = 5000,
                      corpus_chunk_size: int = 100000, max_pairs: int = 500000, top_k: int = 100,
                      score_function: ScoreFunction = None) -> list[list[float | int]]:
    """The most similar sentence pairs, like `sentence_transformers.util.paraphrase_mining`.

    Args:
      encoder: anything with `.encode(list_of_str, batch_size=...) -> [n, D]` (a
        `SentenceEncoder`, or a sentence-transformers model).
      sentences: the texts.
      show_progress_bar: passed to `encode` when it accepts it.
      batch_size, query_chunk_size, corpus_chunk_size, max_pairs, top_k, score_function: as in
        `paraphrase_mining_embeddings`.

    Returns:
      `[score, i, j]` triplets with i < j, highest score first.
    """
    sentences = list(sentences)
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if _accepts(encoder.encode, "show_progress_bar"):
        kwargs["show_progress_bar"] = show_progress_bar
    emb = encoder.encode(sentences, **kwargs)
    return paraphrase_mining_embeddings(emb, query_chunk_size=query_chunk_size,
                                        corpus_chunk_size=corpus_chunk_size, max_pairs=max_pairs,
                                        top_k=top_k, score_function=score_function)


def paraphrase_mining_embeddings(embeddings: Any, query_chunk_size: int = 5000,
                                 corpus_chunk_size: int = 100000, max_pairs: int = 500000,
                                 top_k: int = 100, score_function: ScoreFunction = None,
                                 devices: Sequence[jax.Device] | None = None
                                 ) -> list[list[float | int]]:
    """Paraphrase mining on precomputed embeddings (sentence-transformers' algorithm).

    Each sentence's top_k + 1 neighbours (itself included, then dropped) come from the sharded
    search, one block of `query_chunk_size` sentences at a time; pairs go through the same
    bounded min-heap as sentence-transformers, so memory stays O(max_pairs + block * top_k).

    Args:
      embeddings: [n, D] float array.
      query_chunk_size: sentences searched per block.
      corpus_chunk_size: corpus rows per kernel call.
      max_pairs: at most this many pairs are returned.
      top_k: neighbours considered per sentence.
      score_function: as in `semantic_search`; assumed symmetric.
      devices: as in `semantic_search`.

    Returns:
      `[score, i, j]` triplets with i < j, highest score first.
    """
    emb = _as_matrix(embeddings, "embeddings")
    if len(emb) == 0 or top_k < 1 or max_pairs < 1:
        return []
    pairs: list[tuple[float, int, int]] = []  # min-heap of (score, i, j), at most max_pairs
    queued: set[tuple[int, int]] = set()
    min_score = float("-inf")
    for b0, vals, ids in _topk_blocks(emb, emb, top_k=top_k + 1, query_chunk_size=query_chunk_size,
                                      corpus_chunk_size=corpus_chunk_size,
                                      score_function=score_function, query_block=query_chunk_size,
                                      devices=devices):
        for r, (vr, ir) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True)):
            i = b0 + r
            for j, score in [(j, s) for j, s in zip(ir, vr, strict=True) if j != i and j >= 0][:top_k]:
                if score <= min_score:
                    continue
                pair = (i, j) if i < j else (j, i)
                if pair in queued:
                    continue
                queued.add(pair)
                if len(pairs) < max_pairs:
                    heapq.heappush(pairs, (score, *pair))
                else:
                    evicted = heapq.heappushpop(pairs, (score, *pair))
                    queued.discard(evicted[1:])
                    min_score = evicted[0]
    return sorted(([s, i, j] for s, i, j in pairs), key=lambda x: x[0], reverse=True)


# ---------------------------------------------------------------------------------------------
# Quantization (numpy; mirrors sentence_transformers.quantization line for line)
# ---------------------------------------------------------------------------------------------

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")


def _quantization_ranges(embeddings: np.ndarray, precision: str,
                         calibration_embeddings: np.ndarray | None) -> np.ndarray:
    if calibration_embeddings is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(f"Cannot compute {precision} quantization ranges from a single "
                             "embedding; pass `ranges` or `calibration_embeddings` from a "
                             "representative set of embeddings")
        if embeddings.shape[0] < 100:
            logger.warning("Computing %s quantization buckets from only %d embeddings; pass "
                           "`ranges` or `calibration_embeddings` for stabler buckets",
                           precision, len(embeddings))
        calibration_embeddings = embeddings
    cal = _to_numpy(calibration_embeddings)
    return np.vstack((np.min(cal, axis=0), np.max(cal, axis=0)))


def quantize_embeddings(embeddings: Any, precision: Precision, ranges: np.ndarray | None = None,
                        calibration_embeddings: np.ndarray | None = None
                        ) -> np.ndarray | list[np.ndarray]:
    """Quantizes float embeddings, with the results of sentence-transformers' function.

    Args:
      embeddings: float [n, D] (numpy, jax or torch), or a list of [tokens, D] matrices
        (multi-vector; quantized with shared ranges).
      precision: "float32"; "int8" / "uint8" (256 buckets per dimension between the ranges);
        "binary" (packed sign bits, offset by -128 into int8) / "ubinary" (packed, uint8).
      ranges: [2, D] per-dimension (min, max) for int8 / uint8.
      calibration_embeddings: embeddings to take the ranges from when `ranges` is None
        (default: `embeddings` themselves, which needs more than one row).

    Returns:
      The quantized array ([n, ceil(D / 8)] for the binary precisions), or a list of them.

    Raises:
      ValueError: an unknown precision, or int8/uint8 ranges from a single embedding.
      TypeError: integer input.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Precision {precision!r} is not supported; expected one of {PRECISIONS}")
    if isinstance(embeddings, list):
        if not embeddings:
            return []
        embeddings = [_to_numpy(e) for e in embeddings]
        if isinstance(embeddings[0], np.ndarray) and embeddings[0].ndim == 2:
            # Calibrate once so every document uses the same buckets.
            if precision.endswith("int8") and ranges is None:
                data = (np.concatenate(embeddings, axis=0) if calibration_embeddings is None
                        else calibration_embeddings)
                if len(data):
                    ranges = _quantization_ranges(data, precision, calibration_embeddings)
            return [quantize_embeddings(m, precision=precision, ranges=ranges,
                                        calibration_embeddings=calibration_embeddings)
                    for m in embeddings]
        embeddings = np.array(embeddings)
    else:
        embeddings = _to_numpy(embeddings)
    if embeddings.dtype in (np.uint8, np.int8):
        raise TypeError("Embeddings to quantize must be float rather than int8 or uint8.")

    if embeddings.ndim == 2 and embeddings.shape[0] == 0:
        dim = embeddings.shape[1]
        if precision.endswith("int8"):
            return np.zeros((0, dim), dtype=np.int8 if precision == "int8" else np.uint8)
        if precision.endswith("binary"):
            return np.zeros((0, (dim + 7) // 8), dtype=np.int8 if precision == "binary" else np.uint8)

    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("int8"):
        if ranges is None:
            ranges = _quantization_ranges(embeddings, precision, calibration_embeddings)
        ranges = _to_numpy(ranges).astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value in bucket 0
        q = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    return np.packbits(embeddings > 0, axis=-1)  # ubinary


# ---------------------------------------------------------------------------------------------
# Embeddings files: one .npy, or shards + manifest from a multi-process encode
# ---------------------------------------------------------------------------------------------

def shard_path(path: str, index: int, count: int) -> str:
    """Where process `index` of `count` writes its rows for output `path`."""
    return f"{path}.shard-{index:05d}-of-{count:05d}.npy"


def manifest_path(path: str) -> str:
    """The manifest that process 0 writes for output `path`."""
    return f"{path}.manifest.json"


def _tmp_name(path: str) -> str:
    # Keeps the .npy suffix so numpy does not append one; pid-unique for concurrent writers.
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}.npy")


def save_embeddings(path: str, embeddings: Any) -> str:
    """Writes a 2-D array as a `.npy` atomically (temp name + rename; mode 0666 & ~umask).

    Returns:
      `path`.
    """
    arr = _to_numpy(embeddings)
    if arr.ndim != 2:
        raise ValueError(f"{path}: embeddings must be 2-D [rows, dim], got shape {arr.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_manifest(path: str, shards: Sequence[tuple[str, int]], dim: int,
                   dtype: str = "float32") -> str:
    """Writes `manifest_path(path)` atomically for shards listed in input order.

    Args:
      path: the output path `P` the shards belong to.
      shards: (shard file path, rows) per process, in input order; stored relative to the
        manifest's folder.
      dim: embedding dimension.
      dtype: numpy dtype name of every shard.

    Returns:
      The manifest's path.

    A file at `path` itself (from an earlier run) is removed first: `load_embeddings` prefers
    `path` over the manifest, so a stale one would shadow the new shards.
    """
    mpath = manifest_path(path)
    folder = os.path.dirname(os.path.abspath(mpath))
    entries, start = [], 0
    for shard, rows in shards:
        if rows < 0:
            raise ValueError(f"{shard}: rows={rows} must be >= 0")
        entries.append({"path": os.path.relpath(os.path.abspath(shard), folder),
                        "start": start, "rows": int(rows)})
        start += int(rows)
    if os.path.isfile(path):
        os.remove(path)
    write_json(mpath, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "rows": start,
                       "dim": int(dim), "dtype": str(np.dtype(dtype)), "shards": entries})
    return mpath


def _open_npy(path: str, mmap: bool) -> np.ndarray:
    """np.load, naming the file on failure."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None


def _checked_shards(mpath: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Reads a manifest and checks every shard; returns it and [(absolute shard path, rows)]."""
    m = read_json(mpath)
    if m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{mpath}: not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest "
                         f"(format={m.get('format')!r}, version={m.get('version')!r})")
    try:
        total, dim, dtype = int(m["rows"]), int(m["dim"]), np.dtype(m["dtype"])
        entries = [(str(e["path"]), int(e["start"]), int(e["rows"])) for e in m["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    folder = os.path.dirname(os.path.abspath(mpath))
    out, expect = [], 0
    for rel, start, rows in entries:
        shard = os.path.join(folder, rel)
        if start != expect:
            raise ValueError(f"{mpath}: shard {rel} starts at row {start}, expected {expect} "
                             "(shards must be contiguous, in input order)")
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{shard}: shard listed in {mpath} is missing; re-run the "
                                    "encode (every process must finish)")
        a = _open_npy(shard, mmap=True)
        if a.ndim != 2 or a.shape[0] != rows or a.shape[1] != dim or a.dtype != dtype:
            raise ValueError(f"{shard}: holds {a.dtype} {a.shape}, but {mpath} says "
                             f"{dtype} ({rows}, {dim}); the shard is stale or truncated")
        out.append((shard, rows))
        expect += rows
    if expect != total:
        raise ValueError(f"{mpath}: shards hold {expect} rows, manifest says {total}")
    return m, out


def _resolve(path: str) -> tuple[str | None, str | None]:
    """(plain .npy path, manifest path): exactly one is set; `path` wins over its manifest."""
    if path.endswith(".manifest.json"):
        return None, path
    if os.path.exists(path):
        return path, None
    if os.path.exists(manifest_path(path)):
        return None, manifest_path(path)
    raise FileNotFoundError(f"embeddings not found: neither {path} nor {manifest_path(path)} "
                            "exists")


def load_embeddings(path: str, mmap: bool = True) -> np.ndarray:
    """Reads embeddings written by `encode --output`: a `.npy`, or shards + manifest.

    Args:
      path: the output path `P` (the plain file if present, else `P.manifest.json`), or the
        manifest's path itself.
      mmap: memory-map instead of reading into memory (a plain file or a single shard; several
        shards are concatenated into memory).

    Returns:
      [rows, dim] in input order.

    Raises:
      FileNotFoundError: nothing at `path`, or a listed shard is missing (names it).
      ValueError: a corrupt file, or a shard that disagrees with the manifest (names it).
    """
    plain, mpath = _resolve(path)
    if plain is not None:
        return _open_npy(plain, mmap)
    m, shards = _checked_shards(mpath)
    if len(shards) == 1:
        return _open_npy(shards[0][0], mmap)
    if not shards:
        return np.zeros((0, int(m["dim"])), np.dtype(m["dtype"]))
    return np.concatenate([_open_npy(s, mmap=True) for s, _ in shards])


def merge_shards(path: str, keep_shards: bool = False, block_rows: int = 65536) -> str:
    """Merges the shards of `path` (after every process finished) into one `.npy` at `path`.

    Streams the shards in order through `numpy.lib.format.open_memmap` into a temp file that is
    renamed to `path` once complete, so memory stays O(block_rows * dim). Only then are the
    shard files and, last, the manifest deleted (unless `keep_shards`): a crash at any point
    leaves either the shards + manifest or the merged `path` readable by `load_embeddings`.

    Returns:
      `path`.
    """
    mpath = manifest_path(path)
    m, shards = _checked_shards(mpath)
    tmp = _tmp_name(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(m["dtype"]),
                                        shape=(int(m["rows"]), int(m["dim"])))
        row = 0
        for shard, rows in shards:
            src = _open_npy(shard, mmap=True)
            for s in range(0, rows, block_rows):
                part = np.asarray(src[s:s + block_rows])
                out[row:row + len(part)] = part
                row += len(part)
            del src
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if not keep_shards:
        for shard, _ in shards:
            os.remove(shard)
        os.remove(mpath)
    return path


# ---------------------------------------------------------------------------------------------
# Search over a text corpus (for `sbert-flax search`)
# ---------------------------------------------------------------------------------------------

def search_corpus(encoder: Any, corpus: Sequence[str], queries: Sequence[str], top_k: int = 10,
                  corpus_embeddings_path: str | None = None, batch_size: int = 64,
                  score_function: ScoreFunction = None) -> list[list[dict[str, int | float]]]:
    """Encodes (or loads) the corpus, encodes the queries and runs `semantic_search`.

    Args:
      encoder: anything with `.encode(list_of_str, batch_size=...) -> [n, D]`.
      corpus: the corpus texts; result ids index this list.
      queries: the query texts.
      top_k: results per query.
      corpus_embeddings_path: a cache: when it (or its manifest) exists with one row per corpus
        line and the encoder's dim it is used, else the corpus is encoded and saved there
        atomically (a stale cache is overwritten, with a warning).
      batch_size: encode batch size.
      score_function: as in `semantic_search`.

    Returns:
      Per query, `[{"corpus_id": int, "score": float}, ...]` best first.
    """
    corpus, queries = list(corpus), list(queries)
    q = _as_matrix(encoder.encode(queries, batch_size=batch_size), "query embeddings")
    c = None
    if corpus_embeddings_path is not None:
        try:
            c = load_embeddings(corpus_embeddings_path)
        except FileNotFoundError:
            c = None
        if c is not None and c.shape != (len(corpus), q.shape[1]):
            logger.warning("%s holds embeddings of shape %s, not (%d, %d) for this corpus and "
                           "model; re-encoding the corpus", corpus_embeddings_path, c.shape,
                           len(corpus), q.shape[1])
            c = None
    if c is None:
        c = _as_matrix(encoder.encode(corpus, batch_size=batch_size), "corpus embeddings")
        if corpus_embeddings_path is not None:
            save_embeddings(corpus_embeddings_path, c)
    return semantic_search(q, c, top_k=top_k, score_function=score_function)
