"""`sbert-flax mine-negatives`: hard negatives for anchor/positive pairs, as sentence-transformers'
`mine_hard_negatives`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from sbert_flax.cli.args import add_prompt_args, load_encoder, model_args, read_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mine-negatives", help="hard negatives for anchor/positive pairs, as "
                       "sentence-transformers' mine_hard_negatives (output trains with mnrl)")
    model_args(p, dtype=True)
    p.add_argument("--input", required=True, help="TSV with a header naming anchor and positive")
    p.add_argument("--output", required=True, help="TSV: anchor, positive, negative (triplet) or "
                   "negative_1..negative_n (n-tuple); written only on success")
    p.add_argument("--corpus", help="UTF-8 text, one candidate negative per line (default: the "
                   "positives; the positives are always added)")
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--range-min", type=int, default=0, help="skip the N best candidates")
    p.add_argument("--range-max", type=int, help="consider the N best candidates only")
    p.add_argument("--max-score", type=float, help="drop candidates with a higher cosine")
    p.add_argument("--min-score", type=float, help="drop candidates with a lower cosine")
    p.add_argument("--absolute-margin", type=float,
                   help="drop candidates within this cosine of the anchor's positive")
    p.add_argument("--relative-margin", type=float,
                   help="drop candidates above positive - |positive| x this")
    p.add_argument("--sampling-strategy", choices=("top", "random"), default="top")
    p.add_argument("--output-format", choices=("triplet", "n-tuple", "labeled-pair", "labeled-list"),
                   default="triplet")
    p.add_argument("--seed", type=int, default=12, help="random sampling seed")
    p.add_argument("--batch-size", type=int, default=None, help="encode batch (rows of 64 tokens)")
    p.add_argument("--scratch-dir", help="where the embeddings of a corpus over 100,000 texts "
                   "are kept while mining (removed at the end; default: the output's folder)")
    add_prompt_args(p, "the anchors", "the corpus (the candidate negatives)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sbert_flax.retrieval.mining import iter_mined, read_pairs, write_tsv

    # Every input is read and checked before the slow model load; nothing is written on error.
    anchors, positives = read_pairs(args.input)
    corpus = read_lines(args.corpus) if args.corpus else None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output directory does not exist: {out_dir}")
    enc = load_encoder(args)
    t0 = time.perf_counter()
    # Written block by block as the anchors are mined, to a temp file renamed at the end.
    blocks = iter_mined(
        enc, anchors, positives, corpus=corpus, range_min=args.range_min, range_max=args.range_max,
        max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin, num_negatives=args.num_negatives,
        sampling_strategy=args.sampling_strategy, output_format=args.output_format,
        seed=args.seed, batch_size=args.batch_size, query_prompt=args.query_prompt,
        query_prompt_name=args.query_prompt_name, corpus_prompt=args.corpus_prompt,
        corpus_prompt_name=args.corpus_prompt_name, scratch_dir=args.scratch_dir or out_dir)
    rows = write_tsv(args.output, blocks)
    print(f"wrote {rows} {args.output_format} rows for {len(anchors)} pairs to {args.output} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
