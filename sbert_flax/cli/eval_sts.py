"""`sbert-flax eval-sts`: Spearman / Pearson of cosine against gold scores on one STS file."""

from __future__ import annotations

import argparse
import time

from sbert_flax.cli.args import load_encoder, model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-sts", help="Spearman / Pearson x100 of cosine vs gold on s1<TAB>s2<TAB>score")
    model_args(p, dtype=True)
    p.add_argument("--data", required=True, help="TSV: s1 \\t s2 \\t score per line")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sbert_flax.retrieval.sts import evaluate_sts, read_sts

    read_sts(args.data)  # report a malformed file before the slow model load
    enc = load_encoder(args)
    t0 = time.perf_counter()
    r = evaluate_sts(enc, args.data, batch_size=args.batch_size)
    secs = time.perf_counter() - t0
    print(f"{args.data}: {r['pairs']} pairs, cosine vs gold ({secs:.1f} s)")
    print(f"spearman x100: {100 * r['spearman']:.2f}")
    print(f"pearson  x100: {100 * r['pearson']:.2f}")
    return 0
