"""Benchmark: on-disk vector indexes (faiss flat / HNSW / IVF-PQ, each precision) beside the exact
JAX search (`retrieval.search.semantic_search`), side by side in one run.

Two corpora:
- synthetic: N x 512 L2-normalised Gaussian rows (written in blocks to a `.npy`), 1,000 Gaussian
  queries: build time, peak RSS, bytes per vector, queries/s. Its recall is the worst case (in
  512 random dimensions every point is almost equally far from a query), shown for completeness.
- real: the unique STS-B-zh sentences (all splits) encoded by m3e-small, 1,000 of them held out
  as queries: recall@10 against the exact search, without and with rescoring (4 x top-k
  candidates re-scored from the float rows on disk). The embeddings are cached beside the
  reference models (`bench-index-stsb-m3e-small.npy`), so only the first run encodes.

Each build and each search runs in a fresh subprocess, so its peak RSS (VmHWM) is its own; "base"
is the RSS after the imports. Queries are searched as one batch (faiss' OpenMP threads, XLA's
thread pool); the exact search is timed on its second run (the first compiles). Results go to
bench/results/index-DATE.{json,md}.

    python bench/index.py                  # N = 1,000,000
    python bench/index.py --n 200000       # what fits in 10 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

CONFIGS = ([("flat", p) for p in ("float32", "float16", "int8", "binary")]
           + [("hnsw", p) for p in ("float32", "float16", "int8", "binary")]
           + [("ivf-pq", "float32")])
K = 10


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_synthetic(path: str, n: int, dim: int, seed: int, block: int = 65536) -> None:
    """N x dim normalised Gaussian float32 rows as a `.npy`, written a block at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (n, dim)})
        for s in range(0, n, block):
            x = rng.standard_normal((min(block, n - s), dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.tobytes())


def real_embeddings(folder: str, n_queries: int, seed: int) -> tuple[str, str, int]:
    """(corpus .npy, queries .npy, sentences): unique STS-B-zh sentences by m3e-small, cached."""
    import numpy as np
    from common import stsb_sentences

    from sbert_flax.common.devdata import model_cache_dir, reference_model

    cache = os.path.join(model_cache_dir(), "bench-index-stsb-m3e-small.npy")
    sents = list(dict.fromkeys(s for split in ("train", "dev", "test")
                               for s in stsb_sentences(split)))
    if not (os.path.isfile(cache) and np.load(cache, mmap_mode="r").shape[0] == len(sents)):
        from sbert_flax import SentenceEncoder
        from sbert_flax.inference.embeddings_file import save_embeddings

        t = time.perf_counter()
        enc = SentenceEncoder.from_pretrained(reference_model("m3e-small"))
        save_embeddings(cache, enc.encode(sents, batch_size=64))
        print(f"encoded {len(sents):,} sentences in {time.perf_counter() - t:.0f} s -> {cache}",
              flush=True)
    e = np.load(cache)
    held = np.zeros(len(e), bool)
    held[np.random.default_rng(seed).choice(len(e), n_queries, replace=False)] = True
    corpus, queries = os.path.join(folder, "real.npy"), os.path.join(folder, "real-q.npy")
    np.save(corpus, e[~held])
    np.save(queries, e[held])
    return corpus, queries, len(sents)


# ---- the subprocesses ----------------------------------------------------------------------------

def child_exact(corpus: str, queries: str, ids_out: str) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from sbert_flax.inference.embeddings_file import load_embeddings
    from sbert_flax.retrieval.search import semantic_search

    base = rss_mb()
    c, q = load_embeddings(corpus), np.load(queries)
    semantic_search(q, c, top_k=K)  # compiles
    t = time.perf_counter()
    hits = semantic_search(q, c, top_k=K)
    secs = time.perf_counter() - t
    np.save(ids_out, np.array([[h["corpus_id"] for h in r] for r in hits]))
    return {"base_rss_mb": base, "qps": len(q) / secs, "peak_rss_mb": peak_rss_mb()}


def child_build(corpus: str, folder: str, kind: str, precision: str) -> dict:
    from sbert_flax.retrieval.vector_index import IndexConfig, build_index

    base = rss_mb()
    info = build_index(corpus, folder, config=IndexConfig(kind=kind, precision=precision))
    return {"base_rss_mb": base, "build_s": info["build_seconds"],
            "bytes_per_vector": info["bytes_per_vector"], "bytes": info["bytes"],
            "params": info["params"], "peak_rss_mb": peak_rss_mb()}


def recall(found: list[list[int]], exact) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found, exact.tolist(), strict=True)) / exact.size


def child_search(folder: str, queries: str, exact_ids: str, rescore: bool) -> dict:
    import numpy as np

    from sbert_flax.retrieval.vector_index import open_index

    base = rss_mb()
    index, q, exact = open_index(folder), np.load(queries), np.load(exact_ids)
    index.search(q[:10], top_k=K, rescore=rescore)
    t = time.perf_counter()
    hits = index.search(q, top_k=K, rescore=rescore)
    secs = time.perf_counter() - t
    return {"base_rss_mb": base, "qps": len(q) / secs, "peak_rss_mb": peak_rss_mb(),
            f"recall{'_rescored' if rescore else ''}":
                recall([[h["corpus_id"] for h in r] for r in hits], exact)}


