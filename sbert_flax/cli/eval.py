"""`sbert-flax eval`: STS files and BEIR retrieval folders in one table (C-MTEB style)."""

from __future__ import annotations

import argparse

from sbert_flax.cli.args import UsageError, add_prompt_args, load_encoder, model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Spearman x100 on STS files and their mean, and retrieval "
                       "metrics on BEIR folders (C-MTEB style table)")
    model_args(p, dtype=True)
    p.add_argument("--sts", action="append", default=[],
                   help="s1<TAB>s2<TAB>score file; repeat for several")
    p.add_argument("--retrieval", action="append", default=[], metavar="DIR",
                   help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv): ndcg@10, "
                   "mrr@10, map@100, recall@1/10/100 with cosine scores; repeat for several")
    p.add_argument("--split", default="test", help="qrels split of the --retrieval folders "
                   "(default: test)")
    p.add_argument("--json", action="store_true",
                   help='print {"sts": {FILE: ...}, "retrieval": {FOLDER: ...}} instead of tables')
    p.add_argument("--batch-size", type=int, default=64)
    add_prompt_args(p, "the --retrieval queries", "the --retrieval documents (STS pairs take none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from sbert_flax.retrieval.ir_evaluation import (
        SUMMARY_METRICS,
        format_retrieval_table,
        load_beir,
        retrieval_table,
    )
    from sbert_flax.retrieval.sts import format_sts_table, read_sts, sts_table

    if not args.sts and not args.retrieval:
        raise UsageError("eval needs at least one --sts FILE or --retrieval DIR")
    for path in args.sts:
        read_sts(path)  # a missing or malformed file fails before the slow model load
    # Every folder is validated (ids, qrels) before the model loads, and nothing is printed
    # until every result is in: a bad folder leaves no partial table.
    folders = [load_beir(d, args.split) for d in args.retrieval]
    enc = load_encoder(args)
    sts_rows = sts_table(enc, args.sts, batch_size=args.batch_size) if args.sts else []
    ir_rows = retrieval_table(enc, folders, batch_size=args.batch_size,
                              query_prompt=args.query_prompt,
                              query_prompt_name=args.query_prompt_name,
                              corpus_prompt=args.corpus_prompt,
                              corpus_prompt_name=args.corpus_prompt_name)
    if args.json:
        names = [r["name"] for r in ir_rows]
        # Two folders with the same basename would collide as keys; those keep their path.
        keys = [n if names.count(n) == 1 else r["folder"] for n, r in zip(names, ir_rows, strict=True)]
        out = {"sts": {r["file"]: {"pairs": r["pairs"], "spearman": r["spearman"],
                                   "pearson": r["pearson"]} for r in sts_rows},
               "retrieval": {k: {m: float(r[m]) for m in SUMMARY_METRICS}
                             for k, r in zip(keys, ir_rows, strict=True)}}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    tables = ([format_sts_table(sts_rows)] if sts_rows else []) + \
        ([format_retrieval_table(ir_rows)] if ir_rows else [])
    print("\n\n".join(tables))
    return 0
