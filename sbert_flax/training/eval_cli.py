"""`sbert-flax eval --model M --sts FILE [--sts FILE ...]`: Spearman x100 of each STS file and
their mean, as a table (C-MTEB style).

    python -m sbert_flax.training.eval_cli --model runs/mnrl/best_model \\
        --sts ../shared/data/stsb-zh/dev.tsv --sts ../shared/data/stsb-zh/test.tsv

Exit codes: 0 done, 2 bad input (missing model or file, malformed STS line).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any


def sts_table(encoder: Any, paths: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per file: {"file", "pairs", "spearman", "pearson"} (coefficients in [-1, 1])."""
    from sbert_flax.evaluation import evaluate_sts

    rows = []
    for p in paths:
        r = evaluate_sts(encoder, p, batch_size=batch_size)
        rows.append({"file": p, "pairs": int(r["pairs"]), "spearman": float(r["spearman"]),
                     "pearson": float(r["pearson"])})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbert-flax eval",
                                description="Spearman x100 of cosine similarity on STS files, and the mean.")
    p.add_argument("--model", required=True, help="sbert-flax / sentence-transformers / HF dir or hub id")
    p.add_argument("--sts", action="append", required=True, help="s1\\ts2\\tscore file; repeat for several")
    p.add_argument("--pooling", choices=["cls", "mean", "max"], help="override the model's pooling")
    p.add_argument("--max_seq_length", type=int, help="override the model's sequence length")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the table and returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from sbert_flax.config import ConfigError
    from sbert_flax.encoder import SentenceEncoder
    from sbert_flax.weights import WeightsError

    try:
        for p in args.sts:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"STS file not found: {p}")
        enc = SentenceEncoder.from_pretrained(args.model, pooling=args.pooling,
                                              max_seq_length=args.max_seq_length, dtype=args.dtype)
        rows = sts_table(enc, args.sts, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, WeightsError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
