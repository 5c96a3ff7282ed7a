"""`sbert-flax upload`: a corpus into a vector database (Milvus Lite file or Milvus server)."""

from __future__ import annotations

import argparse

from sbert_flax.cli.args import add_db_args, load_encoder, model_args, read_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upload", help="embed a corpus into a vector database (Milvus Lite file "
                       "or server); a re-run resumes and skips what is there",
                       description="Embeds each line of --input and upserts it as id = line "
                       "number - 1 into --collection, which records the model. A re-run after an "
                       "interruption encodes only the rows that are missing.")
    model_args(p, dtype=True)
    add_db_args(p, required=True, collection_help="the collection (created on first upload)")
    p.add_argument("--input", required=True, help="UTF-8 text, one document per line")
    p.add_argument("--embeddings", help="upload these rows instead of encoding: what `sbert-flax "
                   "encode --output` wrote (a .npy, or the path of its sharded manifest); one row "
                   "per --input line")
    p.add_argument("--batch-size", type=int, default=512,
                   help="rows per existence check and upsert (default: 512)")
    p.add_argument("--encode-batch-size", type=int, help="encode's batch size (default: the "
                   "model's token budget)")
    p.add_argument("--prompt", help="text prepended to each document (with --embeddings: the "
                   "prompt they were encoded with, recorded only)")
    p.add_argument("--prompt-name", help="a named prompt of the model (default: its 'document' "
                   "prompt, as sentence-transformers' encode_document)")
    p.add_argument("--index-type", default="FLAT", help="vector index of a new collection: FLAT "
                   "(exact, the default), HNSW, IVF_FLAT, AUTOINDEX, ... (cosine metric)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sbert_flax.retrieval.vectorstore import TEXT_MAX_BYTES, upload

    texts = read_lines(args.input)  # a missing file fails before the slow model load
    enc = load_encoder(args)
    s = upload(enc, texts, args.uri, args.collection, token=args.db_token,
               batch_size=args.batch_size, prompt=args.prompt, prompt_name=args.prompt_name,
               embeddings=args.embeddings, progress=not args.no_progress,
               encode_batch_size=args.encode_batch_size, index_type=args.index_type)
    print(f"{args.collection!r} at {args.uri}: {s.rows} texts, {s.written} written "
          f"({s.encoded} encoded), {s.skipped} already there"
          + (f", {s.truncated} stored cut to {TEXT_MAX_BYTES} bytes" if s.truncated else ""))
    return 0
