"""Hard-negative mining, as `sentence_transformers.util.mine_hard_negatives` does it.

Anchors and corpus are embedded once (L2-normalised), each block of unique anchors is ranked
against the corpus with `search.semantic_search` (jitted, chunked over the corpus, sharded over the
local devices), and the candidates go through sentence-transformers' filters in its order:
own positives out, absolute / relative margin against the anchor's hardest positive, max_score,
min_score; then the first `range_max` survivors, minus the first `range_min`, and "top" or
"random" sampling. The output columns are those of its `datasets.Dataset`, as plain lists.

Only one block of anchors' candidates is in memory at a time, so the ranking is bounded in the
number of pairs; the corpus embeddings are held whole (as sentence-transformers holds them).
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from sbert_flax.arraylike import as_matrix
from sbert_flax.search import semantic_search

logger = logging.getLogger(__name__)

SamplingStrategy = Literal["top", "random"]
OutputFormat = Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"]
OUTPUT_FORMATS: tuple[str, ...] = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
SAMPLING_STRATEGIES: tuple[str, ...] = ("top", "random")


def default_range_max(range_min: int, num_negatives: int, max_positives: int, *,
                      filtered: bool) -> int:
    """sentence-transformers' range_max when none is given: room for the positives and, when a
    margin or max_score may drop candidates, ten times the negatives asked for."""
    return range_min + num_negatives * (10 if filtered else 1) + max_positives


def _encode(encoder: Any, texts: list[str], batch_size: int | None, prompt: str | None,
            prompt_name: str | None) -> np.ndarray:
    kwargs: dict[str, Any] = {"normalize": True}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    # Passed only when set: the encoder's own default prompt (default_prompt_name) then applies,
    # as sentence-transformers' encode does without a prompt argument.
    if prompt is not None:
        kwargs["prompt"] = prompt
    if prompt_name is not None:
        kwargs["prompt_name"] = prompt_name
    return as_matrix(encoder.encode(texts, **kwargs), "embeddings")


def _check_args(n_anchors: int, n_positives: int, range_min: int, range_max: int,
                num_negatives: int, sampling_strategy: str, output_format: str) -> None:
    if n_anchors != n_positives:
        raise ValueError(f"{n_anchors} anchors and {n_positives} positives: give one positive "
                         "per anchor (repeat an anchor for each of its positives)")
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={range_min}")
    if range_min >= range_max:
        raise ValueError(f"range_min must be smaller than range_max, got range_min={range_min} "
                         f"and range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise ValueError(f"cannot mine {num_negatives} negatives per anchor: only "
                         f"{range_max - range_min} candidates remain after skipping the first "
                         f"range_min={range_min} of range_max={range_max}")
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling_strategy={sampling_strategy!r}; expected 'top' or 'random'")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format={output_format!r}; expected one of {OUTPUT_FORMATS}")


def mine_hard_negatives(encoder: Any, anchors: Sequence[str], positives: Sequence[str],
                        corpus: Sequence[str] | None = None, range_min: int = 0,
                        range_max: int | None = None, max_score: float | None = None,
                        min_score: float | None = None, absolute_margin: float | None = None,
                        relative_margin: float | None = None, num_negatives: int = 3,
                        sampling_strategy: SamplingStrategy = "top",
                        output_format: OutputFormat = "triplet", seed: int | None = 12,
                        batch_size: int | None = None, query_prompt: str | None = None,
                        query_prompt_name: str | None = None, corpus_prompt: str | None = None,
                        corpus_prompt_name: str | None = None, anchors_per_block: int = 16384,
                        ) -> dict[str, list]:
    """Adds hard negatives to (anchor, positive) pairs, like sentence-transformers.

    Args:
      encoder: anything with `.encode(texts, normalize=True, ...) -> [n, D]` (a `SentenceEncoder`).
      anchors: the anchor (query) of each pair; an anchor repeated is one query with several
        positives.
      positives: the positive of each pair.
      corpus: candidate negatives besides the positives (default: the positives alone); the
        corpus searched is `corpus + positives`, deduplicated, first occurrence first.
      range_min: skip the first range_min candidates (after the filters below).
      range_max: consider at most this many candidates (default: range_min + num_negatives +
        the most positives of one anchor, or 10 x num_negatives when a filter is set).
      max_score: drop candidates scoring above it.
      min_score: drop candidates scoring below it.
      absolute_margin: drop candidates with score + margin > the anchor's lowest positive score.
      relative_margin: drop candidates above `pos - |pos| * margin` (pos: the lowest positive).
      num_negatives: negatives per anchor.
      sampling_strategy: "top" (the best remaining) or "random" (a sample of them, best first).
      output_format: "triplet" (anchor, positive, negative), "n-tuple" (anchor, positive,
        negative_1..negative_n; rows short of n negatives dropped), "labeled-pair" (anchor,
        positive, label: the positives with 1, the negatives with 0) or "labeled-list" (anchor,
        positive: [positive, negatives...], labels: [1, 0, ...]).
      seed: seeds "random" sampling (`random.Random(seed).sample` per anchor, in anchor order:
        sentence-transformers after `random.seed(seed)` draws the same); None draws fresh.
      batch_size: encode batch size (None: the encoder's default).
      query_prompt, query_prompt_name: the prompt of the anchors, as `encode`'s.
      corpus_prompt, corpus_prompt_name: the prompt of the corpus.
      anchors_per_block: unique anchors ranked at a time (sentence-transformers' faiss_batch_size):
        bounds the candidate arrays held at once.

    Returns:
      The output columns, `{name: list}`, in sentence-transformers' row order.

    Raises:
      ValueError: no pairs, anchors and positives of different lengths, or an option out of range.
    """
    anchors, positives = list(anchors), list(positives)
    if not anchors and not positives:
        raise ValueError("no (anchor, positive) pairs to mine negatives for")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={num_negatives}")
    # pandas' groupby(anchor).count() in sentence-transformers: duplicate pairs count too.
    max_positives = max(collections.Counter(anchors).values()) if anchors else 0
    if range_max is None:
        filtered = absolute_margin is not None or relative_margin is not None or max_score is not None
        range_max = default_range_max(range_min, num_negatives, max_positives, filtered=filtered)
    _check_args(len(anchors), len(positives), range_min, range_max, num_negatives,
                sampling_strategy, output_format)

    docs = list(dict.fromkeys([*(positives if corpus is None else corpus), *positives]))
    doc_id = {t: i for i, t in enumerate(docs)}
    queries = list(dict.fromkeys(anchors))
    query_id = {q: i for i, q in enumerate(queries)}
    pos_ids: list[list[int]] = [[] for _ in queries]
    for a, p in zip(anchors, positives, strict=True):
        ids = pos_ids[query_id[a]]
        if doc_id[p] not in ids:  # a repeated pair is one positive
            ids.append(doc_id[p])

    c_emb = _encode(encoder, docs, batch_size, corpus_prompt, corpus_prompt_name)
    q_emb = _encode(encoder, queries, batch_size, query_prompt, query_prompt_name)
    rng = random.Random(seed)
    width = range_max + max_positives
    out = _Output(output_format, num_negatives)
    skipped = collections.Counter()
    for b0 in range(0, len(queries), anchors_per_block):
        b1 = min(b0 + anchors_per_block, len(queries))
        hits = semantic_search(q_emb[b0:b1], c_emb, top_k=width, corpus_chunk_size=100_000,
                               query_chunk_size=min(b1 - b0, 1024))
        for r, row in enumerate(hits):
            q = b0 + r
            ids = np.full(width, -1, np.int64)  # sentence-transformers pads to width with -1/-inf
            scores = np.full(width, -np.inf, np.float32)
            ids[:len(row)] = [h["corpus_id"] for h in row]
            scores[:len(row)] = [h["score"] for h in row]
            pos = np.asarray(pos_ids[q])
            pos_scores = c_emb[pos] @ q_emb[q]  # [n_pos], cosine of normalised embeddings
            scores[np.isin(ids, pos)] = -np.inf
            hardest = float(pos_scores.min())
            for name, drop in (
                    ("absolute_margin", None if absolute_margin is None
                     else scores + absolute_margin > hardest),
                    ("relative_margin", None if relative_margin is None
                     else scores > hardest - abs(hardest) * relative_margin),
                    ("max_score", None if max_score is None else scores > max_score),
                    ("min_score", None if min_score is None else scores < min_score)):
                if drop is not None:
                    skipped[name] += int(np.sum(drop & np.isfinite(scores)))
                    scores[drop] = -np.inf
            # Dropped candidates sink to the end, so range_min counts survivors only; stable, so
            # equal scores keep the search's order (lower corpus id first).
            order = np.argsort(-scores, kind="stable")[:range_max][range_min:]
            ids, scores = ids[order], scores[order]
            if sampling_strategy == "random":
                options = max(int(np.sum(np.isfinite(scores))), num_negatives)
                pick = np.asarray(rng.sample(range(options), k=num_negatives))
                pick = pick[np.argsort(-scores[pick], kind="stable")]
            else:
                pick = np.arange(num_negatives)
            negs = [(int(i), float(s)) for i, s in zip(ids[pick], scores[pick], strict=True)]
            out.add(queries[q], [docs[p] for p in pos_ids[q]],
                    [docs[i] for i, s in negs if np.isfinite(s)], len(negs))
    for name, count in skipped.items():
        logger.info("skipped %d candidate negatives for their %s", count, name)
    if out.short:
        logger.info("%d anchor rows got fewer than %d negatives; consider a larger range_max or "
                    "looser filters", out.short, num_negatives)
    return out.columns


class _Output:
    """Accumulates the rows of one output format, in sentence-transformers' order."""

    def __init__(self, output_format: str, num_negatives: int):
        self.format, self.n, self.short = output_format, num_negatives, 0
        if output_format == "triplet":
            self.columns: dict[str, list] = {"anchor": [], "positive": [], "negative": []}
        elif output_format == "n-tuple":
            self.columns = {"anchor": [], "positive": [],
                            **{f"negative_{i}": [] for i in range(1, num_negatives + 1)}}
        elif output_format == "labeled-pair":
            self.columns = {"anchor": [], "positive": [], "label": []}
        else:
            self.columns = {"anchor": [], "positive": [], "labels": []}

    def add(self, anchor: str, positives: list[str], negatives: list[str], asked: int) -> None:
        """One unique anchor: its positives (deduplicated) and its kept negatives, best first."""
        c = self.columns
        if len(negatives) < asked:
            self.short += len(positives)
        if self.format == "labeled-pair":
            for p in positives:
                c["anchor"].append(anchor), c["positive"].append(p), c["label"].append(1)
            for neg in negatives:
                c["anchor"].append(anchor), c["positive"].append(neg), c["label"].append(0)
            return
        for p in positives:
            if self.format == "triplet":
                for neg in negatives:
                    c["anchor"].append(anchor), c["positive"].append(p), c["negative"].append(neg)
            elif self.format == "n-tuple":
                if len(negatives) == self.n:  # a row short of n negatives is dropped
                    c["anchor"].append(anchor), c["positive"].append(p)
                    for i, neg in enumerate(negatives, start=1):
                        c[f"negative_{i}"].append(neg)
            elif negatives:  # labeled-list: rows with no negative are dropped
                c["anchor"].append(anchor)
                c["positive"].append([p, *negatives])
                c["labels"].append([1] + [0] * len(negatives))


# ---- files: the pairs read and the mined rows written, for `sbert-flax mine-negatives` ----------

def read_pairs(path: str) -> tuple[list[str], list[str]]:
    """The (anchor, positive) pairs of a TSV whose header names `anchor` and `positive` columns.

    Other columns are allowed and ignored (a triplet file mines too).

    Raises:
      FileNotFoundError: `path` is missing.
      ValueError: `path:line: why` for a header without the columns, a line with another field
        count, or no pairs at all.
    """
    from sbert_flax.files import iter_text_lines

    anchors: list[str] = []
    positives: list[str] = []
    lines = iter_text_lines(path)
    header = next(lines, None)
    if header is None:
        raise ValueError(f"{path}:1: empty file, expected a header line `anchor<TAB>positive`")
    names = [n.strip() for n in header.split("\t")]
    missing = [c for c in ("anchor", "positive") if c not in names]
    if missing:
        raise ValueError(f"{path}:1: header has no {' or '.join(map(repr, missing))} column "
                         f"(found {names}); the pairs file needs a header `anchor<TAB>positive`")
    a, p = names.index("anchor"), names.index("positive")
    for lineno, line in enumerate(lines, start=2):
        parts = line.split("\t")
        if len(parts) != len(names):
            raise ValueError(f"{path}:{lineno}: expected {len(names)} tab-separated fields "
                             f"({', '.join(names)}), got {len(parts)}")
        anchors.append(parts[a])
        positives.append(parts[p])
    if not anchors:
        raise ValueError(f"{path}: no pairs after the header")
    return anchors, positives


def write_tsv(path: str, columns: dict[str, list]) -> int:
    """Writes the mined columns as a TSV with a header, atomically; returns the rows written.

    List cells (labeled-list) are written as JSON arrays. A text containing a tab or a newline
    would shift or split its row, so it is refused before anything is written.

    Raises:
      ValueError: a text with a tab or newline (naming the row and column).
    """
    import json

    from sbert_flax.files import atomic_write

    names = list(columns)
    rows = len(columns[names[0]]) if names else 0

    def cell(v: Any, r: int, name: str) -> str:
        if isinstance(v, list):
            return json.dumps(v, ensure_ascii=False)
        s = str(v)
        if "\t" in s or "\n" in s or "\r" in s:
            raise ValueError(f"row {r + 1}, column {name!r}: the text contains a tab or newline, "
                             "which TSV cannot hold")
        return s

    lines = ["\t".join(names)]
    lines += ["\t".join(cell(columns[n][r], r, n) for n in names) for r in range(rows)]
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows
