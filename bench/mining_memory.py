"""Benchmark: hard-negative mining streams, so peak memory does not grow with the embeddings.

`sbert-flax mine-negatives`' library path (`mining.iter_mined` -> `mining.write_tsv`, written as it
goes to a temp file renamed at the end) on N synthetic (anchor, positive) pairs, each size in a
fresh subprocess. The N anchors are unique; the positives come from a pool of `--corpus` texts, so
the corpus searched is the same at every N and the search costs N x corpus. `--corpus-chunk` below
the corpus size makes the corpus go through the scratch file, searched a chunk at a time.

The encoder is synthetic (a fixed vector per text hash, `--dim` wide): the model is not what is
measured, and a real one would spend hours embedding a million pairs on a CPU. Reports peak RSS
(ru_maxrss), RSS once the input pairs are built (what the caller holds: the texts), and what
holding every anchor embedding at once would take (N x dim x 4 bytes, what a non-streaming miner
holds before ranking, on top of every output row).

    python bench/mining_memory.py                      # 100k and 1M pairs
    python bench/mining_memory.py --sizes 20000,200000 --dim 384
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
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class HashEncoder:
    """Embeds a text as a fixed pseudo-random unit vector chosen by its crc32 (no model)."""

    def __init__(self, dim: int, table: int = 65536, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.base = rng.standard_normal((table, dim)).astype(np.float32)
        self.mix = rng.standard_normal((table, dim)).astype(np.float32)

    def encode(self, texts, normalize=True, batch_size=None, **kw) -> np.ndarray:
        h = np.fromiter((zlib.crc32(t.encode()) for t in texts), np.uint64, len(texts))
        n = len(self.base)
        emb = self.base[h % n] + 0.5 * self.mix[(h // n) % n]
        return emb / np.linalg.norm(emb, axis=1, keepdims=True) if normalize else emb

    def encode_chunks(self, texts, chunk_size=100_000, batch_size=None, **kw):
        buf, start = [], 0
        for t in texts:
            buf.append(t)
            if len(buf) == chunk_size:
                yield np.arange(start, start + len(buf)), self.encode(buf)
                start, buf = start + len(buf), []
        if buf:
            yield np.arange(start, start + len(buf)), self.encode(buf)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(n: int, corpus: int, dim: int, corpus_chunk: int, block: int) -> None:
    """Runs in the subprocess: mine N pairs into a TSV, print one JSON line of measurements."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # noqa: F401 -- imported before the baseline, as any run has it

    from sbert_flax.retrieval.mining import iter_mined, write_tsv

    base = rss_mb()
    anchors = [f"问题{i}：这是第{i}个查询" for i in range(n)]
    positives = [f"文档{i % corpus}：相关的段落{i % corpus}" for i in range(n)]
    with_input = rss_mb()
    enc = HashEncoder(dim)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mined.tsv")
        rows = write_tsv(out, iter_mined(enc, anchors, positives, num_negatives=3,
                                         range_max=20, output_format="n-tuple",
                                         anchors_per_block=block, corpus_chunk_size=corpus_chunk,
                                         scratch_dir=tmp))
        size = os.path.getsize(out)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pairs": n, "corpus": corpus, "dim": dim, "rows": rows,
                      "output_mb": round(size / 2**20, 1), "rss_base_mb": round(base),
                      "rss_with_input_mb": round(with_input), "peak_rss_mb": round(peak),
                      "all_anchor_embeddings_mb": round(n * dim * 4 / 2**20),
                      "seconds": round(secs, 1), "pairs_per_s": round(n / secs)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="pair counts, comma-separated")
    ap.add_argument("--corpus", type=int, default=20000, help="unique positives (the corpus)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--corpus-chunk", type=int, default=5000,
                    help="corpus rows per chunk (below --corpus: the scratch-file path)")
    ap.add_argument("--block", type=int, default=16384, help="anchors per block")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.corpus, args.dim, args.corpus_chunk, args.block)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--child", str(n), "--corpus", str(args.corpus),
               "--dim", str(args.dim), "--corpus-chunk", str(args.corpus_chunk),
               "--block", str(args.block)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(rec)
        print(rec, flush=True)
    print("\n| pairs | corpus | dim | output rows | peak RSS (MiB) | RSS with the input built (MiB) "
          "| all anchor embeddings would be (MiB) | pairs/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']:,} | {r['corpus']:,} | {r['dim']} | {r['rows']:,} | {r['peak_rss_mb']:,} "
              f"| {r['rss_with_input_mb']:,} | {r['all_anchor_embeddings_mb']:,} | {r['pairs_per_s']:,} |")


if __name__ == "__main__":
    main()
