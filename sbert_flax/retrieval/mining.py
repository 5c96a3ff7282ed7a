"""Hard-negative mining, as `sentence_transformers.util.mine_hard_negatives` does it.

Anchors and corpus are embedded once (L2-normalised), each block of unique anchors is ranked
against the corpus with `search.semantic_search` (jitted, chunked over the corpus, sharded over the
local devices), and the candidates go through sentence-transformers' filters in its order:
the anchor's own corpus entry and its positives out, absolute / relative margin against the anchor's hardest positive, max_score,
min_score; then the first `range_max` survivors, minus the first `range_min`, and "top" or
"random" sampling. The output columns are those of its `datasets.Dataset`, as plain lists.

It streams: one block of unique anchors is embedded, ranked and turned into output rows at a time
(`iter_mined` yields each block's rows; `write_tsv` writes them as they come, to a temp file
renamed at the end), and a corpus larger than one chunk is embedded once into a scratch file and
searched a chunk at a time (each chunk sharded over the devices by `search.top_k_arrays`), with a
running top-k per anchor. Memory holds the texts and ids, not the embeddings or the output rows
(bench/mining_memory.py).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from sbert_flax.common.arraylike import as_matrix
from sbert_flax.models.prompts import side_prompt_kwargs
from sbert_flax.retrieval.search import merge_top_k, top_k_arrays

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


def _encode(encoder: Any, texts: list[str], batch_size: int | None, side: str,
            prompt: str | None, prompt_name: str | None) -> np.ndarray:
    kwargs: dict[str, Any] = {"normalize": True}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    # sentence-transformers mines with encode_query / encode_document: each side's own prompt,
    # never default_prompt_name, unless one is given.
    kwargs.update(side_prompt_kwargs(encoder, side, prompt, prompt_name))
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
                        corpus_chunk_size: int = 100_000, scratch_dir: str | None = None,
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
      anchors_per_block: unique anchors embedded and ranked at a time (sentence-transformers'
        faiss_batch_size): bounds the anchor embeddings and candidates held at once.
      corpus_chunk_size: corpus texts embedded, and embeddings searched, at a time. A corpus
        larger than one chunk is embedded once into a scratch file and read back a chunk at a
        time for each block of anchors, so its embeddings are never all in memory.
      scratch_dir: where that file goes (default: the system's temp folder); removed at the end.

    Returns:
      The output columns, `{name: list}`, in sentence-transformers' row order. `iter_mined`
      yields them block by block instead (what `sbert-flax mine-negatives` writes as it goes).

    Raises:
      ValueError: no pairs, anchors and positives of different lengths, or an option out of range.
    """
    kwargs = dict(locals())  # every argument above, passed on as given
    out: dict[str, list] = {}
    for block in iter_mined(**kwargs):
        for name, values in block.items():
            out.setdefault(name, []).extend(values)
    return out


def iter_mined(encoder: Any, anchors: Sequence[str], positives: Sequence[str],
               corpus: Sequence[str] | None = None, range_min: int = 0,
               range_max: int | None = None, max_score: float | None = None,
               min_score: float | None = None, absolute_margin: float | None = None,
               relative_margin: float | None = None, num_negatives: int = 3,
               sampling_strategy: SamplingStrategy = "top", output_format: OutputFormat = "triplet",
               seed: int | None = 12, batch_size: int | None = None,
               query_prompt: str | None = None, query_prompt_name: str | None = None,
               corpus_prompt: str | None = None, corpus_prompt_name: str | None = None,
               anchors_per_block: int = 16384, corpus_chunk_size: int = 100_000,
               scratch_dir: str | None = None) -> Iterator[dict[str, list]]:
    """`mine_hard_negatives`, one block of unique anchors at a time: yields each block's output
    columns (every column, possibly empty) in order; their concatenation is its result.

    Memory holds the texts and ids, one block of anchor embeddings and candidates, and one corpus
    chunk of embeddings; never all embeddings or all output rows.
    """
    anchors, positives = list(anchors), list(positives)
    if not anchors and not positives:
        raise ValueError("no (anchor, positive) pairs to mine negatives for")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={num_negatives}")
    if anchors_per_block < 1 or corpus_chunk_size < 1:
        raise ValueError(f"anchors_per_block={anchors_per_block} and corpus_chunk_size="
                         f"{corpus_chunk_size} must be >= 1")
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
    # Each anchor's own corpus entry, where it has one (symmetric pairs, or a corpus holding the
    # anchors): a text is never its own negative. -1: not in the corpus.
    self_ids = np.asarray([doc_id.get(q, -1) for q in queries], np.int64)
    del anchors, positives, query_id, doc_id  # the ids above are all the rest needs

    rng = random.Random(seed)
    # Room for the positives and the anchor itself, which are dropped before range_max counts.
    width = range_max + max_positives + 1
    skipped: collections.Counter[str] = collections.Counter()
    short = 0
    with _CorpusEmbeddings(encoder, docs, batch_size, corpus_prompt, corpus_prompt_name,
                           corpus_chunk_size, scratch_dir) as c_emb:
        for b0 in range(0, len(queries), anchors_per_block):
            b1 = min(b0 + anchors_per_block, len(queries))
            q_emb = _encode(encoder, queries[b0:b1], batch_size, "query", query_prompt,
                            query_prompt_name)
            block_pos = sorted({i for q in range(b0, b1) for i in pos_ids[q]})
            all_scores, all_ids, pos_emb = c_emb.search(q_emb, width, block_pos)
            pos_row = {d: r for r, d in enumerate(block_pos)}
            out = _Output(output_format, num_negatives)
            for r in range(b1 - b0):
                q = b0 + r
                ids, scores = all_ids[r], all_scores[r]
                pos = np.asarray(pos_ids[q])
                # [n_pos], cosine of normalised embeddings
                pos_scores = pos_emb[[pos_row[int(i)] for i in pos]] @ q_emb[r]
                scores[np.isin(ids, pos) | ((ids == self_ids[q]) & (ids >= 0))] = -np.inf
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
                # Dropped candidates sink to the end, so range_min counts survivors only;
                # stable, so equal scores keep the search's order (lower corpus id first).
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
            short += out.short
            yield out.columns
    for name, count in skipped.items():
        logger.info("skipped %d candidate negatives for their %s", count, name)
    if short:
        logger.info("%d anchor rows got fewer than %d negatives; consider a larger range_max or "
                    "looser filters", short, num_negatives)


