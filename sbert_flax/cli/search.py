"""`sbert-flax search`: the top-k corpus lines for each query line."""

from __future__ import annotations

import argparse
import sys

from sbert_flax.cli.args import (
    UsageError,
    add_db_args,
    add_prompt_args,
    load_encoder,
    model_args,
    read_lines,
)
from sbert_flax.cli.index import add_index_search_args, search_index


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="semantic search: top-k corpus lines for each query line")
    model_args(p, dtype=True)
    p.add_argument("--corpus", help="UTF-8 text, one document per line (or --index / --uri)")
    p.add_argument("--queries", required=True, help="UTF-8 text, one query per line")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--corpus-embeddings", help=".npy cache of the corpus embeddings: read when it "
                   "matches the corpus, else written")
    p.add_argument("--output", help="write results here (default stdout)")
    p.add_argument("--json", action="store_true", help="one JSON object per query")
    add_prompt_args(p, "each query", "each corpus line")
    add_db_args(p, collection_help="search this collection (see `sbert-flax upload`) instead of "
                "--corpus; same output, ids are its line numbers - 1")
    add_index_search_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sbert_flax.util import search_corpus

    if sum(s is not None for s in (args.corpus, args.uri, args.index)) != 1:
        raise UsageError("search needs one of --corpus FILE, --index DIR or --uri URI "
                         "--collection NAME")
    if args.uri is not None:
        return _run_db(args)
    if args.index is not None:
        return _write_hits(args, *search_index(args))
    corpus, queries = read_lines(args.corpus), read_lines(args.queries)
    enc = load_encoder(args)
    hits = search_corpus(enc, corpus, queries, top_k=args.top_k,
                         corpus_embeddings_path=args.corpus_embeddings,
                         batch_size=args.batch_size, query_prompt=args.query_prompt,
                         query_prompt_name=args.query_prompt_name,
                         corpus_prompt=args.corpus_prompt,
                         corpus_prompt_name=args.corpus_prompt_name)
    return _write_hits(args, queries, [[{**h, "text": corpus[h["corpus_id"]]} for h in qh]
                                       for qh in hits])


def _run_db(args: argparse.Namespace) -> int:
    """`search --uri`: the hits come from the database, with the texts it stores."""
    from sbert_flax.retrieval.vectorstore import search

    if args.collection is None:
        raise UsageError("--uri needs --collection NAME")
    given = [f for f in ("corpus_embeddings", "corpus_prompt", "corpus_prompt_name")
             if getattr(args, f) is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} applies to --corpus; with --uri the "
                         "documents were encoded by `sbert-flax upload`")
    queries = read_lines(args.queries)
    enc = load_encoder(args)
    hits = search(enc, queries, args.uri, args.collection, top_k=args.top_k,
                  token=args.db_token, prompt=args.query_prompt,
                  prompt_name=args.query_prompt_name, batch_size=args.batch_size)
    return _write_hits(args, queries, hits)


def _write_hits(args: argparse.Namespace, queries: list[str], hits: list[list[dict]]) -> int:
    """The results, as text or --json, to --output or stdout; each hit has a "text"."""
    import json

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for q, qh in zip(queries, hits, strict=True):
            if args.json:
                out.write(json.dumps({"query": q, "hits": qh}, ensure_ascii=False) + "\n")
            else:
                out.write(f"{q}\n")
                for h in qh:
                    out.write(f"  {h['score']:.4f}\t{h['corpus_id']}\t{h['text']}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
