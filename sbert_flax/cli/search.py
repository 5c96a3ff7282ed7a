"""`sbert-flax search`: the top-k corpus lines for each query line."""

from __future__ import annotations

import argparse
import sys

from sbert_flax.cli.args import add_prompt_args, load_encoder, model_args, read_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="semantic search: top-k corpus lines for each query line")
    model_args(p, dtype=True)
    p.add_argument("--corpus", required=True, help="UTF-8 text, one document per line")
    p.add_argument("--queries", required=True, help="UTF-8 text, one query per line")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--corpus-embeddings", help=".npy cache of the corpus embeddings: read when it "
                   "matches the corpus, else written")
    p.add_argument("--output", help="write results here (default stdout)")
    p.add_argument("--json", action="store_true", help="one JSON object per query")
    add_prompt_args(p, "each query", "each corpus line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from sbert_flax.util import search_corpus

    corpus, queries = read_lines(args.corpus), read_lines(args.queries)
    enc = load_encoder(args)
    hits = search_corpus(enc, corpus, queries, top_k=args.top_k,
                         corpus_embeddings_path=args.corpus_embeddings,
                         batch_size=args.batch_size, query_prompt=args.query_prompt,
                         query_prompt_name=args.query_prompt_name,
                         corpus_prompt=args.corpus_prompt,
                         corpus_prompt_name=args.corpus_prompt_name)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for q, qh in zip(queries, hits, strict=True):
            if args.json:
                rec = {"query": q, "hits": [{**h, "text": corpus[h["corpus_id"]]} for h in qh]}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                out.write(f"{q}\n")
                for h in qh:
                    out.write(f"  {h['score']:.4f}\t{h['corpus_id']}\t{corpus[h['corpus_id']]}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
