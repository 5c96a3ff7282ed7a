"""Retrieval evaluation on BEIR folders, as sentence-transformers' `InformationRetrievalEvaluator`.

A BEIR folder holds `corpus.jsonl` (`{"_id", "title", "text"}` per line), `queries.jsonl`
(`{"_id", "text"}`) and `qrels/<split>.tsv` (header `query-id corpus-id score`). The metrics are
sentence-transformers' definitions with cosine scores (binary relevance: a qrel counts when its
score is > 0; queries without a relevant document are left out). The corpus is streamed: it is
read twice (once to validate ids, once to embed), embedded with `encode_chunks` and ranked chunk
by chunk with `util.semantic_search`, keeping a running top-k per query, so memory holds the ids,
the queries and [queries, k] results, never the corpus texts or its embeddings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sbert_flax.common.files import decode_line
from sbert_flax.models.prompts import side_prompt_kwargs

# sentence-transformers' defaults, with 100 added to precision/recall for recall@100.
ACCURACY_AT_K = (1, 3, 5, 10)
PRECISION_RECALL_AT_K = (1, 3, 5, 10, 100)
MRR_AT_K = (10,)
NDCG_AT_K = (10,)
MAP_AT_K = (100,)
# The metrics `sbert-flax eval --json` reports per folder.
SUMMARY_METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100")
# The qrels split `train --ir-dev` folders are scored on, and the one a folder without it falls
# back to: C-MTEB's retrieval folders ship dev qrels, BEIR's mostly test only; dev comes first
# because picking the best model on test qrels would tune on the test set.
DEV_SPLIT, DEV_FALLBACK = "dev", "test"
# Queries whose equal scores straddle the top-k cut, ranked against a whole corpus chunk at a time.
TIE_GROUP = 32

logger = logging.getLogger(__name__)


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; errors say `path:line: what is wrong`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BEIR file not found: {path}")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            # Binary lines + per-line decoding, so a bad byte is reported with its line.
            line = decode_line(raw, path, line_no)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column "
                                 f"{e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(obj).__name__}")
            yield line_no, obj


def _field(obj: dict[str, Any], key: str, path: str, line_no: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"{path}:{line_no}: missing the {key!r} field")
        return ""
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # some BEIR exports write numeric ids; qrels hold them as text
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line_no}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _doc_text(obj: dict[str, Any], path: str, line_no: int) -> str:
    # As sentence-transformers' example and MTEB: title and text joined by a space, stripped.
    title = _field(obj, "title", path, line_no, required=False)
    return (title + " " + _field(obj, "text", path, line_no)).strip()


@dataclass(frozen=True)
class BeirFolder:
    """A validated BEIR folder: queries in memory, the corpus ids (texts are streamed)."""

    path: str
    split: str
    corpus_path: str
    query_ids: list[str]       # queries with >= 1 relevant document, in queries.jsonl order
    query_texts: list[str]
    relevant: dict[str, set[str]]  # query id -> ids of documents with qrel score > 0
    corpus_ids: list[str]      # corpus.jsonl order

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def corpus_texts(self) -> Iterator[str]:
        """The documents' `title text`, in corpus.jsonl order (a second, lazy read)."""
        for line_no, obj in _jsonl(self.corpus_path):
            yield _doc_text(obj, self.corpus_path, line_no)


def load_beir(path: str, split: str = "test", flag: str = "--split") -> BeirFolder:
    """Reads and validates a BEIR folder; `flag` is the option a missing split's message names.

    Raises:
      FileNotFoundError: the folder, a file or the qrels split is missing (the message lists the
        splits that exist).
      ValueError: `file:line: ...` for a malformed line, a duplicate id, or a qrel naming an
        unknown query or document.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BEIR folder not found: {path}")
    corpus_path = os.path.join(path, "corpus.jsonl")
    queries_path = os.path.join(path, "queries.jsonl")
    qrels_path = os.path.join(path, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        qdir = os.path.join(path, "qrels")
        splits = sorted(f[:-4] for f in os.listdir(qdir) if f.endswith(".tsv")) \
            if os.path.isdir(qdir) else []
        raise FileNotFoundError(f"{qrels_path} not found: no qrels for split {split!r} "
                                f"(splits here: {', '.join(splits) or 'none'}); pass {flag}")

    corpus_ids: list[str] = []
    corpus_line: dict[str, int] = {}
    for line_no, obj in _jsonl(corpus_path):
        cid = _field(obj, "_id", corpus_path, line_no)
        _doc_text(obj, corpus_path, line_no)  # validate now, so the second read cannot fail
        if cid in corpus_line:
            raise ValueError(f"{corpus_path}:{line_no}: duplicate _id {cid!r} (first on line "
                             f"{corpus_line[cid]})")
        corpus_line[cid] = line_no
        corpus_ids.append(cid)

    queries: dict[str, str] = {}
    query_line: dict[str, int] = {}
    for line_no, obj in _jsonl(queries_path):
        qid = _field(obj, "_id", queries_path, line_no)
        if qid in query_line:
            raise ValueError(f"{queries_path}:{line_no}: duplicate _id {qid!r} (first on line "
                             f"{query_line[qid]})")
        query_line[qid] = line_no
        queries[qid] = _field(obj, "text", queries_path, line_no)

    relevant: dict[str, set[str]] = {}
    with open(qrels_path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise ValueError(f"{qrels_path}:{line_no}: expected 3 tab-separated fields "
                                 f"(query-id, corpus-id, score), got {len(fields)}")
            qid, cid, score_text = (x.strip() for x in fields)
            try:
                score = float(score_text)
            except ValueError:
                if line_no == 1 and qid == "query-id":
                    continue  # the header
                raise ValueError(f"{qrels_path}:{line_no}: score {score_text!r} is not a "
                                 "number") from None
            if qid not in queries:
                raise ValueError(f"{qrels_path}:{line_no}: query-id {qid!r} is not in "
                                 f"{queries_path}")
            if cid not in corpus_line:
                raise ValueError(f"{qrels_path}:{line_no}: corpus-id {cid!r} is not in "
                                 f"{corpus_path}")
            # Binary relevance as BEIR/pytrec_eval: score 0 marks a judged, non-relevant document.
            if score > 0:
                relevant.setdefault(qid, set()).add(cid)

    # sentence-transformers evaluates only queries with relevant documents, in query order.
    query_ids = [q for q in queries if relevant.get(q)]
    if not query_ids:
        raise ValueError(f"{qrels_path}: no query has a relevant document (score > 0)")
    return BeirFolder(path=path, split=split, corpus_path=corpus_path, query_ids=query_ids,
                      query_texts=[queries[q] for q in query_ids], relevant=relevant,
                      corpus_ids=corpus_ids)


def load_dev_beir(path: str, split: str = DEV_SPLIT) -> BeirFolder:
    """A BEIR folder to evaluate during training (`--ir-dev`, `--ir_dev_split`).

    `split` "dev" (the default) falls back to "test" for a folder without qrels/dev.tsv, with a
    warning; any other split must exist.
    """
    if split == DEV_SPLIT and not os.path.isfile(os.path.join(path, "qrels", f"{split}.tsv")) \
            and os.path.isfile(os.path.join(path, "qrels", f"{DEV_FALLBACK}.tsv")):
        logger.warning("%s has no qrels/%s.tsv: its --ir-dev metrics are on qrels/%s.tsv (the "
                       "test split: pass --ir_dev_split to choose another)", path, DEV_SPLIT,
                       DEV_FALLBACK)
        split = DEV_FALLBACK
    return load_beir(path, split, flag="--ir_dev_split")


def _dcg(relevances: Sequence[int], k: int) -> float:
    return sum(relevances[i] / np.log2(i + 2) for i in range(min(len(relevances), k)))


def retrieval_metrics(ranked: Sequence[Sequence[str]], query_ids: Sequence[str],
                      relevant: dict[str, set[str]], accuracy_at_k: Sequence[int] = ACCURACY_AT_K,
                      precision_recall_at_k: Sequence[int] = PRECISION_RECALL_AT_K,
                      mrr_at_k: Sequence[int] = MRR_AT_K, ndcg_at_k: Sequence[int] = NDCG_AT_K,
                      map_at_k: Sequence[int] = MAP_AT_K) -> dict[str, float]:
    """sentence-transformers' `compute_metrics`, on ranked document ids per query.

    The arithmetic follows it step for step (same sums, same order, `np.mean`), so equal rankings
    give equal numbers to the last bit or so.

    Returns:
      {"accuracy@k", "precision@k", "recall@k", "mrr@k", "ndcg@k", "map@k"} with k filled in.
    """
    n = len(query_ids)
    hits = {k: 0 for k in accuracy_at_k}
    precision: dict[int, list[float]] = {k: [] for k in precision_recall_at_k}
    recall: dict[int, list[float]] = {k: [] for k in precision_recall_at_k}
    mrr = {k: 0.0 for k in mrr_at_k}
    ndcg: dict[int, list[float]] = {k: [] for k in ndcg_at_k}
    avep: dict[int, list[float]] = {k: [] for k in map_at_k}
    for qid, top in zip(query_ids, ranked, strict=True):
        rel = relevant[qid]
        is_rel = [1 if cid in rel else 0 for cid in top]
        for k in accuracy_at_k:
            hits[k] += any(is_rel[:k])
        for k in precision_recall_at_k:
            correct = sum(is_rel[:k])
            precision[k].append(correct / k)
            recall[k].append(correct / len(rel))
        for k in mrr_at_k:
            first = next((r for r, x in enumerate(is_rel[:k]) if x), None)
            if first is not None:
                mrr[k] += 1.0 / (first + 1)
        for k in ndcg_at_k:
            ndcg[k].append(_dcg(is_rel[:k], k) / _dcg([1] * len(rel), k))
        for k in map_at_k:
            correct, total = 0, 0.0
            for r, x in enumerate(is_rel[:k]):
                if x:
                    correct += 1
                    total += correct / (r + 1)
            avep[k].append(total / min(k, len(rel)))
    out: dict[str, float] = {}
    out |= {f"accuracy@{k}": hits[k] / n for k in accuracy_at_k}
    out |= {f"precision@{k}": float(np.mean(precision[k])) for k in precision_recall_at_k}
    out |= {f"recall@{k}": float(np.mean(recall[k])) for k in precision_recall_at_k}
    out |= {f"mrr@{k}": mrr[k] / n for k in mrr_at_k}
    out |= {f"ndcg@{k}": float(np.mean(ndcg[k])) for k in ndcg_at_k}
    out |= {f"map@{k}": float(np.mean(avep[k])) for k in map_at_k}
    return out


def _id_ranks(ids: Sequence[str]) -> np.ndarray:
    """Position of each id in ascending string order: sentence-transformers' tie-break key."""
    ranks = np.empty(len(ids), np.int64)
    ranks[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return ranks


def k_value_lists(k_values: dict[str, Any]) -> dict[str, Any]:
    """The cut-offs of each metric family: the defaults, overridden by `k_values` (the
    `*_at_k` keyword arguments of sentence-transformers' `InformationRetrievalEvaluator`).

    Raises:
      TypeError: a keyword that is not one of them.
    """
    ks = {"accuracy_at_k": ACCURACY_AT_K, "precision_recall_at_k": PRECISION_RECALL_AT_K,
          "mrr_at_k": MRR_AT_K, "ndcg_at_k": NDCG_AT_K, "map_at_k": MAP_AT_K}
    unknown = set(k_values) - set(ks)
    if unknown:
        raise TypeError(f"unknown k-value arguments: {sorted(unknown)}")
    return ks | k_values


def evaluate_retrieval(encoder: Any, folder: str | BeirFolder, split: str = "test",
                       batch_size: int | None = None, corpus_chunk_size: int = 100_000,
                       query_prompt: str | None = None, query_prompt_name: str | None = None,
                       corpus_prompt: str | None = None, corpus_prompt_name: str | None = None,
                       **k_values: Sequence[int]) -> dict[str, float]:
    """Retrieval metrics of `encoder` on a BEIR folder (cosine scores, exact search).

    Args:
      encoder: a `SentenceEncoder` (anything with `encode` and `encode_chunks`).
      folder: a BEIR folder path, or what `load_beir` returned.
      split: the qrels split, `qrels/<split>.tsv` (ignored for a loaded folder).
      batch_size: passed to `encode` / `encode_chunks`.
      corpus_chunk_size: documents embedded and ranked at a time (bounds host memory).
      query_prompt, query_prompt_name, corpus_prompt, corpus_prompt_name: the prompt of each
        side; without them each side takes the model's own "query" / "document" prompt, as
        sentence-transformers' `encode_query` / `encode_document` (`prompts.side_prompt_kwargs`).
      **k_values: `accuracy_at_k`, `precision_recall_at_k`, `mrr_at_k`, `ndcg_at_k`, `map_at_k`
        (as sentence-transformers; see `retrieval_metrics`).

    Returns:
      The metrics of `retrieval_metrics`, plus "queries" and "corpus" (counts).

    Note:
      Ranking is by score, equal scores by ascending document id (as sentence-transformers),
      also where they straddle the top-k cut.
    """
    f = folder if isinstance(folder, BeirFolder) else load_beir(folder, split)
    ks = k_value_lists(k_values)
    max_k = max(max(v) for v in ks.values())
    ranked = rank_corpus(encoder, f, max_k, batch_size=batch_size,
                         corpus_chunk_size=corpus_chunk_size, query_prompt=query_prompt,
                         query_prompt_name=query_prompt_name, corpus_prompt=corpus_prompt,
                         corpus_prompt_name=corpus_prompt_name)
    out = retrieval_metrics(ranked, f.query_ids, f.relevant, **ks)
    return out | {"queries": len(f.query_ids), "corpus": len(f.corpus_ids)}


def rank_corpus(encoder: Any, f: BeirFolder, top_k: int, batch_size: int | None = None,
                corpus_chunk_size: int = 100_000, query_prompt: str | None = None,
                query_prompt_name: str | None = None, corpus_prompt: str | None = None,
                corpus_prompt_name: str | None = None) -> list[list[str]]:
    """The `top_k` corpus ids of each query of `f` (its `query_ids` order), best first: what
    `evaluate_retrieval` scores, and the candidates a reranker reorders (`rerank_evaluation`).

    Ranking is by cosine score, equal scores by ascending document id (as sentence-transformers),
    also where they straddle the cut. The arguments are `evaluate_retrieval`'s.
    """
    from sbert_flax.retrieval.search import (  # JAX: imported when a search runs
        merge_top_k,
        top_k_arrays,
    )

    # sentence-transformers' InformationRetrievalEvaluator encodes with encode_query /
    # encode_document: each side's own prompt, never default_prompt_name, unless one is given.
    q_emb = np.asarray(encoder.encode(f.query_texts, batch_size=batch_size,
                                      **side_prompt_kwargs(encoder, "query", query_prompt,
                                                           query_prompt_name)))  # [Q, D]
    nq = len(f.query_ids)
    id_rank = _id_ranks(f.corpus_ids)
    # Running top-k per query: scores and corpus rows, -inf / -1 for empty slots.
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_r = np.full((nq, 0), -1, np.int64)
    for rows, chunk in encoder.encode_chunks(f.corpus_texts(), chunk_size=corpus_chunk_size,
                                             batch_size=batch_size,
                                             **side_prompt_kwargs(encoder, "document",
                                                                  corpus_prompt,
                                                                  corpus_prompt_name)):
        # One more than needed, to see whether equal scores straddle the cut: the search cuts
        # them in row order, sentence-transformers by id. Those (rare) queries are settled
        # against the whole chunk by id (`_cut_ties_by_id`).
        s, i = top_k_arrays(q_emb, chunk, top_k=min(top_k + 1, len(rows)),
                            corpus_chunk_size=len(rows))
        if s.shape[1] > top_k:
            tied = np.flatnonzero(np.isfinite(s[:, top_k]) & (s[:, top_k] == s[:, top_k - 1]))
            if tied.size:
                _cut_ties_by_id(q_emb, chunk, s, i, tied, top_k, id_rank[rows])
        r = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
        # Score descending, then document id ascending (empty slots last).
        best_s, best_r = merge_top_k(best_s, best_r, s, r, top_k, tie_rank=id_rank)
    return [[f.corpus_ids[j] for j in row if j >= 0] for row in best_r.tolist()]


def _cut_ties_by_id(q_emb: np.ndarray, chunk: np.ndarray, s: np.ndarray, i: np.ndarray,
                    tied: np.ndarray, max_k: int, chunk_rank: np.ndarray) -> None:
    """Rewrites the rows `tied` of (s, i) in place: their top max_k against the whole chunk,
    equal scores by document id (`chunk_rank`: id rank of each chunk row), the extra slot empty.

    Only the candidates scoring at least the tied value can make the cut; they are found by a
    full ranking of TIE_GROUP queries at a time, as arrays, so a corpus full of duplicates (each
    tie ranks a whole chunk) stays within a few chunk-sized arrays.
    """
    from sbert_flax.retrieval.search import top_k_arrays

    n = len(chunk)
    for g in range(0, len(tied), TIE_GROUP):
        sel = tied[g:g + TIE_GROUP]
        fs, fi = top_k_arrays(q_emb[sel], chunk, top_k=n, corpus_chunk_size=n)
        cut = s[sel, max_k]
        for j, q in enumerate(sel):
            m = int(np.sum(fs[j] >= cut[j]))  # sorted descending: a prefix
            cs, ci = fs[j, :m], fi[j, :m]
            order = np.lexsort((chunk_rank[ci], -cs))[:max_k]
            s[q], i[q] = -np.inf, -1
            s[q, :len(order)], i[q, :len(order)] = cs[order], ci[order]


def retrieval_table(encoder: Any, folders: Sequence[str | BeirFolder], split: str = "test",
                    batch_size: int | None = None, **prompts: str | None) -> list[dict[str, Any]]:
    """One row per folder: {"folder", "name", "queries", "corpus", <every metric>}.

    `prompts`: `query_prompt`, `query_prompt_name`, `corpus_prompt`, `corpus_prompt_name`, as
    `evaluate_retrieval` takes them.
    """
    rows = []
    for folder in folders:
        f = folder if isinstance(folder, BeirFolder) else load_beir(folder, split)
        rows.append({"folder": f.path, "name": f.name,
                     **evaluate_retrieval(encoder, f, batch_size=batch_size, **prompts)})
    return rows


def format_retrieval_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary metrics x100 per folder, aligned for a terminal."""
    width = max([len("retrieval"), *(len(r["name"]) for r in rows)])
    head = f"{'retrieval':<{width}}  {'queries':>7}  {'corpus':>8}"
    head += "".join(f"  {m:>10}" for m in SUMMARY_METRICS)
    lines = [head, "  ".join(["-" * width, "-" * 7, "-" * 8, *["-" * 10] * len(SUMMARY_METRICS)])]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['queries']:>7d}  {r['corpus']:>8d}"
        lines.append(line + "".join(f"  {100 * r[m]:>10.2f}" for m in SUMMARY_METRICS))
    return "\n".join(lines)
