"""Exact top-k semantic search and paraphrase mining, compatible with `sentence_transformers.util`.

Cosine (or dot) scores are computed in jitted chunks whose corpus rows are sharded over the local
devices; a running top-k per query chunk stays on the device, so the full query x corpus matrix
never exists. Chunks are padded to a bounded set of shapes, so any corpus size compiles few."""

from __future__ import annotations

import collections
import functools
import heapq
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.common.arraylike import as_matrix
from sbert_flax.common.xla import compiler_options

logger = logging.getLogger(__name__)

_AXIS = "corpus"
# Traces of the jitted search kernels, by name: tests assert the compile count stays bounded.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

ScoreFunction = Literal["cos_sim", "dot_score"] | Callable[[jax.Array, jax.Array], jax.Array] | None



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
            # HIGHEST: TPU's default matmul is one bf16 pass (~3 significant digits), which makes
            # ties of distinct scores and feeds mining's margin filters rounded candidates.
            s = (jnp.matmul(q, c.T, precision=jax.lax.Precision.HIGHEST)
                 if isinstance(score, str) else score(q, c))  # [Qc, Cl]
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

    return (jax.jit(prepare, in_shardings=rows, out_shardings=rows),
            jax.jit(chunk_topk, compiler_options=compiler_options(mesh.devices.flat)),
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
    # XLA:CPU runs all devices of a process on one thread pool, and a chunk's all-gather holds a
    # thread per device until every device has arrived. With several independent chunk programs
    # in flight, the pool's threads can be taken by participants of different programs so that
    # one device never runs: the rendezvous aborts the process after 40 s ("only 7 of 8 arrived";
    # seen with 8 CPU devices, 4 times in 13 runs of test_util's parity case, 0 in 11 with this).
    # So on several CPU devices each chunk finishes before the next is dispatched; accelerators
    # keep the overlap (each device runs its programs in order on its own stream).
    serial = len(devices) > 1 and all(d.platform == "cpu" for d in devices)
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
                if serial:
                    jax.block_until_ready((v, i))
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
    vals, ids = top_k_arrays(query_embeddings, corpus_embeddings, top_k=top_k,
                             query_chunk_size=query_chunk_size,
                             corpus_chunk_size=corpus_chunk_size, score_function=score_function,
                             devices=devices)
    # id -1 survives only where fewer than k scores beat -inf (inf/nan inputs): not a result.
    return [[{"corpus_id": i, "score": v} for v, i in zip(vr, ir, strict=True) if i >= 0]
            for vr, ir in zip(vals.tolist(), ids.tolist(), strict=True)]


def top_k_arrays(query_embeddings: Any, corpus_embeddings: Any, top_k: int = 10, *,
                 query_chunk_size: int = 100, corpus_chunk_size: int = 500000,
                 score_function: ScoreFunction = None,
                 devices: Sequence[jax.Device] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`semantic_search` as arrays: (scores float32 [n_q, k], corpus ids int64 [n_q, k]).

    k = min(top_k, n_c); rows sorted by score descending, ties by lower id; id -1 (score -inf)
    marks an empty slot. For callers that merge the top-k of several corpus pieces themselves
    (mining over a corpus streamed from disk) without a dict per hit.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    queries = as_matrix(query_embeddings, "query_embeddings")
    corpus = as_matrix(corpus_embeddings, "corpus_embeddings")
    if len(corpus) == 0 or len(queries) == 0:
        k = min(top_k, len(corpus))
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    (_, vals, ids), = _topk_blocks(queries, corpus, top_k=top_k, query_chunk_size=query_chunk_size,
                                   corpus_chunk_size=corpus_chunk_size,
                                   score_function=score_function, devices=devices)
    return vals, ids.astype(np.int64)


def merge_top_k(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int,
                tie_rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The running top-k over corpus pieces, on the host: the best so far and a piece's top
    (`top_k_arrays`, ids already offset to the whole corpus) -> the best k [b, <=k].

    Score descending; equal scores keep the best so far first (earlier pieces: lower ids, as one
    search over the whole corpus orders them), or go by `tie_rank[id]` when given (retrieval
    evaluation: sentence-transformers breaks ties by document id string). Empty slots (id -1,
    score -inf) sort last.
    """
    s = np.concatenate([best_s, s], axis=1)
    i = np.concatenate([best_i, i], axis=1)
    if tie_rank is None:
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        tie = np.where(i >= 0, tie_rank[np.maximum(i, 0)], len(tie_rank))
        order = np.lexsort((tie, -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


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
    emb = as_matrix(embeddings, "embeddings")
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

