"""Benchmark: contrastive fine-tuning in sentence-transformers vs sbert-flax, side by side.

Init m3e-small (4 layers, hidden 512, mean pooling: its folder's default), 1 epoch, batch 64,
lr 2e-5, seq 64, 10% linear warmup, scale 20, on the recipes of issue 8:

  mnrl    MultipleNegativesRankingLoss on contrastive/nli-zh-pairs.tsv (6,719 anchor/positive)
  cosent  CoSENTLoss on stsb-zh/train.tsv (5,231 graded pairs, score / 5)

The sbert-flax side is the `sbert-flax train` command line exactly as issue 8 writes it (plus
`--seed`); the sentence-transformers side is `st_contrastive.train_st` (its trainer's loop with
the same hyper-parameters). Every run is its own subprocess, one after the other on the same CPU
(2 torch threads; XLA uses the machine's cores). Both final models are then scored the same way:
STS-B-zh dev and test Spearman of cosine with `sbert_flax.retrieval.sts.evaluate_sts` over
`SentenceEncoder.from_pretrained(<sentence-transformers folder>)` (sbert-flax exports
OUT/best_model_pytorch, the model after its single epoch; sentence-transformers `model.save`).

Speed, the same definition on both sides: texts embedded per second (2 per pair) in the training
loop between the end of step s1 and the end of step s2, where s1 / s2 are the first / last steps
the sbert-flax CLI logs to OUT/metrics.jsonl (every 10 steps: steps 10..100 for mnrl, 10..80 for
cosent). That excludes model loading, the first steps (the first XLA compilation) and evaluation;
a later compilation (another packed row count: rows come in multiples of 8, 2-3 shapes a run)
falls inside unless JAX's persistent compilation cache (on in the CLI) already holds it. The "whole loop" row counts steps 1..s2 from the start of
the loop (sbert-flax's start is the first record's time minus its window, so it includes the
first compilation). Peak RSS is `ru_maxrss` of the training subprocess (os.wait4).

    python bench/train_contrastive_vs_st.py                          # 3 seeds x 2 recipes x 2 sides
    python bench/train_contrastive_vs_st.py --max-steps 5 --seeds 7  # smoke run
    python bench/train_contrastive_vs_st.py --seeds 8,9 --results b.json   # more seeds later,
    python bench/train_contrastive_vs_st.py --report a.json b.json        # then one table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

# name -> (train file under the shared data dir, header?, text columns, score scale or None, CLI flags)
RECIPES: dict[str, tuple[tuple[str, str], bool, int, float | None, list[str]]] = {
    "mnrl": (("contrastive", "nli-zh-pairs.tsv"), True, 2, None, ["--loss", "mnrl"]),
    "cosent": (("stsb-zh", "train.tsv"), False, 2, 5.0,
               ["--loss", "cosent", "--no_header", "--columns", "sentence1,sentence2,score",
                "--score_scale", "5"]),
}


def _run_measured(cmd: list[str], log_path: str, env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """Runs `cmd` with stdout+stderr to `log_path`; returns (exit code, peak RSS MB, wall seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024.0, time.perf_counter() - t0


def _tail(path: str, n: int = 3000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def _step_sentences(n_rows: int, steps: int, args, columns: int) -> list[int]:
    """Texts embedded in each step of the (single-epoch) run: full batches, then the remainder."""
    return [min(args.batch_size, n_rows - k * args.batch_size) * columns for k in range(steps)]


# ---- children --------------------------------------------------------------------------------

def child_st(args) -> None:
    """Trains the sentence-transformers side; writes stats JSON and the model folder."""
    import torch
    from st_contrastive import read_rows, train_st

    torch.set_num_threads(args.threads)
    path, header, columns, score_scale, _ = RECIPES[args.recipe]
    rows = read_rows(args.train_path, header=header, columns=columns, score_scale=score_scale)
    model, stats = train_st(args.model, args.recipe, rows, batch_size=args.batch_size, lr=args.lr,
                            epochs=1, seq_length=args.seq_length, warmup=0.1, scale=20.0,
                            seed=args.seed, max_steps=args.max_steps,
                            max_grad_norm=args.st_max_grad_norm or None)
    model.save(os.path.join(args.out, "model"))
    stats["rows"] = len(rows[0])
    with open(os.path.join(args.out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def child_eval(args) -> None:
    """Scores sentence-transformers folders on STS-B-zh dev and test (one JSON line per folder)."""
    from sbert_flax import SentenceEncoder
    from sbert_flax.common.devdata import data_path
    from sbert_flax.retrieval.sts import evaluate_sts

    out = {}
    for d in args.eval_dirs:
        enc = SentenceEncoder.from_pretrained(d)
        out[d] = {split: evaluate_sts(enc, data_path("stsb-zh", f"{split}.tsv"))["spearman"]
                  for split in ("dev", "test")}
    print(json.dumps(out))


# ---- one run of each side --------------------------------------------------------------------

def run_st(args, recipe: str, seed: int, train_path: str, work: str) -> dict:
    out = os.path.join(work, f"st-{recipe}-{seed}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", "st", "--recipe", recipe, "--seed", str(seed),
           "--train-path", train_path, "--out", out, "--model", args.model, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seq-length", str(args.seq_length),
           "--st-max-grad-norm", str(args.st_max_grad_norm)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    rc, rss, wall = _run_measured(cmd, os.path.join(out, "run.log"))
    if rc:
        raise RuntimeError(f"sentence-transformers {recipe} seed {seed} failed:\n{_tail(os.path.join(out, 'run.log'))}")
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    return {"model_dir": os.path.join(out, "model"), "peak_rss_mb": rss, "run_seconds": wall, **stats}


def run_flax(args, recipe: str, seed: int, train_path: str, work: str) -> dict:
    out = os.path.join(work, f"flax-{recipe}-{seed}")
    _, _, _, _, flags = RECIPES[recipe]
    from sbert_flax.common.devdata import data_path

    sts_dev = data_path("stsb-zh", "dev.tsv")
    # The issue's command line; only the seed (and, for a smoke run, the step limit) added.
    cmd = [args.sbert_flax, "train", *flags, "--pretrained_model_path", args.model, "--train_path", train_path,
           "--batch_size", str(args.batch_size), "--learning_rate", str(args.lr), "--epochs_num", "1",
           "--seq_length", str(args.seq_length), "--warmup", "0.1", "--seed", str(seed),
           "--sts-dev", sts_dev, "--output_dir", out]
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps), "--log_every_steps", "1"]
    os.makedirs(out, exist_ok=True)
    rc, rss, wall = _run_measured(cmd, os.path.join(work, f"flax-{recipe}-{seed}.log"))
    if rc:
        raise RuntimeError(f"sbert-flax {recipe} seed {seed} failed (rc {rc}):\n"
                           f"{_tail(os.path.join(work, f'flax-{recipe}-{seed}.log'))}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    if len(train) < 2:
        raise RuntimeError(f"sbert-flax {recipe} seed {seed}: {len(train)} train records in metrics.jsonl")
    return {"model_dir": os.path.join(out, "best_model_pytorch"), "peak_rss_mb": rss, "run_seconds": wall,
            "train_records": [{k: r[k] for k in ("step", "time", "sentences_per_s", "loss")} for r in train],
            "dev_records": [r for r in records if r["kind"] == "dev"]}


def speeds(st: dict, fx: dict, n_rows: int, args) -> None:
    """Adds "steady_sps" and "loop_sps" to both sides over the same step window (module doc)."""
    from st_contrastive import window_rate

    recs = fx["train_records"]
    s1, s2 = recs[0]["step"], recs[-1]["step"]
    sent = _step_sentences(n_rows, s2, args, 2)
    fx["steady_sps"] = sum(sent[s1:s2]) / (recs[-1]["time"] - recs[0]["time"])
    loop_start = recs[0]["time"] - sum(sent[:s1]) / recs[0]["sentences_per_s"]
    fx["loop_sps"] = sum(sent[:s2]) / (recs[-1]["time"] - loop_start)
    st["steady_sps"] = window_rate(st["step_end"], st["step_sentences"], s1, s2)
    st["loop_sps"] = window_rate(st["step_end"], st["step_sentences"], 0, s2)
    st["window"] = fx["window"] = [s1, s2]


def evaluate(args, dirs: list[str], work: str, tag: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "eval", "--eval-dirs", *dirs]
    log = os.path.join(work, f"eval-{tag}.log")
    with open(log, "w", encoding="utf-8") as f:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"evaluation {tag} failed:\n{_tail(log)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- report ----------------------------------------------------------------------------------

def _ms(xs: list[float], fmt: str, sign: str = "") -> str:
    """Mean +- sample standard deviation (0 for a single value)."""
    if not xs:
        return "-"
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{mean:{sign}{fmt}} +- {std:{fmt}}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def table(results: list[dict], args) -> str:
    lines = []
    for recipe in args.recipes:
        rs = [r for r in results if r["recipe"] == recipe]
        if not rs:
            continue
        seeds = ",".join(str(r["seed"]) for r in rs)
        w = rs[0]["st"]["window"]
        lines += ["", f"**{recipe}** (seeds {seeds}; n = {len(rs)} per side; speed window steps "
                  f"{w[0] + 1}..{w[1]})", "",
                  "| | sentence-transformers | sbert-flax | difference / ratio |", "|---|---|---|---|"]
        for key, name, fmt in (("dev", "STS-B-zh dev Spearman", ".4f"), ("test", "STS-B-zh test Spearman", ".4f")):
            a, b = [r["st"][key] for r in rs], [r["flax"][key] for r in rs]
            diffs = [y - x for x, y in zip(a, b, strict=True)]
            lines.append(f"| {name} | {_ms(a, fmt)} | {_ms(b, fmt)} | {_ms(diffs, fmt, '+')} |")
        for key, name in (("steady_sps", "training sentences/s"),
                          ("loop_sps", "sentences/s, whole loop (incl. first compile)")):
            a, b = [r["st"][key] for r in rs], [r["flax"][key] for r in rs]
            lines.append(f"| {name} | {_ms(a, '.1f')} | {_ms(b, '.1f')} | {_mean(b) / _mean(a):.2f}x |")
        a, b = [r["st"]["peak_rss_mb"] for r in rs], [r["flax"]["peak_rss_mb"] for r in rs]
        lines.append(f"| peak RSS (MB) | {_ms(a, '.0f')} | {_ms(b, '.0f')} | {_mean(b) / _mean(a):.2f}x |")
        a, b = [r["st"]["run_seconds"] for r in rs], [r["flax"]["run_seconds"] for r in rs]
        lines.append(f"| training process wall time (s) | {_ms(a, '.0f')} | {_ms(b, '.0f')} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="init model folder (default: m3e-small)")
    ap.add_argument("--recipes", default="mnrl,cosent")
    ap.add_argument("--seeds", default="7,8,9")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps (smoke run)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--st-max-grad-norm", type=float, default=1.0,
                    help="sentence-transformers' gradient clipping (its default 1.0; 0 = off)")
    ap.add_argument("--results", default=None, help="also write every run's figures to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (models, logs)")
    ap.add_argument("--report", nargs="+", metavar="RESULTS_JSON",
                    help="only print the table of runs saved with --results (several files join)")
    ap.add_argument("--child", choices=["st", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--train-path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--eval-dirs", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "eval":
        return child_eval(args)
    if args.child == "st":
        return child_st(args)
    args.recipes = [r for r in args.recipes.split(",") if r]
    if args.report:
        results = []
        for path in args.report:
            with open(path, encoding="utf-8") as f:
                results += json.load(f)
        print(table(results, args))
        return None

    from sbert_flax.common.devdata import data_path, reference_model

    args.model = args.model or reference_model("m3e-small")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.sbert_flax = shutil.which("sbert-flax")
    if not args.sbert_flax:
        sys.exit("the sbert-flax console script is not on PATH: pip install -e .")
    work = tempfile.mkdtemp(prefix="sbert-flax-contrastive-bench-")
    print(f"model {args.model}; work dir {work}", flush=True)
    from st_contrastive import read_rows

    data: dict[str, tuple[str, int]] = {}  # recipe -> (train path, rows)
    for recipe in args.recipes:
        (sub, name), header, columns, score_scale, _ = RECIPES[recipe]
        train_path = data_path(sub, name)
        if not train_path:
            sys.exit(f"shared data not found: {sub}/{name} (set SBERT_FLAX_DATA)")
        rows = read_rows(train_path, header=header, columns=columns, score_scale=score_scale)[0]
        data[recipe] = (train_path, len(rows))
    results: list[dict] = []
    # Seed-major, the two sides of one (seed, recipe) back to back: a run cut short still has
    # complete pairs for every recipe.
    for seed in seeds:
        for recipe in args.recipes:
            train_path, n_rows = data[recipe]
            t0 = time.time()
            st = run_st(args, recipe, seed, train_path, work)
            fx = run_flax(args, recipe, seed, train_path, work)
            speeds(st, fx, n_rows, args)
            scores = evaluate(args, [st["model_dir"], fx["model_dir"]], work, f"{recipe}-{seed}")
            st.update(scores[st["model_dir"]])
            fx.update(scores[fx["model_dir"]])
            for side in (st, fx):
                side.pop("step_end", None)
                side.pop("step_sentences", None)
            results.append({"recipe": recipe, "seed": seed, "rows": n_rows, "st": st, "flax": fx})
            print(f"{recipe} seed {seed} ({time.time() - t0:.0f} s): "
                  f"st dev {st['dev']:.4f} test {st['test']:.4f} {st['steady_sps']:.1f} sent/s "
                  f"{st['peak_rss_mb']:.0f} MB | flax dev {fx['dev']:.4f} test {fx['test']:.4f} "
                  f"{fx['steady_sps']:.1f} sent/s {fx['peak_rss_mb']:.0f} MB", flush=True)
            if args.results:
                with open(args.results, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=1)
            if not args.keep:
                for d in (st["model_dir"], os.path.dirname(fx["model_dir"])):
                    shutil.rmtree(d, ignore_errors=True)
    print(f"\nm3e-small init (mean pooling), 1 epoch, batch {args.batch_size}, lr {args.lr}, seq "
          f"{args.seq_length}, warmup 0.1, scale 20, {args.threads} torch threads"
          + (f", max {args.max_steps} steps" if args.max_steps else ""))
    print(table(results, args))


if __name__ == "__main__":
    main()
