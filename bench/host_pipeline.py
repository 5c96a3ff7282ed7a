"""Benchmark: can the host feed an accelerator? Host side vs the bare tokenizer vs encode.

Side by side in ONE process on the same sentences (every STS-B-zh sentence, both columns of all
splits, repeated to `--sentences`), each measure interleaved with the others in every repeat:

  (a) the host side alone: read, tokenize, pack, arrays ready (every window `encode` would
      dispatch, prepared and dropped), with 1 and 2 preparation workers;
  (b) the bare Rust tokenizer: `tokenizers.Tokenizer.encode_batch` over all the sentences at
      once, truncating at the model's length (no strip, no numpy, no packing);
  (c) `SentenceEncoder.encode` end to end with a tiny random model (default 1 layer, hidden 32:
      the host pipeline and the dispatch are what is measured), preparing windows on the
      caller's thread (host_workers=0) and on the default background thread;
  (d) the device side alone: the same packed batches, prepared beforehand, dispatched and
      copied back. On this CPU-only machine the "device" computes on the same two cores as the
      tokenizer, so (c) cannot beat 1 / (1/(a) + 1/(d)) (printed as "shared-core bound"); on an
      accelerator the two would not compete.
  (e) encode with a simulated accelerator: `_dispatch` replaced by a device queue that takes a
      fixed time per batch and no host CPU (results are zeros, ready when the queue reaches
      them; waiting sleeps, as waiting on a device does). Its time per batch is set so that the
      device alone would run at the bare tokenizer's rate (b), measured once before the repeats:
      host work run serially with the device gives ~0.5x (b), overlapped ~min((a), (b)).

Prints sentences/s of each (best of the repeats) and the ratios (a)/(b), (c)/(b) (the median
of the per-repeat ratios, so a noisy repeat moves neither side alone). Against an older checkout
that has no `sbert_flax.inference.window_stream`, (a) is the serial loop `encode` ran then (tokenize, then pack,
on the caller's thread), so the same file measures before and after:

    python bench/host_pipeline.py
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python bench/host_pipeline.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("PYTHONPATH"):  # PYTHONPATH picks the checkout under test
    sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from common import random_bert_dir, stsb_sentences  # noqa: E402


def sentences(n: int) -> list[str]:
    base = [s for split in ("train", "dev", "test") for s in stsb_sentences(split)]
    return (base * (n // len(base) + 1))[:n]


def host_side(enc, sents: list[str], workers: int) -> int:
    """Every packed batch of `encode(sents)`, arrays ready, without the device; returns batches."""
    if not hasattr(enc, "prepared_windows"):  # the serial loop of `encode` before sbert_flax.inference.window_stream
        packer = enc.packer()
        window = max(1024, 64 * packer.max_batch_tokens // 32)
        count = 0
        for _, texts in enc._windows(sents, window):
            ids = enc.tokenizer.encode(texts, enc.max_seq_length)
            count += len(packer.pack(ids, pad_id=enc.tokenizer.pad_id))
        return count
    return sum(len(w.batches) for w in enc.prepared_windows(sents, workers=workers))


class SimulatedDevice:
    """A device queue that takes `seconds` per batch and no host CPU (for measure (e))."""

    def __init__(self, dim: int, seconds: float):
        self.dim, self.seconds, self.free_at = dim, seconds, 0.0

    def dispatch(self, batch, dtype, output) -> Result:
        self.free_at = max(time.perf_counter(), self.free_at) + self.seconds
        rows, length = batch.shape
        return Result(self.free_at, (rows, max(1, length // 4), self.dim))


class Result:
    """A batch result that is ready at `ready` (perf_counter time)."""

    def __init__(self, ready: float, shape: tuple[int, ...]):
        self.ready, self.shape = ready, shape

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        time.sleep(max(0.0, self.ready - time.perf_counter()))
        return np.zeros(self.shape, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=54_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args()

    import jax

    from sbert_flax import SentenceEncoder

    model = random_bert_dir(f"bert-zh-random-{args.layers}l-{args.hidden}h", hidden_size=args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=2,
                            intermediate_size=2 * args.hidden, max_position_embeddings=128)
    enc = SentenceEncoder.from_pretrained(model, devices=jax.local_devices()[:1],
                                          max_batch_tokens=args.max_batch_tokens)
    serial = SentenceEncoder(enc.model, devices=enc.devices, max_batch_tokens=args.max_batch_tokens,
                             **({"host_workers": 0} if hasattr(enc, "host_workers") else {}))
    sents = sentences(args.sentences)
    bare = enc.tokenizer._backend(enc.max_seq_length, "right")
    new = hasattr(enc, "prepared_windows")
    print(f"{len(sents):,} sentences, budget {args.max_batch_tokens} tokens, model {args.layers} "
          f"layer(s) hidden {args.hidden}, {'sbert_flax.inference.window_stream' if new else 'old serial loop'}, "
          f"{os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    enc.encode(sents)  # compiles every shape this input uses
    print(f"warm-up encode (compiles) {time.perf_counter() - t0:.1f} s")
    packer = enc.packer()
    batches = [b for _, texts in enc._windows(sents, max(1024, 64 * packer.max_batch_tokens // 32))
               for b in packer.pack(enc.tokenizer.encode(texts, enc.max_seq_length))]

    def device_side() -> None:
        for _ in enc._run(batches, enc.dtype, "sentence"):
            pass

    t0 = time.perf_counter()
    bare.encode_batch(sents)
    per_batch = (time.perf_counter() - t0) / len(batches)  # the device alone runs at rate (b)
    print(f"{len(batches)} batches; simulated accelerator: {per_batch * 1e3:.2f} ms a batch")
    simulated = {}
    for workers in (0, 1, 2):
        sim = SentenceEncoder(enc.model, devices=enc.devices, max_batch_tokens=args.max_batch_tokens,
                              **({"host_workers": workers} if new else {}))
        sim._dispatch = SimulatedDevice(enc.dim, per_batch).dispatch
        simulated[workers] = sim

    measures = {
        "(b) bare encode_batch": lambda: bare.encode_batch(sents),
        "(a) host side, 1 worker": lambda: host_side(enc, sents, 1),
        "(a) host side, 2 workers": lambda: host_side(enc, sents, 2),
        "(d) device side alone": device_side,
        "(c) encode, host_workers=0": lambda: serial.encode(sents),
        f"(c) encode, host_workers={getattr(enc, 'host_workers', 0)} (default)": lambda: enc.encode(sents),
        "(e) simulated accelerator, host_workers=0": lambda: simulated[0].encode(sents),
        "(e) simulated accelerator, host_workers=1": lambda: simulated[1].encode(sents),
        "(e) simulated accelerator, host_workers=2": lambda: simulated[2].encode(sents),
    }
    rates: dict[str, list[float]] = {k: [] for k in measures}
    for r in range(args.repeats):
        for name, fn in measures.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(len(sents) / (time.perf_counter() - t0))
        print(f"repeat {r + 1}: " + "; ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()),
              flush=True)
    b = rates["(b) bare encode_batch"]
    print("\n| measure | sentences/s (best) | ratio to (b) (median of repeats) |\n|---|---|---|")
    for name, v in rates.items():
        ratio = statistics.median(x / y for x, y in zip(v, b, strict=True))
        print(f"| {name} | {max(v):,.0f} | {ratio:.2f} |")
    bound = [1 / (1 / max(a1, a2) + 1 / d) / x for a1, a2, d, x in zip(
        rates["(a) host side, 1 worker"], rates["(a) host side, 2 workers"],
        rates["(d) device side alone"], b, strict=True)]
    print(f"| shared-core bound on (c), 1/(1/(a) + 1/(d)) | | {statistics.median(bound):.2f} |")


if __name__ == "__main__":
    main()
