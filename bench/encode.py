"""Benchmark: sentence-transformers (PyTorch) vs sbert-flax encode, side by side in ONE process.

Same model folder, same sentences (STS-B-zh test: 2,722 sentences), same thread count, fp32 and
bf16; sentence-transformers batches 64 sentences padded to the batch's longest, sbert-flax packs
sentences into rows under a token budget (default 4096 = 64 rows of 64 tokens). Reports sentences/s, the ratio, padding waste, compile count and compile time. The machine
is shared and noisy, so both sides are timed alternately within one run and the best of
`--repeats` is kept for each.

    python bench/encode.py                      # random BERT-base-sized Chinese model (12L/768)
    python bench/encode.py --model ~/.cache/sbert_flax/models/m3e-small
    python bench/encode.py --sentences 500 --dtypes float32   # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bert_base_dir, stsb_sentences  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF / sentence-transformers folder (default: random BERT-base)")
    ap.add_argument("--sentences", type=int, default=None, help="use only the first N sentences")
    ap.add_argument("--batch-size", type=int, default=64, help="sentence-transformers' batch")
    ap.add_argument("--max-batch-tokens", type=int, default=4096,
                    help="sbert-flax's token budget per packed batch")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from sbert_flax import SentenceEncoder

    torch.set_num_threads(args.threads)
    model_dir = args.model or bert_base_dir()
    sents = stsb_sentences("test", args.sentences)
    print(f"model {model_dir}\n{len(sents)} sentences, sentence-transformers batch {args.batch_size}, "
          f"sbert-flax {args.max_batch_tokens} tokens per packed batch, "
          f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    rows = []
    for dtype in args.dtypes.split(","):
        st = SentenceTransformer(model_dir, device="cpu")
        if dtype == "bfloat16":
            st = st.to(torch.bfloat16)
        enc = SentenceEncoder.from_pretrained(model_dir, dtype=dtype, devices=jax.local_devices()[:1],
                                              max_batch_tokens=args.max_batch_tokens)

        t0 = time.perf_counter()
        ours = enc.encode(sents)
        first = time.perf_counter() - t0
        compiles = enc.num_compiles
        with torch.inference_mode():
            ref = st.encode(sents, batch_size=args.batch_size, convert_to_numpy=True)  # warm-up
        t_st, t_ours = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                st.encode(sents, batch_size=args.batch_size)
            t_st.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode(sents)
            t_ours.append(time.perf_counter() - t0)
        ref = np.asarray(ref, np.float32)
        cos = np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
        st_sps, our_sps = len(sents) / min(t_st), len(sents) / min(t_ours)
        print(f"{dtype} repeats (sent/s): sentence-transformers "
              f"{[round(len(sents) / t, 1) for t in t_st]}, sbert-flax "
              f"{[round(len(sents) / t, 1) for t in t_ours]}; paired ratios "
              f"{[round(a / b, 2) for a, b in zip(t_st, t_ours, strict=True)]} (median "
              f"{float(np.median([a / b for a, b in zip(t_st, t_ours, strict=True)])):.2f})")
        stats = enc.last_stats
        rows.append((dtype, st_sps, our_sps, our_sps / st_sps, stats.padding_waste, compiles,
                     max(first - min(t_ours), 0.0), float(cos.min())))
        print(f"{dtype}: torch {st_sps:.1f}/s  sbert-flax {our_sps:.1f}/s  shapes {stats.shapes}")

    print("\n| dtype | sentence-transformers (sent/s) | sbert-flax (sent/s) | ratio | padding waste "
          "| compiles | compile time (s) | min cosine vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, a, b, r, waste, n, ct, cmin in rows:
        print(f"| {dtype} | {a:.1f} | {b:.1f} | {r:.2f} | {waste:.1%} | {n} | {ct:.1f} | {cmin:.6f} |")


if __name__ == "__main__":
    main()
