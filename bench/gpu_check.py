"""GPU check for issues 6 and 8, sized for a short lease on one GPU: one run, one table each.

  encode   sbert-flax (fp32, bf16; packed batches under a token budget) vs sentence-transformers
           (fp32, fp16, bf16; 64 / 256 sentences a batch) on the same GPU, BERT-base-sized random
           Chinese model, STS-B-zh test sentences repeated `--repeat` times. Sentences/s is the
           best of `--passes` timed passes after one warm-up pass (which compiles). Parity: the
           minimum cosine of each side's embeddings of the 2,722 distinct sentences against
           sentence-transformers fp32 with TF32 off.
  train-st sentence-transformers' MNRL loop (bench/st_contrastive.py) on the GPU: texts/s over
           steps 11..N, like the CPU benchmark's window. The sbert-flax side is the CLI, run by
           the caller (bench/gpu_check.sh), whose metrics.jsonl holds sentences/s and MFU.

    python bench/gpu_check.py encode --repeat 8
    python bench/gpu_check.py train-st --batch-size 64 --steps 60 --autocast bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bert_base_dir, stsb_sentences  # noqa: E402


def _min_cos(a, b) -> float:
    from sbert_flax.evaluation import pair_cosines

    return float(pair_cosines(a, b).min())


def _best_rate(fn, n: int, passes: int) -> tuple[float, float, object]:
    """(best sentences/s over `passes` after a warm-up, warm-up seconds, warm-up output)."""
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best, warm, out


def encode(args) -> None:
    import jax
    import torch
    from sentence_transformers import SentenceTransformer

    from sbert_flax import SentenceEncoder

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_dir = args.model or bert_base_dir()
    distinct = stsb_sentences("test")
    sents = distinct * args.repeat
    n = len(distinct)
    print(f"model {model_dir}; {len(sents)} sentences; torch {torch.__version__} "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda'}; jax {jax.__version__} "
          f"{jax.devices()}", flush=True)
    rows: list[tuple[str, float, float, float, str]] = []

    ref = None
    for dtype, batch in (("float32", 64), ("float32", 256), ("float16", 64), ("float16", 256), ("bfloat16", 256)):
        st = SentenceTransformer(model_dir, device=args.device)
        if dtype != "float32":
            st = st.to(getattr(torch, dtype))

        def run(st=st, batch=batch):
            with torch.inference_mode():
                return st.encode(sents, batch_size=batch, convert_to_numpy=True)

        sps, warm, out = _best_rate(run, len(sents), args.passes)
        if ref is None:
            ref = out[:n]
        rows.append((f"sentence-transformers {dtype}, batch {batch}", sps, warm, _min_cos(out[:n], ref), ""))
        print(rows[-1], flush=True)
        del st
        torch.cuda.empty_cache()

    for dtype, tokens in (("float32", 4096), ("float32", 16384), ("bfloat16", 4096), ("bfloat16", 16384),
                          ("bfloat16", 65536)):
        enc = SentenceEncoder.from_pretrained(model_dir, dtype=dtype, devices=jax.local_devices()[:1],
                                              max_batch_tokens=tokens)
        sps, warm, out = _best_rate(lambda enc=enc: enc.encode(sents), len(sents), args.passes)
        s = enc.last_stats
        rows.append((f"sbert-flax {dtype}, {tokens} tokens a batch", sps, warm, _min_cos(out[:n], ref),
                     f"padding {s.padding_waste:.1%}, {enc.num_compiles} compiles"))
        print(rows[-1], flush=True)
    with jax.default_matmul_precision("highest"):
        enc = SentenceEncoder.from_pretrained(model_dir, dtype="float32", devices=jax.local_devices()[:1])
        out = enc.encode(distinct)
    rows.append(("sbert-flax float32, matmul precision highest (parity only)", float("nan"), float("nan"),
                 _min_cos(out, ref), ""))

    print("\n| side | sentences/s | warm-up pass (s) | min cosine vs ST fp32 (TF32 off) | notes |")
    print("|---|---|---|---|---|")
    for name, sps, warm, cmin, note in rows:
        print(f"| {name} | {sps:.0f} | {warm:.1f} | {cmin:.6f} | {note} |")


def train_st(args) -> None:
    import torch
    from st_contrastive import read_rows, window_rate
    from st_contrastive import train_st as run

    from sbert_flax.devdata import data_path

    model_dir = args.model or bert_base_dir()
    rows = read_rows(data_path("contrastive", "nli-zh-pairs.tsv"), header=True, columns=2, score_scale=None)
    dtype = getattr(torch, args.autocast) if args.autocast else None
    _, stats = run(model_dir, "mnrl", rows, batch_size=args.batch_size, lr=2e-5, epochs=100, seq_length=64,
                   warmup=0.1, scale=20.0, seed=7, max_steps=args.steps, max_grad_norm=1.0,
                   device=args.device, autocast_dtype=dtype)
    rate = window_rate(stats["step_end"], stats["step_sentences"], 10, stats["steps"])
    print(json.dumps({"side": "sentence-transformers", "batch_size": args.batch_size, "autocast": args.autocast,
                      "steps": stats["steps"], "texts_per_s_steps_11_on": rate}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["encode", "train-st"])
    ap.add_argument("--model", help="HF / sentence-transformers folder (default: random BERT-base)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=8, help="encode: STS-B-zh test sentences x this")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--autocast", choices=["bfloat16", "float16"], help="train-st: torch.autocast dtype")
    args = ap.parse_args()
    {"encode": encode, "train-st": train_st}[args.part](args)


if __name__ == "__main__":
    main()
