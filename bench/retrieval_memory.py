"""Benchmark: retrieval evaluation on a BEIR folder is flat in the corpus size.

`retrieval.evaluate_retrieval` (what `sbert-flax eval --retrieval` and `train --ir-dev` run) on a
synthetic BEIR folder of N documents and `--queries` queries (one relevant document each), each size
in a fresh subprocess. The corpus is read once to check ids, then embedded 100,000 documents at a
time and ranked into a running top-100 per query; memory holds the ids and the queries, never the
corpus texts or its embeddings. Reports peak RSS (ru_maxrss), the RSS before the evaluation, and
what the corpus embeddings would take held whole (N x dim x 4 bytes).

The encoder is synthetic (`mining_memory.HashEncoder`: a fixed vector per text hash): the model is
not what is measured, and a real one would spend hours embedding a million documents on a CPU.

    python bench/retrieval_memory.py                    # 100k and 1M documents
    python bench/retrieval_memory.py --sizes 10000,100000 --dim 768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from mining_memory import HashEncoder, rss_mb  # noqa: E402


def write_folder(root: str, n_docs: int, n_queries: int) -> str:
    """A BEIR folder: documents d0..d{N-1}; query q{i} is relevant to document d{i * N // Q}."""
    os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
    with open(os.path.join(root, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n_docs):
            f.write(json.dumps({"_id": f"d{i}", "title": "" if i % 5 else f"标题{i}",
                                "text": f"第{i}篇文档的正文，关于主题{i % 997}"},
                               ensure_ascii=False) + "\n")
    with open(os.path.join(root, "queries.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n_queries):
            f.write(json.dumps({"_id": f"q{i}", "text": f"查询{i}"}, ensure_ascii=False) + "\n")
    with open(os.path.join(root, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_queries):
            f.write(f"q{i}\td{i * n_docs // n_queries}\t1\n")
    return root


def child(folder: str, dim: int) -> None:
    """Runs in the subprocess: evaluate the folder, print one JSON line of measurements."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # noqa: F401 -- imported before the baseline, as any run has it

    from sbert_flax.retrieval.ir_evaluation import evaluate_retrieval

    enc = HashEncoder(dim)
    base = rss_mb()
    t0 = time.perf_counter()
    m = evaluate_retrieval(enc, folder)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"docs": m["corpus"], "queries": m["queries"], "dim": dim,
                      "rss_base_mb": round(base), "peak_rss_mb": round(peak),
                      "all_corpus_embeddings_mb": round(m["corpus"] * dim * 4 / 2**20),
                      "seconds": round(secs, 1), "docs_per_s": round(m["corpus"] / secs),
                      "ndcg@10": round(m["ndcg@10"], 4)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="document counts, comma-separated")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "DIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            folder = write_folder(os.path.join(tmp, f"beir-{n}"), n, args.queries)
            out = subprocess.run([sys.executable, __file__, "--child", folder, str(args.dim)],
                                 check=True, capture_output=True, text=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(rec)
            print(rec, flush=True)
    print("\n| documents | queries | dim | peak RSS (MiB) | RSS before evaluating (MiB) "
          "| corpus embeddings held whole would be (MiB) | documents/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['docs']:,} | {r['queries']:,} | {r['dim']} | {r['peak_rss_mb']:,} "
              f"| {r['rss_base_mb']:,} | {r['all_corpus_embeddings_mb']:,} | {r['docs_per_s']:,} |")


if __name__ == "__main__":
    main()
