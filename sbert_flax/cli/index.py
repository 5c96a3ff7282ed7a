"""`sbert-flax index build`: an on-disk vector index from `encode`'s output; and the `--index`
options of `sbert-flax search` (`add_index_search_args`, `search_index`)."""

from __future__ import annotations

import argparse

from sbert_flax.cli.args import UsageError, load_encoder, read_lines

# Kept here (not imported from retrieval.vector_index) so that --help imports no faiss or numpy
# beyond what the parser needs; tests/retrieval/test_vector_index.py checks they agree.
KINDS = ("flat", "hnsw", "ivf-pq")
PRECISIONS = ("float32", "float16", "int8", "binary")
METRICS = ("cos", "dot")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="on-disk vector index (faiss) of encoded embeddings, for "
                       "`search --index`")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = actions.add_parser("build", help="build an index folder from `encode --output` (a .npy, "
                           "or the shards + manifest of a multi-process encode), streamed")
    b.add_argument("--embeddings", required=True,
                   help="encode's output: OUT.npy, or OUT.npy.manifest.json (float rows)")
    b.add_argument("--texts", help="the corpus text file that was encoded (one line per row): "
                   "lets `search --index` print the texts")
    b.add_argument("--index", required=True, help="the index folder to write")
    b.add_argument("--kind", choices=KINDS, default="flat",
                   help="flat: exact; hnsw: graph; ivf-pq: clustered, product-quantized "
                   "(default: flat)")
    b.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="stored vectors: float32, float16, int8 (scalar quantizer) or binary "
                   "(sign bits, Hamming); ivf-pq takes float32 (default: float32)")
    b.add_argument("--metric", choices=METRICS, default="cos",
                   help="cos: cosine (rows normalised); dot: inner product (default: cos)")
    b.add_argument("--hnsw-m", type=int, default=16, help="hnsw: neighbours per node")
    b.add_argument("--ef-construction", type=int, default=40, help="hnsw: build candidate list")
    b.add_argument("--ef-search", type=int, default=64,
                   help="hnsw: default search candidate list")
    b.add_argument("--nlist", type=int, help="ivf-pq: cells (default: 4 * sqrt(rows))")
    b.add_argument("--pq-m", type=int, help="ivf-pq: bytes per vector (default: dim / 8)")
    b.add_argument("--nprobe", type=int, default=16, help="ivf-pq: default cells per query")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    b.add_argument("--json", action="store_true", help="print the index.json record")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action != "build":  # argparse's choices make this unreachable; keeps run() total
        raise UsageError(f"unknown index action {args.action!r}")
    import json

    from sbert_flax.retrieval.vector_index import IndexConfig, build_index

    cfg = IndexConfig(kind=args.kind, precision=args.precision, metric=args.metric,
                      hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                      ef_search=args.ef_search, nlist=args.nlist, pq_m=args.pq_m,
                      nprobe=args.nprobe)
    info = build_index(args.embeddings, args.index, args.texts, cfg, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
    else:
        print(f"built {info['kind']} index ({info['precision']}, {info['metric']}) of "
              f"{info['count']} x {info['dim']} in {info['build_seconds']:.2f} s: "
              f"{info['bytes']:,} bytes ({info['bytes_per_vector']:.1f} bytes/vector) -> "
              f"{args.index}")
    return 0


def add_index_search_args(p: argparse.ArgumentParser) -> None:
    """`search --index DIR` and its knobs."""
    g = p.add_argument_group("vector index (`sbert-flax index build`; the index extra)")
    g.add_argument("--index", help="search this index folder instead of --corpus; same output, "
                   "ids are the encoded corpus' line numbers - 1")
    g.add_argument("--ef-search", type=int, help="hnsw: search candidate list (default: the "
                   "index's)")
    g.add_argument("--nprobe", type=int, help="ivf-pq: cells per query (default: the index's)")
    g.add_argument("--rescore", action="store_true",
                   help="re-score 4 x top-k candidates exactly from the float embeddings the "
                   "index was built from (they must still exist)")


def search_index(args: argparse.Namespace) -> tuple[list[str], list[list[dict]]]:
    """`search --index`: (queries, hits with their "text"), queries encoded as `--corpus` does."""
    from sbert_flax.common.arraylike import as_matrix
    from sbert_flax.models.prompts import side_prompt_kwargs
    from sbert_flax.retrieval.vector_index import open_index

    given = [f for f in ("corpus_embeddings", "corpus_prompt", "corpus_prompt_name")
             if getattr(args, f) is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} applies to --corpus; with --index the "
                         "documents were encoded by `sbert-flax encode`")
    index = open_index(args.index)  # a bad folder or changed texts fail before the model loads
    texts = index.texts()
    queries = read_lines(args.queries)
    enc = load_encoder(args)
    q = as_matrix(enc.encode(queries, batch_size=args.batch_size, **side_prompt_kwargs(
        enc, "query", args.query_prompt, args.query_prompt_name)), "query embeddings")
    hits = index.search(q, top_k=args.top_k, ef_search=args.ef_search, nprobe=args.nprobe,
                        rescore=args.rescore)
    return queries, [[{**h, "text": texts[h["corpus_id"]]} for h in qh] for qh in hits]
