"""Resident memory of the training input pipeline over a large pairs file: flat, not O(lines).

Generates an anchor/positive TSV of `--lines` lines in /tmp (random Chinese sentences from the
BERT vocab), indexes it (`sources.open_source`: one validating pass, byte offsets kept), then
iterates the grain pipeline (read by offset, tokenize, pad) over every batch, printing the
process RSS after indexing, after 10k lines, and at the end. No device work: this is the host
side of `sbert-flax train --loss mnrl` alone.

    python bench/pipeline_rss.py                 # 2M lines (~200 MB file)
    python bench/pipeline_rss.py --lines 200000  # quicker

Measured (2026-11-28, 2 shared CPU cores at load ~8, run under `nice -n 19`): 2,000,000 lines
(198 MB): RSS 458 MB after imports + tokenizer, 491 MB after indexing (263 s; the index is 16
bytes a line), 530 MB after 10,048 lines, 530 MB after all 2,000,000 (+0 MB); 1,192 pairs/s
through read + tokenize + pad on that starved machine (tokenization is ~75% of it). 200,000
lines: 465 -> 471 -> 471 MB, 2,735 pairs/s.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generate(path: str, lines: int, vocab: str, seed: int = 0) -> None:
    with open(vocab, encoding="utf-8") as f:
        chars = [t for t in (x.strip() for x in f) if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("anchor\tpositive\n")
        for _ in range(lines):
            a = "".join(rng.choices(chars, k=rng.randint(4, 30)))
            b = "".join(rng.choices(chars, k=rng.randint(4, 30)))
            f.write(f"{a}\t{b}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=2_000_000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--path", default="/tmp/sbert_flax_pipeline_rss_pairs.tsv")
    args = p.parse_args()

    from sbert_flax.common.devdata import data_path
    from sbert_flax.models.tokenization import load_tokenizer
    from sbert_flax.training import data

    vocab = data_path("vocab", "google_zh_vocab.txt")
    if vocab is None:
        sys.exit("needs ../shared/data/vocab/google_zh_vocab.txt")
    if not os.path.isfile(args.path) or sum(1 for _ in open(args.path, "rb")) != args.lines + 1:
        t = time.perf_counter()
        generate(args.path, args.lines, vocab)
        print(f"generated {args.lines:,} lines ({os.path.getsize(args.path) / 2**20:.0f} MB) in "
              f"{time.perf_counter() - t:.0f}s")
    tok = load_tokenizer(vocab)
    print(f"RSS baseline (imports + tokenizer): {rss_mb():.0f} MB")
    t = time.perf_counter()
    src = data.open_source(args.path, data.schema_for("mnrl"))
    print(f"indexed {len(src):,} records in {time.perf_counter() - t:.1f}s; RSS {rss_mb():.0f} MB "
          f"(file {os.path.getsize(args.path) / 2**20:.0f} MB)")
    pipe = data.TrainPipeline(src, tok, data.PipelineConfig(
        global_batch=args.batch_size, seq_length=args.seq_length, seed=0, epochs=1,
        num_threads=args.threads))
    t = time.perf_counter()
    seen, at_10k, peak = 0, None, 0.0
    for b in pipe.iterator():
        seen += int(b["weights"].sum())
        if at_10k is None and seen >= 10_000:
            at_10k = rss_mb()
            print(f"RSS after {seen:,} lines: {at_10k:.0f} MB")
        if seen % (args.batch_size * 2000) < args.batch_size:
            peak = max(peak, rss_mb())
    end = rss_mb()
    dt = time.perf_counter() - t
    print(f"RSS after {seen:,} lines: {end:.0f} MB (peak sampled {max(peak, end):.0f} MB); "
          f"growth 10k -> {seen:,}: {end - (at_10k or end):+.0f} MB; "
          f"{seen / dt:,.0f} pairs/s through read + tokenize + pad ({args.threads} threads)")


if __name__ == "__main__":
    main()
