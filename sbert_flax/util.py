"""Corpus utilities compatible with `sentence_transformers.util`, in one namespace.

- `semantic_search`, `paraphrase_mining`, `paraphrase_mining_embeddings` (`search.py`): exact
  top-k by cosine or dot score, jitted chunks sharded over the local devices.
- `quantize_embeddings` (`quantization.py`): sentence-transformers' precisions, bit for bit.
- `semantic_search_faiss`, `semantic_search_usearch` (`ann.py`): sentence-transformers'
  approximate / quantized search over faiss or usearch (the `index` extra).
- `load_embeddings`, `save_embeddings`, `write_manifest`, `merge_shards` (`embeddings_file.py`):
  one `.npy`, or the shards + manifest of a multi-process `sbert-flax encode`.
- `mine_hard_negatives` (`mining.py`): sentence-transformers' hard-negative mining, ranked by
  `semantic_search`.
- `search_corpus`: encode (or load cached) corpus embeddings and search them, for the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sbert_flax.common.arraylike import as_matrix
from sbert_flax.inference.embeddings_file import (  # noqa: F401  (re-exported)
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    load_embeddings,
    manifest_path,
    merge_shards,
    save_embeddings,
    shard_path,
    write_manifest,
)
from sbert_flax.inference.quantization import PRECISIONS, Precision, quantize_embeddings  # noqa: F401
from sbert_flax.models.prompts import side_prompt_kwargs
from sbert_flax.retrieval.ann import (  # noqa: F401  (re-exported)
    semantic_search_faiss,
    semantic_search_usearch,
)
from sbert_flax.retrieval.mining import mine_hard_negatives  # noqa: F401  (re-exported)
from sbert_flax.retrieval.search import (  # noqa: F401  (re-exported)
    TRACE_COUNTS,
    ScoreFunction,
    paraphrase_mining,
    paraphrase_mining_embeddings,
    semantic_search,
)

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "PRECISIONS", "TRACE_COUNTS", "load_embeddings",
           "manifest_path", "merge_shards", "mine_hard_negatives", "paraphrase_mining",
           "paraphrase_mining_embeddings", "quantize_embeddings", "save_embeddings", "search_corpus", "semantic_search",
           "semantic_search_faiss", "semantic_search_usearch",
           "shard_path", "write_manifest"]


def search_corpus(encoder: Any, corpus: Sequence[str], queries: Sequence[str], top_k: int = 10,
                  corpus_embeddings_path: str | None = None, batch_size: int | None = None,
                  score_function: ScoreFunction = None, query_prompt: str | None = None,
                  query_prompt_name: str | None = None, corpus_prompt: str | None = None,
                  corpus_prompt_name: str | None = None) -> list[list[dict[str, int | float]]]:
    """Encodes (or loads) the corpus, encodes the queries and runs `semantic_search`.

    Args:
      encoder: anything with `.encode(list_of_str, batch_size=...) -> [n, D]`.
      corpus: the corpus texts; result ids index this list.
      queries: the query texts.
      top_k: results per query.
      corpus_embeddings_path: a cache: when it (or its manifest) exists with one row per corpus
        line and the encoder's dim it is used, else the corpus is encoded and saved there
        atomically (a stale cache is overwritten, with a warning). It is checked by shape only:
        one written under another corpus prompt is not detected (delete it when that changes).
      batch_size: encode batch size (None: the encoder's default).
      score_function: as in `semantic_search`.
      query_prompt, query_prompt_name, corpus_prompt, corpus_prompt_name: the prompt of each
        side; without them each side takes the model's own "query" / "document" prompt, as
        sentence-transformers' `encode_query` / `encode_document`.

    Returns:
      Per query, `[{"corpus_id": int, "score": float}, ...]` best first.
    """
    corpus, queries = list(corpus), list(queries)
    size = {} if batch_size is None else {"batch_size": batch_size}
    q = as_matrix(encoder.encode(queries, **size, **side_prompt_kwargs(
        encoder, "query", query_prompt, query_prompt_name)), "query embeddings")
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
        c = as_matrix(encoder.encode(corpus, **size, **side_prompt_kwargs(
            encoder, "document", corpus_prompt, corpus_prompt_name)), "corpus embeddings")
        if corpus_embeddings_path is not None:
            save_embeddings(corpus_embeddings_path, c)
    return semantic_search(q, c, top_k=top_k, score_function=score_function)
