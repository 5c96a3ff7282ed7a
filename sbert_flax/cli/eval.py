"""`sbert-flax eval`: STS files and BEIR retrieval folders in one table (C-MTEB style)."""

from __future__ import annotations

import argparse

from sbert_flax.cli.args import (
    UsageError,
    add_db_args,
    add_prompt_args,
    load_encoder,
    model_args,
)


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
    g = p.add_argument_group("reranking (a cross-encoder over the --retrieval candidates)")
    g.add_argument("--rerank-model", metavar="R",
                   help="cross-encoder (sentence-transformers CrossEncoder / HF "
                   "BertForSequenceClassification folder, hub id, or a `train --loss ce-*` "
                   "run's best_model): rerank each query's --rerank-top-k candidates and report "
                   "mrr@10, ndcg@10 and map before and after, as sentence-transformers' "
                   "CrossEncoderRerankingEvaluator")
    g.add_argument("--rerank-top-k", type=int, default=100, metavar="K",
                   help="candidates retrieved per query and reranked (default: 100)")
    add_prompt_args(p, "the --retrieval queries", "the --retrieval documents (STS pairs take none)")
    add_db_args(p, collection_help="with --uri and one --retrieval folder: its collection "
                "(default: the folder's name, e.g. t2ranking_dev)")
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
    if args.rerank_model and (not args.retrieval or args.uri is not None):
        raise UsageError("--rerank-model reranks the exact search's candidates of --retrieval "
                         "folders (not with --uri)")
    if args.rerank_top_k < 1:
        raise UsageError(f"--rerank-top-k {args.rerank_top_k} must be >= 1")
    if args.collection is not None and (args.uri is None or len(args.retrieval) != 1):
        raise UsageError("--collection needs --uri and exactly one --retrieval folder (several "
                         "folders each go to a collection named after the folder)")
    for path in args.sts:
        read_sts(path)  # a missing or malformed file fails before the slow model load
    # Every folder is validated (ids, qrels) before the model loads, and nothing is printed
    # until every result is in: a bad folder leaves no partial table.
    folders = [load_beir(d, args.split) for d in args.retrieval]
    enc = load_encoder(args)
    sts_rows = sts_table(enc, args.sts, batch_size=args.batch_size) if args.sts else []
    prompts = {"query_prompt": args.query_prompt, "query_prompt_name": args.query_prompt_name,
               "corpus_prompt": args.corpus_prompt, "corpus_prompt_name": args.corpus_prompt_name}
    if args.uri is not None and folders:
        # The corpora are uploaded (or found already there) and searched in the database.
        from sbert_flax.retrieval.vectorstore_eval import retrieval_table_db

        ir_rows = retrieval_table_db(enc, folders, args.uri, [args.collection] * len(folders),
                                     batch_size=args.batch_size, token=args.db_token, **prompts)
    else:
        ir_rows = retrieval_table(enc, folders, batch_size=args.batch_size, **prompts)
    rerank_rows = _rerank_rows(args, enc, folders, prompts) if args.rerank_model else []
    if args.json:
        names = [r["name"] for r in ir_rows]
        # Two folders with the same basename would collide as keys; those keep their path.
        keys = [n if names.count(n) == 1 else r["folder"] for n, r in zip(names, ir_rows, strict=True)]
        out = {"sts": {r["file"]: {"pairs": r["pairs"], "spearman": r["spearman"],
                                   "pearson": r["pearson"]} for r in sts_rows},
               "retrieval": {k: {m: float(r[m]) for m in SUMMARY_METRICS}
                             for k, r in zip(keys, ir_rows, strict=True)}}
        if rerank_rows:
            out["rerank"] = {k: {m: float(v) for m, v in r.items() if m not in ("name", "folder")}
                             for k, r in zip(keys, rerank_rows, strict=True)}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    tables = ([format_sts_table(sts_rows)] if sts_rows else []) + \
        ([format_retrieval_table(ir_rows)] if ir_rows else [])
    if rerank_rows:
        from sbert_flax.retrieval.rerank_evaluation import format_rerank_table

        tables.append(format_rerank_table(rerank_rows))
    print("\n\n".join(tables))
    return 0


def _rerank_rows(args: argparse.Namespace, enc, folders, prompts) -> list[dict]:
    """Per folder: the bi-encoder's top --rerank-top-k reranked by --rerank-model."""
    from sbert_flax.inference.cross_encoder import CrossEncoder
    from sbert_flax.retrieval.rerank_evaluation import evaluate_reranking

    ce = CrossEncoder(args.rerank_model, dtype=args.dtype)
    return [{"name": f.name, "folder": f.path,
             **evaluate_reranking(enc, ce, f, rerank_top_k=args.rerank_top_k,
                                  batch_size=args.batch_size, rerank_batch_size=args.batch_size,
                                  **prompts)}
            for f in folders]