def run_child(*argv: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"child {argv} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the parent ----------------------------------------------------------------------------------

def measure(corpus: str, queries: str, tmp: str, tag: str) -> list[dict]:
    """The exact search and every index config on one corpus: one row each."""
    ids = os.path.join(tmp, f"{tag}-exact-ids.npy")
    ex = run_child("exact", corpus, queries, ids)
    rows = [{"corpus": tag, "method": "exact (JAX)", "kind": "-", "precision": "float32",
             "build_s": None, "build_peak_rss_mb": None, "bytes_per_vector": None,
             "search_peak_rss_mb": ex["peak_rss_mb"], "search_base_rss_mb": ex["base_rss_mb"],
             "qps": ex["qps"], "recall": 1.0, "recall_rescored": None}]
    print(rows[-1], flush=True)
    for kind, precision in CONFIGS:
        folder = os.path.join(tmp, f"{tag}-{kind}-{precision}")
        b = run_child("build", corpus, folder, kind, precision)
        s = run_child("search", folder, queries, ids, "0")
        # Rescoring on the real corpus only: its recall is what matters, and its cost per query
        # (4 x top-k rows read by id) does not grow with the corpus.
        r = run_child("search", folder, queries, ids, "1") if tag == "real" and (
            kind == "ivf-pq" or precision != "float32") else {}
        rows.append({"corpus": tag, "method": "faiss index", "kind": kind,
                     "precision": precision, "build_s": b["build_s"],
                     "build_peak_rss_mb": b["peak_rss_mb"],
                     "build_base_rss_mb": b["base_rss_mb"],
                     "bytes_per_vector": b["bytes_per_vector"], "params": b["params"],
                     "search_peak_rss_mb": s["peak_rss_mb"],
                     "search_base_rss_mb": s["base_rss_mb"], "qps": s["qps"],
                     "qps_rescored": r.get("qps"), "recall": s["recall"],
                     "recall_rescored": r.get("recall_rescored")})
        print(rows[-1], flush=True)
    return rows


def fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"# Vector indexes vs exact search ({meta['date']})", "",
           f"`{meta['command']}` at {meta['commit']}; {meta['machine']}.", "",
           f"synthetic: {meta['n']:,} x {meta['dim']} normalised Gaussian rows, {meta['queries']:,} "
           f"queries; real: {meta['real_corpus']:,} STS-B-zh sentences by m3e-small, "
           f"{meta['queries']:,} held out as queries. Recall@{K} against the exact search; "
           "rescored: 4 x top-k candidates re-scored from the float rows on disk.", "",
           "| corpus | method | kind | precision | build s | build peak RSS MiB | bytes/vector "
           "| search peak RSS MiB | queries/s | recall@10 | rescored recall@10 "
           "| rescored queries/s |", "|" + "---|" * 12]
    for r in rows:
        out.append(f"| {r['corpus']} | {r['method']} | {r['kind']} | {r['precision']} "
                   f"| {fmt(r['build_s'], ',.1f')} | {fmt(r['build_peak_rss_mb'])} "
                   f"| {fmt(r['bytes_per_vector'], ',.1f')} | {fmt(r['search_peak_rss_mb'])} "
                   f"| {fmt(r['qps'])} | {fmt(r['recall'], '.3f')} "
                   f"| {fmt(r['recall_rescored'], '.3f')} | {fmt(r.get('qps_rescored'))} |")
    return "\n".join(out) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), load average at start "
            f"{os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic corpus rows")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--no-real", action="store_true", help="skip the STS-B-zh recall corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results JSON (default bench/results/index-DATE.json; the "
                    "markdown beside it)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        fn = {"exact": child_exact, "build": child_build, "search": child_search}[mode]
        if mode == "search":
            rest[-1] = rest[-1] == "1"
        print(json.dumps(fn(*rest)))
        return

    import faiss
    import numpy as np

    from sbert_flax.common.files import atomic_write, write_json

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"index-{date}.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    meta = {"date": date, "command": "python bench/index.py " + " ".join(sys.argv[1:]),
            "commit": commit, "machine": machine(), "n": args.n, "dim": args.dim,
            "queries": args.queries, "faiss": faiss.__version__, "numpy": np.__version__}
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        corpus, queries = os.path.join(tmp, "synthetic.npy"), os.path.join(tmp, "synthetic-q.npy")
        write_synthetic(corpus, args.n, args.dim, args.seed)
        q = np.random.default_rng(args.seed + 1).standard_normal((args.queries, args.dim),
                                                                  dtype=np.float32)
        np.save(queries, q / np.linalg.norm(q, axis=1, keepdims=True))
        rows += measure(corpus, queries, tmp, "synthetic")
        if not args.no_real:
            corpus, queries, n_sents = real_embeddings(tmp, args.queries, args.seed)
            meta["real_corpus"] = n_sents - args.queries
            rows += measure(corpus, queries, tmp, "real")
    meta["real_corpus"] = meta.get("real_corpus", 0)
    meta["seconds"] = round(time.perf_counter() - t0)
    write_json(out, {**meta, "rows": rows})
    with atomic_write(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
