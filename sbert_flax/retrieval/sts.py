"""STS evaluation: rank / linear correlation of embedding cosines against gold scores.

Retrieval evaluation on BEIR folders lives in `sbert_flax.retrieval.ir_evaluation` and is re-exported here.

Pure numpy (plus the encoder's own `encode`), so the CLI and the training loop share one
implementation. Correlations are returned as plain coefficients in [-1, 1]; multiplying by 100
(the way STS results are usually quoted) is left to whoever prints them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sbert_flax.common.files import read_text_lines
from sbert_flax.retrieval.ir_evaluation import (  # noqa: F401  (re-exported: every evaluator in one namespace)
    BeirFolder,
    evaluate_retrieval,
    load_beir,
    retrieval_metrics,
)

# Third-field names that mark a header line rather than a score (UER-py TSVs have a header).
_HEADER_SCORE_NAMES = ("score", "label", "similarity", "gold")


def _as_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y have different lengths ({x.size} vs {y.size})")
    if x.size < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite (found NaN or inf)")
    return x, y


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span (scipy's 'average' method)."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start index of each run of equal values, then the mean of 1-based ranks over the run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either input is constant (as scipy, minus the warning).

    Raises:
      ValueError: lengths differ, fewer than 2 pairs, or non-finite values.
    """
    x, y = _as_pair(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled as scipy)."""
    x, y = _as_pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def read_sts(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """Reads a `s1 \\t s2 \\t score` file (UTF-8, optional BOM, optional header line).

    Blank lines are skipped; every other line must have exactly three tab-separated fields with a
    finite numeric score. A first line whose score field is a name like "score" or "label" is
    taken as a header.

    Returns:
      (first sentences, second sentences, float64 scores), one entry per pair.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: a malformed line (the message is `path:line: what is wrong`), or no pairs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"STS file not found: {path}")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for line_no, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{line_no}: expected 3 tab-separated fields "
                             f"(s1, s2, score), got {len(fields)}")
        try:
            score = float(fields[2])
        except ValueError:
            if line_no == 1 and fields[2].strip().lower() in _HEADER_SCORE_NAMES:
                continue
            raise ValueError(f"{path}:{line_no}: score {fields[2]!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{line_no}: score {fields[2]!r} is not finite")
        s1.append(fields[0])
        s2.append(fields[1])
        scores.append(score)
    if not scores:
        raise ValueError(f"{path}: no sentence pairs found")
    return s1, s2, np.asarray(scores, np.float64)


def pair_cosines(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine of two [n, d] arrays (float64; a zero vector gives cosine 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
    return np.sum(a * b, axis=-1) / (na * nb)


def evaluate_pairs(encoder: Any, s1: Sequence[str], s2: Sequence[str], scores, batch_size: int = 64
                   ) -> dict[str, float]:
    """Spearman and Pearson of cosine(encode(s1), encode(s2)) against gold `scores`.

    Args:
      encoder: anything with `encode(sentences, batch_size=...) -> [n, d] array`
        (a `SentenceEncoder`). Each distinct sentence is encoded once.
      s1, s2: the sentence pairs.
      scores: gold similarity, one per pair.
      batch_size: passed to `encode`.

    Returns:
      {"spearman", "pearson"} as plain coefficients in [-1, 1], and "pairs".
    """
    if not (len(s1) == len(s2) == len(scores)):
        raise ValueError(f"s1, s2 and scores differ in length ({len(s1)}, {len(s2)}, {len(scores)})")
    unique = list(dict.fromkeys([*s1, *s2]))
    row = {s: i for i, s in enumerate(unique)}
    emb = np.asarray(encoder.encode(unique, batch_size=batch_size))  # [U, D]
    cos = pair_cosines(emb[[row[s] for s in s1]], emb[[row[s] for s in s2]])
    return {"spearman": spearman(cos, scores), "pearson": pearson(cos, scores), "pairs": len(scores)}


def evaluate_sts(encoder: Any, path: str, batch_size: int = 64) -> dict[str, float]:
    """`evaluate_pairs` on a `s1 \\t s2 \\t score` file (see `read_sts`)."""
    s1, s2, scores = read_sts(path)
    return evaluate_pairs(encoder, s1, s2, scores, batch_size=batch_size)


def sts_table(encoder: Any, paths: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per file: {"file", "pairs", "spearman", "pearson"} (coefficients in [-1, 1])."""
    rows = []
    for p in paths:
        r = evaluate_sts(encoder, p, batch_size=batch_size)
        rows.append({"file": p, "pairs": int(r["pairs"]), "spearman": float(r["spearman"]),
                     "pearson": float(r["pearson"])})
    return rows


def format_sts_table(rows: Sequence[dict[str, Any]]) -> str:
    """Spearman x100 per file and the mean over files, aligned for a terminal."""
    names = [os.path.relpath(r["file"]) if not os.path.isabs(r["file"]) else r["file"] for r in rows]
    width = max([len("mean"), len("file"), *map(len, names)])
    lines = [f"{'file':<{width}}  {'pairs':>7}  {'spearman':>8}",
             f"{'-' * width}  {'-' * 7}  {'-' * 8}"]
    for name, r in zip(names, rows, strict=True):
        lines.append(f"{name:<{width}}  {r['pairs']:>7d}  {100 * r['spearman']:>8.2f}")
    mean = sum(r["spearman"] for r in rows) / len(rows)
    lines.append(f"{'mean':<{width}}  {'':>7}  {100 * mean:>8.2f}")
    return "\n".join(lines)
