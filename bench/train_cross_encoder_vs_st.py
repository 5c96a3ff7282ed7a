"""Benchmark: cross-encoder fine-tuning in sentence-transformers vs sbert-flax, side by side.

The recipe (issue 25): binary pairs from STS-B-zh, LCQMC-style (a pair is similar or not): score
>= 4 -> label 1, score <= 1 -> label 0, scores 2-3 dropped (train: 2,928 pairs). Init m3e-small
(4 layers, hidden 512; its BERT pooler kept) with a fresh one-logit classifier, binary
cross-entropy on the logit, 1 epoch, batch 32, lr 2e-5, pair length 64, 10% linear warmup, AdamW
(eps 1e-8, weight decay 0.01 except biases and LayerNorm), gradient clipping at norm 1.0, dropout
0.1, a random sampler seeded per run; 3 seeds a side.

- sbert-flax: `sbert-flax train --loss ce-bce ...` (the Trainer: grain input, the jitted step,
  orbax checkpoints), exporting best_model (a sentence-transformers CrossEncoder folder).
- sentence-transformers: its `CrossEncoder(m3e, num_labels=1, max_length=64)` (the head
  `BertForSequenceClassification.from_pretrained` draws) and its `BinaryCrossEntropyLoss`, in the
  loop `CrossEncoderTrainer` runs (HF Trainer defaults: torch AdamW eps 1e-8, the linear schedule
  with ceil(0.1 * steps) warmup steps, `clip_grad_norm_(1.0)`, a RandomSampler, drop_last off),
  written out so every step can be timed: `CrossEncoderTrainer` needs the `datasets` and
  `accelerate` packages, which the test environment does not install (bench/st_contrastive.py
  does the same for the bi-encoder losses).

Every run is its own subprocess, one after the other on the same CPU (2 torch threads; XLA uses
the machine's cores). Both saved models are then scored the same way, with
`sbert_flax.CrossEncoder` (equal to sentence-transformers' predict to ~1e-7,
tests/inference/test_cross_encoder.py) on STS-B-zh test, held out: accuracy (logit > 0) and ROC
AUC on its binary pairs (the same >= 4 / <= 1 rule: 770 pairs), and Spearman of the logits
against the graded scores of all 1,361 pairs (`CrossEncoderCorrelationEvaluator`'s measure).

Speed, the same definition on both sides: pairs per second in the training loop between the end
of step s1 and the end of step s2, the first and last steps sbert-flax logs (every 10 steps),
which excludes model loading and the first compilation; later compilations (another padded pair
length: buckets 16/32/48/64) fall inside unless JAX's persistent compilation cache already holds
them from an earlier seed. Peak RSS is `ru_maxrss` of the training subprocess.

    python bench/train_cross_encoder_vs_st.py                            # 3 seeds x 2 sides
    python bench/train_cross_encoder_vs_st.py --max-steps 40 --seeds 7   # a shorter run
    python bench/train_cross_encoder_vs_st.py --report bench/results/cross-encoder-*.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

POSITIVE, NEGATIVE = 4.0, 1.0  # STS score >= 4: similar (1); <= 1: not (0); between: dropped
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def binary_pairs(path: str) -> list[tuple[str, str, int]]:
    """(s1, s2, label) of an STS-B-zh file under the >= 4 / <= 1 rule."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if not line.strip():
                continue
            a, b, s = line.rstrip("\n").split("\t")
            if float(s) >= POSITIVE:
                out.append((a, b, 1))
            elif float(s) <= NEGATIVE:
                out.append((a, b, 0))
    return out


