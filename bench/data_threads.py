"""What `--data_threads` buys: training batches per second of the input pipeline alone.

Builds the `sbert-flax train --loss mnrl` pipeline (read by offset, tokenize, pack) over the
shared nli-zh pairs and iterates it with 1 and 2 grain threads, interleaved, several repeats.
`--lock` puts back the lock that serialised every tokenizer call before `Tokenizer.encode` was
made thread-safe, to compare. No device work.

    python bench/data_threads.py                       # 1 vs 2 threads, packed, 3 repeats
    python bench/data_threads.py --lock                # the same with the old tokenizer lock
    TOKENIZERS_PARALLELISM=false python bench/data_threads.py   # no rayon inside one call

Measured (2026-11-30, 2 CPU cores shared with a test run at load ~3; best of 3, batches/s of
64 packed pairs at seq 64):
  TOKENIZERS_PARALLELISM unset (the default: one encode_batch call already runs on both cores
  through the tokenizers library's rayon pool): 1 thread 451.8, 2 threads 439.0 (0.97x);
  with --lock 450.2 vs 455.2 (1.01x). Two cores are busy either way.
  TOKENIZERS_PARALLELISM=false (one core per call): 1 thread 309.7, 2 threads 507.2 (1.64x);
  with --lock 314.1 vs 341.2 (1.09x): the lock kept the second thread waiting.
  Again at load ~1.4: unset 434.4 vs 436.7 (1.01x), --lock 429.4 vs 449.6 (1.05x);
  TOKENIZERS_PARALLELISM=false 298.9 vs 479.0 (1.60x), --lock 305.0 vs 334.6 (1.10x).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class LockedTokenizer:
    """The tokenizer behind one lock, as the pipeline held it before (for comparison)."""

    def __init__(self, tok):
        self._tok, self._lock = tok, threading.Lock()
        self.pad_id = tok.pad_id

    def encode(self, *args, **kwargs):
        with self._lock:
            return self._tok.encode(*args, **kwargs)


def batches_per_second(src, tok, args, threads: int) -> tuple[float, int]:
    from sbert_flax.training import data

    pipe = data.TrainPipeline(src, tok, data.PipelineConfig(
        global_batch=args.batch_size, seq_length=args.seq_length, seed=0, epochs=args.epochs,
        pack=not args.no_pack, num_threads=threads))
    it = pipe.iterator()
    next(it)  # thread start-up and the first batch's latency are not throughput
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_pack", action="store_true", help="pad each column instead of packing")
    p.add_argument("--lock", action="store_true", help="serialise tokenization as before")
    args = p.parse_args()

    from sbert_flax.common.devdata import data_path
    from sbert_flax.models.tokenization import load_tokenizer
    from sbert_flax.training import data

    vocab = data_path("vocab", "google_zh_vocab.txt")
    pairs = data_path("contrastive", "nli-zh-pairs.tsv")
    if vocab is None or pairs is None:
        sys.exit("needs ../shared/data/vocab/google_zh_vocab.txt and contrastive/nli-zh-pairs.tsv")
    tok = load_tokenizer(vocab)
    if args.lock:
        tok = LockedTokenizer(tok)
    src = data.open_source(pairs, data.schema_for("mnrl"))
    print(f"{len(src)} pairs x {args.epochs} epochs, batch {args.batch_size}, seq {args.seq_length}, "
          f"{'padded' if args.no_pack else 'packed'}, lock={args.lock}, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}, load {os.getloadavg()[0]:.1f}")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for threads in (1, 2):
            rate, n = batches_per_second(src, tok, args, threads)
            rates[threads].append(rate)
            print(f"  repeat {r}: {threads} thread(s): {rate:7.1f} batches/s ({n} batches, "
                  f"{rate * args.batch_size:,.0f} pairs/s)")
    best = {t: max(v) for t, v in rates.items()}
    print(f"best of {args.repeats}: 1 thread {best[1]:.1f}, 2 threads {best[2]:.1f} batches/s "
          f"({best[2] / best[1]:.2f}x)")


if __name__ == "__main__":
    main()
