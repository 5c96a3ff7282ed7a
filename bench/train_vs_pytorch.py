"""Benchmark: the model card's recipe in PyTorch (sentence-transformers' SoftmaxLoss with UER's
head, as its Trainer steps it: bench/torch_siamese.py) vs sbert-flax's trainer.

Recipe: init m3e-small, the first `--pairs` pairs of nli-zh/train.tsv, `--epochs`, batch 32,
seq 64, lr 5e-5, mean pooling, warmup 10%, weight decay 0.01, clipping at 1.0. Both sides draw
the same batches per seed (sbert-flax's random `BatchPlan`); each side initialises its own head.
Reported: dev accuracy (nli-zh/dev.tsv), STS-B-zh dev Spearman of cosine, training pairs/s in
steady state (after the first 5 steps) and over the whole run (from loading the model to the last
update: compilation included), peak RSS, compile count. Each (side, seed) runs in its own subprocess, one after the other.

    python bench/train_vs_pytorch.py                          # seed 7, both sides
    python bench/train_vs_pytorch.py --pairs 2000             # quicker
    python bench/train_vs_pytorch.py --seeds 7 8 9 --sides torch --results-dir R   # one record a run
    python bench/train_vs_pytorch.py --report R --json bench/results/siamese-DATE.json

The sbert-flax side runs with PyTorch's optimizer flags by default (`--adam_eps 1e-8
--no_clip_head`, see bench/siamese_divergence.py); `--uer-flags` runs sbert-flax's defaults
(eps 1e-6, the head inside the clipping norm); `--no-pack` pads [a; b] instead of packing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
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


def _steps_per_epoch(args, n: int) -> int:
    return -(-n // args.batch_size)


def run_torch(args, seed: int, train_path: str, dev_path: str, sts_dev: str) -> dict:
    import numpy as np
    import torch
    from torch_siamese import SoftmaxRecipe

    from sbert_flax.retrieval.sts import read_sts, spearman
    from sbert_flax.training import data
    from sbert_flax.training.pipeline import BatchPlan, PipelineConfig

    torch.set_num_threads(args.threads)
    src = data.open_source(train_path, data.schema_for("softmax"))
    plan = BatchPlan(len(src), PipelineConfig(global_batch=args.batch_size, seq_length=args.seq_length,
                                              seed=seed, epochs=args.epochs))
    t_load = time.perf_counter()  # the whole run: from loading the model to the last update
    ref = SoftmaxRecipe(args.model, 3, seq_length=args.seq_length, lr=args.lr,
                        total_steps=plan.total_steps, max_grad_norm=1.0, seed=seed)
    t0 = time.perf_counter()
    times = []
    for k in range(plan.total_steps):
        idx = plan.records(k)
        texts = src.texts(idx)
        ref.step(texts["text_a"], texts["text_b"], np.asarray(src.targets[idx]))
        times.append(time.perf_counter())
    wall = time.perf_counter() - t0
    first = min(5, len(times) - 2)
    steady = (len(times) - 1 - first) * args.batch_size / max(times[-1] - times[first], 1e-9)
    dev = data.read_pair_tsv(dev_path)
    pred = ref.predict(list(dev.text_a), list(dev.text_b))
    s1, s2, gold = read_sts(sts_dev)
    e1, e2 = ref.embed(s1), ref.embed(s2)
    cos = np.sum(e1 * e2, 1) / (np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1))
    return {"dev_accuracy": float(np.mean(pred == np.asarray(dev.labels))),
            "sts_dev_spearman": float(spearman(cos, gold)), "pairs_per_s": steady,
            "pairs_per_s_whole_run": len(src) * args.epochs / (times[-1] - t_load), "train_seconds": wall,
            "peak_rss_mb": _peak_rss_mb(), "compiles": 0}


def run_jax(args, seed: int, train_path: str, dev_path: str, sts_dev: str) -> dict:
    from sbert_flax.training.train_config import TrainConfig
    from sbert_flax.training.trainer import train_and_evaluate

    out = tempfile.mkdtemp(prefix="sbert-flax-bench-")
    flags = {} if args.uer_flags else {"adam_eps": 1e-8, "clip_head": False}
    cfg = TrainConfig(pretrained_model_path=args.model, train_path=train_path, dev_path=dev_path,
                      sts_dev_path=sts_dev, learning_rate=args.lr, epochs_num=args.epochs,
                      batch_size=args.batch_size, seq_length=args.seq_length, seed=seed,
                      pooling="mean", max_grad_norm=1.0, pack=not args.no_pack, output_dir=out,
                      export=False, progress_bar=False, log_every_steps=1, bf16=args.bf16, **flags)
    t0, t_load = time.perf_counter(), time.time()  # the metrics' "time" is wall-clock time
    summary = train_and_evaluate(cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = list(map(json.loads, f))
    train_rows = [r for r in rows if r["kind"] == "train"]
    last = summary["history"][-1]
    # Steady state between the 6th and the last step (compilation mostly excluded); the whole
    # run from loading the model (data indexing and compilations included) to the last update.
    first, final = train_rows[min(5, len(train_rows) - 2)], train_rows[-1]
    steady = (final["step"] - first["step"]) * args.batch_size / max(final["time"] - first["time"], 1e-9)
    pairs = sum(1 for _ in open(train_path, encoding="utf-8")) - 1
    return {"dev_accuracy": float(last["accuracy"]), "sts_dev_spearman": float(last["sts_spearman"]),
            "pairs_per_s": steady, "pairs_per_s_whole_run": pairs * args.epochs / (final["time"] - t_load),
            "run_seconds": wall, "peak_rss_mb": _peak_rss_mb(),
            "compiles": summary.get("train_step_traces")}


def _table(records: list[dict], args) -> str:
    by = {s: [r for r in records if r["side"] == s] for s in ("torch", "jax")}

    def stat(side: str, key: str, fmt: str) -> str:
        xs = [r[key] for r in by[side]]
        if not xs:
            return "-"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"

    def diff(key: str, scale: float, fmt: str, unit: str) -> str:
        if not (by["torch"] and by["jax"]):
            return "-"
        d = statistics.mean(r[key] for r in by["jax"]) - statistics.mean(r[key] for r in by["torch"])
        return f"{scale * d:+{fmt}}{unit}"

    def ratio(key: str) -> str:
        if not (by["torch"] and by["jax"]):
            return "-"
        return f"{statistics.mean(r[key] for r in by['jax']) / statistics.mean(r[key] for r in by['torch']):.2f}x"

    seeds = {s: ",".join(str(r["seed"]) for r in by[s]) for s in by}
    lines = [f"seeds: PyTorch {seeds['torch'] or '-'}, sbert-flax {seeds['jax'] or '-'} (mean ± std dev)", "",
             "| | PyTorch (sentence-transformers) | sbert-flax | difference / ratio |", "|---|---|---|---|",
             f"| dev accuracy (nli-zh dev) | {stat('torch', 'dev_accuracy', '.4f')} | "
             f"{stat('jax', 'dev_accuracy', '.4f')} | {diff('dev_accuracy', 100, '.2f', ' points')} |",
             f"| STS-B-zh dev Spearman | {stat('torch', 'sts_dev_spearman', '.4f')} | "
             f"{stat('jax', 'sts_dev_spearman', '.4f')} | {diff('sts_dev_spearman', 1, '.4f', '')} |",
             f"| training pairs/s, steady state | {stat('torch', 'pairs_per_s', '.1f')} | "
             f"{stat('jax', 'pairs_per_s', '.1f')} | {ratio('pairs_per_s')} |",
             f"| training pairs/s, whole run | {stat('torch', 'pairs_per_s_whole_run', '.1f')} | "
             f"{stat('jax', 'pairs_per_s_whole_run', '.1f')} | {ratio('pairs_per_s_whole_run')} |",
             f"| peak RSS (MB) | {stat('torch', 'peak_rss_mb', '.0f')} | {stat('jax', 'peak_rss_mb', '.0f')} | |",
             f"| train-step compilations | - | {stat('jax', 'compiles', '.1f')} | |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="init model dir (default: m3e-small)")
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[7])
    ap.add_argument("--sides", nargs="+", choices=["torch", "jax"], default=["torch", "jax"])
    ap.add_argument("--uer-flags", action="store_true", help="sbert-flax side with its UER defaults "
                    "(AdamW eps 1e-6, the head inside the clipping norm)")
    ap.add_argument("--no-pack", action="store_true", help="sbert-flax side pads [a; b]")
    ap.add_argument("--bf16", action="store_true", help="sbert-flax side in bf16 compute")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--results-dir", help="write one JSON record per (side, seed) here")
    ap.add_argument("--report", help="only print the table of the records in this folder")
    ap.add_argument("--json", help="with --report (or after the runs): write all records and the "
                    "table here")
    ap.add_argument("--side", choices=["torch", "jax"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from sbert_flax.common.devdata import data_path, reference_model
    from sbert_flax.common.files import write_json

    if args.report:
        records = [json.load(open(p, encoding="utf-8"))
                   for p in sorted(glob.glob(os.path.join(args.report, "*.json")))]
        table = _table(records, args)
        print(table)
        if args.json:
            write_json(args.json, {"records": records, "table": table})
        return

    args.model = args.model or reference_model("m3e-small")
    train_src, dev, sts_dev = (data_path("nli-zh", "train.tsv"), data_path("nli-zh", "dev.tsv"),
                               data_path("stsb-zh", "dev.tsv"))
    if not (train_src and dev and sts_dev):
        sys.exit("shared data not found: set SBERT_FLAX_DATA")

    if args.side:  # child process: one side, JSON on the last stdout line
        train_path = os.path.join(args.work, "train.tsv")
        res = (run_torch if args.side == "torch" else run_jax)(args, args.seed, train_path, dev, sts_dev)
        print(json.dumps(res))
        return

    work = tempfile.mkdtemp(prefix="sbert-flax-trainbench-")
    _subset(train_src, args.pairs, os.path.join(work, "train.tsv"))
    recipe = {"model": args.model, "pairs": args.pairs, "epochs": args.epochs, "batch_size": args.batch_size,
              "seq_length": args.seq_length, "lr": args.lr, "pooling": "mean", "warmup": 0.1,
              "weight_decay": 0.01, "max_grad_norm": 1.0, "threads": args.threads,
              "flax_flags": "uer" if args.uer_flags else "pytorch", "pack": not args.no_pack,
              "bf16": args.bf16}
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
    records = []
    for seed in args.seeds:
        for side in args.sides:
            child = [a for a in sys.argv[1:]]
            cmd = [sys.executable, __file__, *child, "--side", side, "--seed", str(seed), "--work", work]
            print(f"running {side} seed {seed} ...", flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{side} side failed:\n{r.stderr[-3000:]}")
            rec = {"side": side, "seed": seed, **recipe, **json.loads(r.stdout.strip().splitlines()[-1]),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            records.append(rec)
            print(rec, flush=True)
            if args.results_dir:
                write_json(os.path.join(args.results_dir, f"{side}-{seed}.json"), rec)

    print(f"\nm3e-small init, {args.pairs} nli-zh pairs, {args.epochs} epoch(s), batch {args.batch_size}, "
          f"seq {args.seq_length}, lr {args.lr}, mean pooling, {args.threads} threads\n")
    table = _table(records, args)
    print(table)
    if args.json:
        write_json(args.json, {"records": records, "table": table})


if __name__ == "__main__":
    main()