def _run_measured(cmd: list[str], log_path: str) -> tuple[int, float, float]:
    """Runs `cmd` with stdout+stderr to `log_path`; (exit code, peak RSS MB, wall seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024.0, time.perf_counter() - t0


def _tail(path: str, n: int = 3000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


# ---- children --------------------------------------------------------------------------------

def child_st(args) -> None:
    """Trains the sentence-transformers side (see the module docstring); saves model + stats."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import get_linear_schedule_with_warmup, set_seed

    torch.set_num_threads(args.threads)
    rows = []
    with open(args.train_path, encoding="utf-8") as f:
        next(f)
        for line in f:
            a, b, y = line.rstrip("\n").split("\t")
            rows.append((a, b, float(y)))
    set_seed(args.seed)  # before the model: the new classifier is drawn from it
    model = CrossEncoder(args.model, num_labels=1, max_length=args.seq_length, device="cpu")
    loss_model = BinaryCrossEntropyLoss(model)
    n = len(rows)
    total = -(-n // args.batch_size)
    if args.max_steps:
        total = min(total, args.max_steps)
    named = list(loss_model.named_parameters())
    opt = torch.optim.AdamW([
        {"params": [p for k, p in named if not any(nd in k for nd in NO_DECAY)],
         "weight_decay": args.weight_decay},
        {"params": [p for k, p in named if any(nd in k for nd in NO_DECAY)], "weight_decay": 0.0},
    ], lr=args.lr, eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.1 * total), total)
    gen = torch.Generator().manual_seed(args.seed)
    loss_model.train()
    order = torch.randperm(n, generator=gen).tolist()
    step_end, losses = [time.perf_counter()], []
    for step in range(total):
        batch = [rows[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        value = loss_model([[r[0] for r in batch], [r[1] for r in batch]],
                           torch.tensor([r[2] for r in batch]))
        value.backward()
        torch.nn.utils.clip_grad_norm_(loss_model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        step_end.append(time.perf_counter())
        if (step + 1) % 10 == 0 or step + 1 == total:
            losses.append(value.item())
            print(f"step {step + 1}/{total} loss {losses[-1]:.4f}", flush=True)
    model.eval()
    model.save(os.path.join(args.out, "model"))
    with open(os.path.join(args.out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": total, "step_end": step_end, "final_loss": losses[-1]}, f)


def child_eval(args) -> None:
    """Held-out scores of cross-encoder folders (one JSON line: {folder: metrics})."""
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from sbert_flax.common.devdata import data_path
    from sbert_flax.inference.cross_encoder import CrossEncoder
    from sbert_flax.retrieval.sts import read_sts

    test = data_path("stsb-zh", "test.tsv")
    s1, s2, gold = read_sts(test)
    binary = binary_pairs(test)
    y = np.array([r[2] for r in binary])
    out = {}
    for d in args.eval_dirs:
        ce = CrossEncoder(d, activation_fn="identity")  # raw logits
        logits = ce.predict([(r[0], r[1]) for r in binary], batch_size=64)
        graded = ce.predict(list(zip(s1, s2, strict=True)), batch_size=64)
        out[d] = {"accuracy": float(np.mean((logits > 0) == (y == 1))),
                  "auc": float(roc_auc_score(y, logits)),
                  "spearman": float(spearmanr(graded, gold).correlation)}
    print(json.dumps(out))


# ---- one run of each side --------------------------------------------------------------------

def run_st(args, seed: int, train_path: str, work: str) -> dict:
    out = os.path.join(work, f"st-{seed}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", "st", "--seed", str(seed), "--train-path",
           train_path, "--out", out, "--model", args.model, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seq-length",
           str(args.seq_length), "--weight-decay", str(args.weight_decay)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    rc, rss, wall = _run_measured(cmd, os.path.join(out, "run.log"))
    if rc:
        raise RuntimeError(f"sentence-transformers seed {seed} failed:\n"
                           f"{_tail(os.path.join(out, 'run.log'))}")
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    return {"model_dir": os.path.join(out, "model"), "peak_rss_mb": rss, "run_seconds": wall,
            **stats}


def run_flax(args, seed: int, train_path: str, work: str) -> dict:
    out = os.path.join(work, f"flax-{seed}")
    cmd = [args.sbert_flax, "train", "--loss", "ce-bce", "--pretrained_model_path", args.model,
           "--train_path", train_path, "--batch_size", str(args.batch_size), "--learning_rate",
           str(args.lr), "--epochs_num", "1", "--seq_length", str(args.seq_length), "--warmup",
           "0.1", "--weight_decay", str(args.weight_decay), "--adam_eps", "1e-8",
           "--max_grad_norm", "1.0", "--seed", str(seed), "--log_every_steps", "10",
           "--no_progress_bar", "--output_dir", out]
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps)]
    log = os.path.join(work, f"flax-{seed}.log")
    rc, rss, wall = _run_measured(cmd, log)
    if rc:
        raise RuntimeError(f"sbert-flax seed {seed} failed (rc {rc}):\n{_tail(log)}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    if len(train) < 2:
        raise RuntimeError(f"sbert-flax seed {seed}: {len(train)} train records in metrics.jsonl")
    return {"model_dir": os.path.join(out, "best_model"), "peak_rss_mb": rss, "run_seconds": wall,
            "train_records": [{k: r[k] for k in ("step", "time", "loss")} for r in train],
            "final_loss": train[-1]["loss"]}


def speeds(st: dict, fx: dict, n_rows: int, batch: int) -> None:
    """"pairs_per_s" of both sides over the same step window (see the module docstring)."""
    recs = fx["train_records"]
    s1, s2 = recs[0]["step"], recs[-1]["step"]
    pairs = [min(batch, n_rows - k * batch) for k in range(s2)]
    fx["pairs_per_s"] = sum(pairs[s1:s2]) / (recs[-1]["time"] - recs[0]["time"])
    st["pairs_per_s"] = sum(pairs[s1:s2]) / (st["step_end"][s2] - st["step_end"][s1])
    st["window"] = fx["window"] = [s1 + 1, s2]


def evaluate(dirs: list[str], work: str, tag: str) -> dict:
    log = os.path.join(work, f"eval-{tag}.log")
    with open(log, "w", encoding="utf-8") as f:
        r = subprocess.run([sys.executable, __file__, "--child", "eval", "--eval-dirs", *dirs],
                           stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"evaluation {tag} failed:\n{_tail(log)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- report ----------------------------------------------------------------------------------

def _ms(xs: list[float], fmt: str, sign: str = "") -> str:
    """Mean +- sample standard deviation (0 for a single value)."""
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{mean:{sign}{fmt}} +- {std:{fmt}}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(results: list[dict]) -> str:
    seeds = ",".join(str(r["seed"]) for r in results)
    w = results[0]["st"]["window"]
    steps = results[0]["st"]["steps"]
    lines = [f"ce-bce on STS-B-zh binary pairs (seeds {seeds}; n = {len(results)} per side; "
             f"{steps} steps of {results[0]['batch_size']}; speed window steps {w[0]}..{w[1]})",
             "", "| | sentence-transformers | sbert-flax | difference / ratio |",
             "|---|---|---|---|"]
    for key, name in (("accuracy", "STS-B-zh test binary accuracy"),
                      ("auc", "STS-B-zh test binary ROC AUC"),
                      ("spearman", "STS-B-zh test Spearman (graded)"),
                      ("final_loss", "last logged training loss")):
        a, b = [r["st"][key] for r in results], [r["flax"][key] for r in results]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        lines.append(f"| {name} | {_ms(a, '.4f')} | {_ms(b, '.4f')} | {_ms(diffs, '.4f', '+')} |")
    a, b = [r["st"]["pairs_per_s"] for r in results], [r["flax"]["pairs_per_s"] for r in results]
    lines.append(f"| training pairs/s | {_ms(a, '.1f')} | {_ms(b, '.1f')} | "
                 f"{_mean(b) / _mean(a):.2f}x |")
    # Process figures of the runs that recorded them (a run resumed by hand may not have).
    measured = [r for r in results if "peak_rss_mb" in r["st"] and "peak_rss_mb" in r["flax"]]
    if measured:
        n = "" if len(measured) == len(results) else f" (n = {len(measured)})"
        a, b = ([r["st"]["peak_rss_mb"] for r in measured],
                [r["flax"]["peak_rss_mb"] for r in measured])
        lines.append(f"| peak RSS (MB){n} | {_ms(a, '.0f')} | {_ms(b, '.0f')} | "
                     f"{_mean(b) / _mean(a):.2f}x |")
        a, b = ([r["st"]["run_seconds"] for r in measured],
                [r["flax"]["run_seconds"] for r in measured])
        lines.append(f"| training process wall time (s){n} | {_ms(a, '.0f')} | {_ms(b, '.0f')} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="init model folder (default: m3e-small)")
    ap.add_argument("--seeds", default="7,8,9")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--results", default=None,
                    help="JSON file for every run's figures (default: bench/results/"
                    "cross-encoder-DATE.json, with the table beside it as .md)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (models, logs)")
    ap.add_argument("--report", nargs="+", metavar="RESULTS_JSON",
                    help="only print the table of saved runs")
    ap.add_argument("--child", choices=["st", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--train-path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--eval-dirs", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "eval":
        return child_eval(args)
    if args.child == "st":
        return child_st(args)
    if args.report:
        runs = []
        for path in args.report:
            with open(path, encoding="utf-8") as f:
                runs += json.load(f)["runs"]
        print(table(runs))
        return None

    from sbert_flax.common.devdata import data_path, reference_model

    args.model = args.model or reference_model("m3e-small")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.sbert_flax = shutil.which("sbert-flax")
    if not args.sbert_flax:
        sys.exit("the sbert-flax console script is not on PATH: pip install -e .")
    src = data_path("stsb-zh", "train.tsv")
    if not src:
        sys.exit("shared data not found: stsb-zh/train.tsv (set SBERT_FLAX_DATA)")
    work = tempfile.mkdtemp(prefix="sbert-flax-ce-bench-")
    train_path = os.path.join(work, "stsb-zh-binary-train.tsv")
    rows = binary_pairs(src)
    with open(train_path, "w", encoding="utf-8") as f:
        f.write("text_a\ttext_b\tlabel\n")
        f.writelines(f"{a}\t{b}\t{y}\n" for a, b, y in rows)
    print(f"model {args.model}; {len(rows)} training pairs; work dir {work}", flush=True)
    date = datetime.date.today().isoformat()
    results_path = args.results or os.path.join(REPO, "bench", "results",
                                                f"cross-encoder-{date}.json")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    runs: list[dict] = []
    for seed in seeds:
        t0 = time.time()
        st = run_st(args, seed, train_path, work)
        fx = run_flax(args, seed, train_path, work)
        speeds(st, fx, len(rows), args.batch_size)
        scores = evaluate([st["model_dir"], fx["model_dir"]], work, str(seed))
        st.update(scores[st["model_dir"]])
        fx.update(scores[fx["model_dir"]])
        st.pop("step_end")
        fx.pop("train_records")
        runs.append({"seed": seed, "rows": len(rows), "batch_size": args.batch_size,
                     "st": st, "flax": fx})
        print(f"seed {seed} ({time.time() - t0:.0f} s): st acc {st['accuracy']:.4f} auc "
              f"{st['auc']:.4f} rho {st['spearman']:.4f} {st['pairs_per_s']:.1f} pairs/s | flax "
              f"acc {fx['accuracy']:.4f} auc {fx['auc']:.4f} rho {fx['spearman']:.4f} "
              f"{fx['pairs_per_s']:.1f} pairs/s", flush=True)
        doc = {"command": " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
               "commit": commit, "date": date,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
               "config": {k: getattr(args, k) for k in ("batch_size", "lr", "seq_length",
                                                        "weight_decay", "max_steps", "threads")},
               "runs": runs}
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    text = table(runs)
    with open(os.path.splitext(results_path)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(f"`{doc['command']}` at {commit[:12]} on {doc['machine']}\n\n{text}\n")
    print(text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