class _CorpusEmbeddings:
    """The corpus's normalised embeddings: in memory when they fit one chunk, else in a scratch
    file of raw float32 rows written once and read back a chunk at a time (plain reads, not a
    memory map, so what was read leaves the process's memory with the chunk)."""

    def __init__(self, encoder: Any, docs: list[str], batch_size: int | None,
                 prompt: str | None, prompt_name: str | None, chunk: int,
                 scratch_dir: str | None):
        self.encoder, self.docs, self.chunk = encoder, docs, chunk
        self.args = (batch_size, "document", prompt, prompt_name)
        self.scratch_dir = scratch_dir
        self.memory: np.ndarray | None = None
        self.path: str | None = None
        self.dim = 0

    def __enter__(self) -> _CorpusEmbeddings:
        if len(self.docs) <= self.chunk:
            self.memory = _encode(self.encoder, self.docs, *self.args)
            self.dim = self.memory.shape[1]
            return self
        fd, self.path = tempfile.mkstemp(prefix="sbert-flax-mining-", suffix=".f32",
                                         dir=self.scratch_dir)
        with os.fdopen(fd, "wb") as f:
            for s in range(0, len(self.docs), self.chunk):
                emb = _encode(self.encoder, self.docs[s:s + self.chunk], *self.args)
                self.dim = emb.shape[1]
                f.write(np.ascontiguousarray(emb, np.float32).tobytes())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            os.unlink(self.path)

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.memory is not None:
            yield 0, self.memory
            return
        with open(self.path, "rb") as f:  # type: ignore[arg-type]
            for s in range(0, len(self.docs), self.chunk):
                n = min(self.chunk, len(self.docs) - s)
                data = np.fromfile(f, np.float32, count=n * self.dim)
                yield s, data.reshape(n, self.dim)

    def search(self, q_emb: np.ndarray, width: int, rows: Sequence[int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores [b, width], ids [b, width], embeddings of `rows` (sorted ids) [len, D]).

        Padded to `width` with -inf / -1 as sentence-transformers pads. Over several chunks the
        running top-k keeps earlier chunks first among equal scores: ties by lower id, as one
        search over the whole corpus orders them.
        """
        b = len(q_emb)
        best_s = np.full((b, 0), -np.inf, np.float32)
        best_i = np.full((b, 0), -1, np.int64)
        picked = np.zeros((len(rows), q_emb.shape[1]), np.float32)
        rows_arr = np.asarray(rows, np.int64)
        for start, emb in self._chunks():
            s, i = top_k_arrays(q_emb, emb, top_k=width, corpus_chunk_size=self.chunk,
                                query_chunk_size=min(b, 1024))
            i = np.where(i >= 0, i + start, -1)
            best_s, best_i = merge_top_k(best_s, best_i, s, i, width)
            here = (rows_arr >= start) & (rows_arr < start + len(emb))
            picked[here] = emb[rows_arr[here] - start]
        scores = np.full((b, width), -np.inf, np.float32)
        ids = np.full((b, width), -1, np.int64)
        scores[:, :best_s.shape[1]] = best_s
        ids[:, :best_i.shape[1]] = best_i
        return scores, ids, picked


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
    from sbert_flax.common.files import iter_text_lines

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


def write_tsv(path: str, columns: dict[str, list] | Iterable[dict[str, list]]) -> int:
    """Writes the mined columns as a TSV with a header, atomically; returns the rows written.

    `columns` is one `{name: list}` or an iterable of them (`iter_mined`'s blocks), written as
    they come: the rows are never all in memory. List cells (labeled-list) are written as JSON
    arrays. A text containing a tab or a newline would shift or split its row, so it stops the
    write; the temp file is removed and `path` is left as it was.

    Raises:
      ValueError: a text with a tab or newline (naming the row and column).
    """
    import json

    from sbert_flax.common.files import atomic_write

    def cell(v: Any, r: int, name: str) -> str:
        if isinstance(v, list):
            return json.dumps(v, ensure_ascii=False)
        s = str(v)
        if "\t" in s or "\n" in s or "\r" in s:
            raise ValueError(f"row {r + 1}, column {name!r}: the text contains a tab or newline, "
                             "which TSV cannot hold")
        return s

    blocks = [columns] if isinstance(columns, dict) else columns
    rows = 0
    names: list[str] | None = None
    with atomic_write(path, "w") as f:
        for block in blocks:
            if names is None:
                names = list(block)
                f.write("\t".join(names) + "\n")
            n = len(block[names[0]]) if names else 0
            f.writelines("\t".join(cell(block[c][r], rows + r, c) for c in names) + "\n"
                         for r in range(n))
            rows += n
    return rows
