"""Benchmark: the UER siamese recipe in PyTorch vs sbert-flax, same init, data and hyper-parameters.

Init m3e-small (4 layers, hidden 512, the 21128 Chinese vocab); train on the first `--pairs`
pairs of nli-zh/train.tsv for `--epochs`; report dev accuracy (nli-zh/dev.tsv), STS-B-zh dev
Spearman of cosine, training pairs/s, peak RSS and (JAX) compile count. Each side runs in its own
subprocess (so peak memory is its own), one after the other on the same CPU threads.

    python bench/train_vs_pytorch.py                  # 8,000 pairs, 1 epoch, batch 64, seq 64
    python bench/train_vs_pytorch.py --pairs 2000     # quicker
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))


def _subset(src: str, n: int, dest: str) -> None:
    with open(src, encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i > n:
                break
            g.write(line)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_torch(args, train_path: str, dev_path: str, sts_dev: str) -> dict:
    import numpy as np
    import torch
    from torch_siamese import embed_torch, predict_torch, train_torch

    from sbert_flax.evaluation import read_sts, spearman
    from sbert_flax.tokenization import load_tokenizer
    from sbert_flax.training import data

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    train = data.tokenize_pairs(data.read_pair_tsv(train_path), tok, args.seq_length)
    dev = data.tokenize_pairs(data.read_pair_tsv(dev_path), tok, args.seq_length)
    num_labels = 3
    model, stats = train_torch(args.model, ([list(x) for x in train.a], [list(x) for x in train.b],
                                            train.labels), num_labels, pooling=args.pooling,
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    pred = predict_torch(model, [list(x) for x in dev.a], [list(x) for x in dev.b])
    s1, s2, gold = read_sts(sts_dev)
    e1 = embed_torch(model, [list(x) for x in tok.encode(s1, args.seq_length)])
    e2 = embed_torch(model, [list(x) for x in tok.encode(s2, args.seq_length)])
    cos = np.sum(e1 * e2, 1) / (np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1))
    return {"dev_accuracy": float(np.mean(pred == dev.labels)), "sts_dev_spearman": float(spearman(cos, gold)),
            "pairs_per_s": stats["pairs_per_s"], "train_seconds": stats["train_seconds"],
            "peak_rss_mb": _peak_rss_mb(), "compiles": 0}


def run_jax(args, train_path: str, dev_path: str, sts_dev: str) -> dict:
    from sbert_flax.training.train_config import TrainConfig
    from sbert_flax.training.trainer import train_and_evaluate

    out = tempfile.mkdtemp(prefix="sbert-flax-bench-")
    cfg = TrainConfig(pretrained_model_path=args.model, train_path=train_path, dev_path=dev_path,
                      sts_dev_path=sts_dev, learning_rate=args.lr, epochs_num=args.epochs,
                      batch_size=args.batch_size, seq_length=args.seq_length, seed=args.seed,
                      pooling=args.pooling, output_dir=out, export=False, progress_bar=False, log_every_steps=1,
                      bf16=args.bf16)
    t0 = time.perf_counter()
    summary = train_and_evaluate(cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        train_rows = [r for r in map(json.loads, f) if r["kind"] == "train"]
    last = summary["history"][-1]
    # Steady-state rate between the first and last logged steps (compilation mostly excluded);
    # the epoch-average rate (compilation included) is the last row's own figure.
    first, final = train_rows[min(5, len(train_rows) - 2)], train_rows[-1]
    steady = (final["step"] - first["step"]) * args.batch_size / max(final["time"] - first["time"], 1e-9)
    return {"dev_accuracy": float(last["accuracy"]), "sts_dev_spearman": float(last["sts_spearman"]),
            "pairs_per_s": steady, "pairs_per_s_with_compile": final["sentences_per_s"] / 2.0,
            "run_seconds": wall, "peak_rss_mb": _peak_rss_mb(),
            "compiles": summary.get("train_step_traces")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="init model dir (default: m3e-small)")
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--pooling", default="cls")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--bf16", action="store_true", help="sbert-flax side in bf16 compute")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--side", choices=["torch", "jax"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from sbert_flax.devdata import data_path, reference_model

    args.model = args.model or reference_model("m3e-small")
    train_src, dev, sts_dev = (data_path("nli-zh", "train.tsv"), data_path("nli-zh", "dev.tsv"),
                               data_path("stsb-zh", "dev.tsv"))
    if not (train_src and dev and sts_dev):
        sys.exit("shared data not found: set SBERT_FLAX_DATA")

    if args.side:  # child process: one side, JSON on the last stdout line
        train_path = os.path.join(args.work, "train.tsv")
        res = (run_torch if args.side == "torch" else run_jax)(args, train_path, dev, sts_dev)
        print(json.dumps(res))
        return

    work = tempfile.mkdtemp(prefix="sbert-flax-trainbench-")
    _subset(train_src, args.pairs, os.path.join(work, "train.tsv"))
    results = {}
    for side in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--side", side, "--work", work] + [
            a for a in sys.argv[1:]]
        print(f"running {side} ...", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{side} side failed:\n{r.stderr[-3000:]}")
        results[side] = json.loads(r.stdout.strip().splitlines()[-1])
        print(side, results[side], flush=True)

    t, j = results["torch"], results["jax"]
    print(f"\nm3e-small init, {args.pairs} nli-zh pairs, {args.epochs} epoch(s), batch {args.batch_size}, "
          f"seq {args.seq_length}, lr {args.lr}, pooling {args.pooling}, {args.threads} threads\n")
    print("| | PyTorch | sbert-flax | difference / ratio |")
    print("|---|---|---|---|")
    print(f"| dev accuracy (nli-zh dev) | {t['dev_accuracy']:.4f} | {j['dev_accuracy']:.4f} | "
          f"{100 * (j['dev_accuracy'] - t['dev_accuracy']):+.2f} points |")
    print(f"| STS-B-zh dev Spearman | {t['sts_dev_spearman']:.4f} | {j['sts_dev_spearman']:.4f} | "
          f"{j['sts_dev_spearman'] - t['sts_dev_spearman']:+.4f} |")
    print(f"| training pairs/s (sentences/s = 2x) | {t['pairs_per_s']:.1f} | {j['pairs_per_s']:.1f} | "
          f"{j['pairs_per_s'] / t['pairs_per_s']:.2f}x |")
    print(f"| sbert-flax pairs/s incl. compilation | | {j['pairs_per_s_with_compile']:.1f} | |")
    print(f"| peak RSS (MB) | {t['peak_rss_mb']:.0f} | {j['peak_rss_mb']:.0f} | |")
    print(f"| train-step compilations | - | {j['compiles']} | |")


if __name__ == "__main__":
    main()
