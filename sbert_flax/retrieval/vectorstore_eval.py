"""Retrieval evaluation of BEIR folders through a vector database (`eval --retrieval DIR --uri`).

The corpus is uploaded to a collection (resumably: a corpus already there is checked, not
re-encoded; see `vectorstore.upload`), the queries are answered by the database, and the rankings
are scored by `ir_evaluation.retrieval_metrics`, so the numbers mean what the in-memory
`evaluate_retrieval` reports, and with the default FLAT index they are the same numbers. Row i of
the collection is document i of corpus.jsonl; equal scores rank by document id, as
sentence-transformers (among the top max_k + 1 the database returns; see TIE_EPS).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sbert_flax.models.prompts import side_prompt_kwargs
from sbert_flax.retrieval import vectorstore
from sbert_flax.retrieval.ir_evaluation import (
    BeirFolder,
    _id_ranks,
    k_value_lists,
    load_beir,
    retrieval_metrics,
)

# Scores this close are one score. Milvus computes cosine in float32 as 1 - (1 - similarity),
# by row blocks: identical vectors at different rows score a few 1e-8 apart, which would order
# duplicate documents by the database's arithmetic rather than by id, as the in-memory
# evaluation (and sentence-transformers) does.
TIE_EPS = 1e-6


def _ties_by_id(hits: Sequence[dict[str, Any]], rank: np.ndarray) -> list[int]:
    """Corpus rows of `hits` by score descending, scores within TIE_EPS of the first of a run
    ordered by `rank` (ascending document id)."""
    hits = sorted(hits, key=lambda h: -h["score"])
    rows: list[int] = []
    s = 0
    while s < len(hits):
        e = s + 1
        while e < len(hits) and hits[s]["score"] - hits[e]["score"] <= TIE_EPS:
            e += 1
        rows += sorted((h["corpus_id"] for h in hits[s:e]), key=rank.__getitem__)
        s = e
    return rows


def collection_name(folder: BeirFolder) -> str:
    """A Milvus collection name for a folder: its name, with characters Milvus refuses (all but
    letters, digits and "_", or a leading digit) replaced by "_"."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", folder.name)[:255]
    return name if name and not name[0].isdigit() else ("_" + name)[:255]


def evaluate_retrieval_db(encoder: Any, folder: str | BeirFolder, uri: str,
                          collection: str | None = None, *, token: str | None = None,
                          split: str = "test", batch_size: int | None = None,
                          upload_batch_size: int = 512, query_prompt: str | None = None,
                          query_prompt_name: str | None = None, corpus_prompt: str | None = None,
                          corpus_prompt_name: str | None = None, progress: bool = False,
                          **k_values: Sequence[int]) -> dict[str, float]:
    """`ir_evaluation.evaluate_retrieval`, with the corpus in a vector database.

    Args:
      encoder: a `SentenceEncoder`.
      folder: a BEIR folder path, or what `load_beir` returned.
      uri, token: the database (see `vectorstore`).
      collection: the corpus' collection (default: `collection_name(folder)`); uploaded to if
        incomplete, refused if it holds another model's vectors or another corpus.
      split: the qrels split (ignored for a loaded folder).
      batch_size: `encode`'s batch_size.
      upload_batch_size: rows per upsert.
      query_prompt, query_prompt_name, corpus_prompt, corpus_prompt_name: as
        `evaluate_retrieval`.
      progress: a progress bar for the upload.
      **k_values: as `evaluate_retrieval`.

    Returns:
      The metrics of `retrieval_metrics`, plus "queries" and "corpus" (counts).
    """
    f = folder if isinstance(folder, BeirFolder) else load_beir(folder, split)
    ks = k_value_lists(k_values)
    max_k = max(max(v) for v in ks.values())
    name = collection or collection_name(f)
    n = len(f.corpus_ids)

    stats = vectorstore.upload(encoder, f.corpus_texts(), uri, name, token=token,
                               batch_size=upload_batch_size, prompt=corpus_prompt,
                               prompt_name=corpus_prompt_name, progress=progress,
                               encode_batch_size=batch_size)
    if stats.rows != n:  # corpus.jsonl changed between load_beir's read and the upload's
        raise ValueError(f"{f.corpus_path}: {stats.rows} documents read, {n} expected")
    with vectorstore.connect(uri, token) as client:
        record = vectorstore.ModelRecord.of(encoder)
        vectorstore.open_collection(client, uri, name, record, create=False)
        held = client.query(name, filter="", output_fields=["count(*)"],
                            consistency_level="Strong")[0]["count(*)"]
        if held != n:
            raise ValueError(f"collection {name!r} at {uri} holds {held} rows, but {f.path} has "
                             f"{n} documents: it holds another corpus too; use another collection")
        q_emb = encoder.encode(f.query_texts, batch_size=batch_size,
                               **side_prompt_kwargs(encoder, "query", query_prompt,
                                                    query_prompt_name))
        # One more than needed, so that equal scores at the cut are ranked by id, not by the
        # database's choice (ties beyond max_k + 1 excepted).
        hits = vectorstore.search_vectors(client, name, q_emb, top_k=min(max_k + 1, n),
                                          with_text=False)
    rank = _id_ranks(f.corpus_ids)  # sentence-transformers' tie-break: ascending id
    ranked = [[f.corpus_ids[r] for r in _ties_by_id(qh, rank)][:max_k] for qh in hits]
    out = retrieval_metrics(ranked, f.query_ids, f.relevant, **ks)
    return out | {"queries": len(f.query_ids), "corpus": n}


def retrieval_table_db(encoder: Any, folders: Sequence[str | BeirFolder], uri: str,
                       collections: Sequence[str | None] | None = None, split: str = "test",
                       batch_size: int | None = None, token: str | None = None,
                       **prompts: str | None) -> list[dict[str, Any]]:
    """`ir_evaluation.retrieval_table` through the database: one row per folder.

    `collections`: one name (or None for `collection_name`) per folder; default all None.
    """
    collections = list(collections or [None] * len(folders))
    if len(collections) != len(folders):
        raise ValueError(f"{len(collections)} collections for {len(folders)} folders")
    rows = []
    for folder, name in zip(folders, collections, strict=True):
        f = folder if isinstance(folder, BeirFolder) else load_beir(folder, split)
        rows.append({"folder": f.path, "name": f.name,
                     **evaluate_retrieval_db(encoder, f, uri, name, token=token,
                                             batch_size=batch_size, **prompts)})
    return rows
