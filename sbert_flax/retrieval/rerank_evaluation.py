"""Two-stage retrieval on BEIR folders: retrieve with a bi-encoder, rerank with a cross-encoder.

    queries, corpus --(bi-encoder, exact cosine top-k: `ir_evaluation.rank_corpus`)--> candidates
                    --(cross-encoder scores of (query, candidate) pairs)--> reranked candidates
                    --> MRR@10, nDCG@10, MAP (`ir_evaluation.retrieval_metrics`)

The metrics are those of sentence-transformers' `CrossEncoderRerankingEvaluator` given, per
query, `documents` = the bi-encoder's `rerank_top_k` candidates in retrieval order, `positive` =
every relevant document of the query (retrieved or not) and `always_rerank_positives=False` (a
relevant document the first stage missed is not slipped in): binary relevance, MRR and nDCG at
10 over the reranked list, the ideal DCG and MAP's denominator counting all relevant documents,
MAP over the whole reranked list. The `base_` metrics are the same on the retrieval order (the
evaluator's `base_*`). Equal scores keep retrieval order (sentence-transformers averages over
ties in nDCG and MAP; a real model's scores of distinct texts practically never tie).

Memory holds the folder's ids and queries and the [queries, rerank_top_k] candidates with their
texts; the corpus is streamed once more to collect those texts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from sbert_flax.retrieval.ir_evaluation import BeirFolder, load_beir, rank_corpus, retrieval_metrics

logger = logging.getLogger(__name__)

# sentence-transformers' CrossEncoderRerankingEvaluator default cut-off (its `at_k`).
AT_K = 10
# The metrics a reranking reports per folder, in table order.
RERANK_METRICS = (f"mrr@{AT_K}", f"ndcg@{AT_K}", "map")


class PairScorer(Protocol):
    """What reranks: a cross-encoder's `predict` (ours or sentence-transformers')."""

    def predict(self, sentences: Any, batch_size: int = ..., **kwargs: Any) -> Any: ...


def candidate_texts(f: BeirFolder, candidates: Sequence[Sequence[str]]) -> dict[str, str]:
    """{corpus id: `title text`} of every id in `candidates`, from one pass over the corpus."""
    wanted = {cid for row in candidates for cid in row}
    out: dict[str, str] = {}
    for cid, text in zip(f.corpus_ids, f.corpus_texts(), strict=True):
        if cid in wanted:
            out[cid] = text
    return out


def rerank(scorer: PairScorer, queries: Sequence[str], candidates: Sequence[Sequence[str]],
           texts: dict[str, str], batch_size: int = 32) -> list[list[str]]:
    """Each query's candidates ordered by the scorer's score of (query, candidate text), highest
    first; equal scores keep the candidates' order.

    All pairs go to one `predict` call (it batches them), as the reference evaluator does.
    """
    pairs = [(q, texts[cid]) for q, row in zip(queries, candidates, strict=True) for cid in row]
    scores = np.asarray(scorer.predict(pairs, batch_size=batch_size), np.float64).reshape(-1)
    if scores.shape[0] != len(pairs):
        raise ValueError(f"the reranker returned {scores.shape[0]} scores for {len(pairs)} pairs; "
                         "a cross-encoder with one output (num_labels=1) is needed")
    out, start = [], 0
    for row in candidates:
        s = scores[start:start + len(row)]
        start += len(row)
        order = np.argsort(-s, kind="stable")  # stable: ties stay in retrieval order
        out.append([row[j] for j in order])
    return out


def rerank_metrics(ranked: Sequence[Sequence[str]], f: BeirFolder, at_k: int = AT_K
                   ) -> dict[str, float]:
    """MRR@at_k, nDCG@at_k and MAP of ranked candidate lists (one per query of `f`), as the
    reference evaluator defines them (see the module docstring).

    MAP is `retrieval_metrics`' map@K with K at least the list length and every query's number
    of relevant documents: the average precision over the whole list, divided by all of the
    query's relevant documents (the evaluator's `average_precision_score * retrieved / total`).
    """
    longest = max((len(r) for r in ranked), default=0)
    most_relevant = max(len(f.relevant[q]) for q in f.query_ids)
    k_map = max(longest, most_relevant, 1)
    m = retrieval_metrics(ranked, f.query_ids, f.relevant, accuracy_at_k=(),
                          precision_recall_at_k=(), mrr_at_k=(at_k,), ndcg_at_k=(at_k,),
                          map_at_k=(k_map,))
    return {f"mrr@{at_k}": m[f"mrr@{at_k}"], f"ndcg@{at_k}": m[f"ndcg@{at_k}"],
            "map": m[f"map@{k_map}"]}


def evaluate_reranking(encoder: Any, scorer: PairScorer, folder: str | BeirFolder,
                       split: str = "test", rerank_top_k: int = 100, at_k: int = AT_K,
                       batch_size: int | None = None, rerank_batch_size: int = 32,
                       **prompts: str | None) -> dict[str, Any]:
    """Retrieval by `encoder` then reranking by `scorer` on a BEIR folder.

    Args:
      encoder: the bi-encoder (a `SentenceEncoder`).
      scorer: the cross-encoder (`inference.cross_encoder.CrossEncoder`, or
        sentence-transformers' `CrossEncoder`): `predict([(query, document), ...])`.
      folder: a BEIR folder path, or what `load_beir` returned.
      split: the qrels split (ignored for a loaded folder).
      rerank_top_k: candidates retrieved per query, all of them reranked.
      at_k: the cut-off of MRR and nDCG.
      batch_size: the bi-encoder's `encode` batch.
      rerank_batch_size: pairs per `predict` batch.
      **prompts: `query_prompt`, `query_prompt_name`, `corpus_prompt`, `corpus_prompt_name` of
        the retrieval stage (`ir_evaluation.rank_corpus`).

    Returns:
      {"mrr@10", "ndcg@10", "map"} after reranking, the same with a `base_` prefix in retrieval
      order, and "queries", "corpus", "rerank_top_k".
    """
    if rerank_top_k < 1:
        raise ValueError(f"rerank_top_k={rerank_top_k} must be >= 1")
    f = folder if isinstance(folder, BeirFolder) else load_beir(folder, split)
    candidates = rank_corpus(encoder, f, rerank_top_k, batch_size=batch_size, **prompts)
    texts = candidate_texts(f, candidates)
    reranked = rerank(scorer, f.query_texts, candidates, texts, rerank_batch_size)
    base = rerank_metrics(candidates, f, at_k)
    out: dict[str, Any] = dict(rerank_metrics(reranked, f, at_k))
    out |= {f"base_{k}": v for k, v in base.items()}
    logger.info("%s: rerank top %d: ndcg@%d %.4f -> %.4f, mrr@%d %.4f -> %.4f, map %.4f -> %.4f",
                f.name, rerank_top_k, at_k, base[f"ndcg@{at_k}"], out[f"ndcg@{at_k}"], at_k,
                base[f"mrr@{at_k}"], out[f"mrr@{at_k}"], base["map"], out["map"])
    return out | {"queries": len(f.query_ids), "corpus": len(f.corpus_ids),
                  "rerank_top_k": rerank_top_k}


def format_rerank_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per folder: each metric x100 before (retrieval order) and after reranking."""
    width = max([len("rerank"), *(len(r["name"]) for r in rows)])
    head = f"{'rerank':<{width}}  {'queries':>7}  {'top_k':>5}"
    head += "".join(f"  {'base ' + m:>14}  {m:>10}" for m in RERANK_METRICS)
    lines = [head, "  ".join(["-" * width, "-" * 7, "-" * 5,
                              *["-" * 14 + "  " + "-" * 10] * len(RERANK_METRICS)])]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['queries']:>7d}  {r['rerank_top_k']:>5d}"
        line += "".join(f"  {100 * r['base_' + m]:>14.2f}  {100 * r[m]:>10.2f}"
                        for m in RERANK_METRICS)
        lines.append(line)
    return "\n".join(lines)
