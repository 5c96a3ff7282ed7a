"""README's "Before you launch on TPU" table, measured by `sbert-flax compile` on this CPU host.

BERT-base (Chinese vocab, 12 layers, hidden 768; the architecture is all that is compiled, so a
config.json stands in for the weights), mnrl, bf16, seq_length 128, on v5e-8 / v5e-16 / v5p-8 /
v4-8, global batch 1024 and 4096, replicated vs fsdp params, with and without remat. Each row is
one `sbert-flax compile ... --json` in its own process (as a user runs it). The JSON is rewritten
after every row, so an interrupted run keeps the rows it finished.

    nice -n 10 python bench/aot_table.py [--out bench/results/aot-DATE.json] [--only v5e-8]

Writes the JSON and the markdown table beside it (.md) and prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sbert_flax.common.files import atomic_write, write_json  # noqa: E402
from sbert_flax.models.config import BertConfig  # noqa: E402

# Slice name -> libtpu topology ("-8" counts TensorCores: v5p-8 and v4-8 are 4 megacore chips).
TOPOLOGIES = {"v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5p-8": "v5p:2x2x1", "v4-8": "v4:2x2x1"}
BATCHES = (1024, 4096)
SHARDINGS = ("replicated", "fsdp")
REMAT = (False, True)
SEQ_LENGTH = 128
GiB = 1024**3


def rows(only: list[str] | None, batches: list[int] | None = None,
         remat: tuple[bool, ...] = REMAT, shardings: tuple[str, ...] = SHARDINGS) -> list[dict]:
    """Every row, ordered so that an interrupted run has covered every slice: batch, then remat,
    then params, then the slice."""
    out = []
    for batch in batches or BATCHES:
        for with_remat in remat:
            for shard in shardings:
                for slice_name, topo in TOPOLOGIES.items():
                    if only and slice_name not in only:
                        continue
                    out.append({"slice": slice_name, "topology": topo, "batch_size": batch,
                                "param_sharding": shard, "remat": with_remat})
    return out


def run_row(row: dict, model: str, timeout: float, scan_with_remat: bool = False) -> dict:
    argv = [sys.executable, "-m", "sbert_flax.cli.main", "compile", "--topology", row["topology"],
            "--model", model, "--loss", "mnrl", "--batch_size", str(row["batch_size"]),
            "--seq_length", str(SEQ_LENGTH), "--bf16", "--param-sharding", row["param_sharding"],
            "--json"] + (["--remat"] if row["remat"] else [])
    if row["remat"] and scan_with_remat:
        # Before 3fd9530 `--remat` alone did not trace (TraceContextError: nnx.remat of a layer
        # under the rows' vmap); under `--scan_layers` the layer body was jax.checkpoint-ed.
        argv.append("--scan_layers")
        row = {**row, "scan_layers": True}
    # No persistent cache: a compile-only TPU executable is written but cannot be read back.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SBERT_FLAX_COMPILATION_CACHE": "0"}
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 3):
        return {**row, "error": p.stderr.strip()[-2000:], "returncode": p.returncode,
                "wall_seconds": round(wall, 1)}
    rep = json.loads(p.stdout)
    return {**row, "returncode": p.returncode, "wall_seconds": round(wall, 1),
            "command": " ".join(["sbert-flax"] + argv[3:]), "report": rep}


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def markdown(results: list[dict]) -> str:
    head = ("| slice (topology) | global batch | params | remat | GiB per chip (args / temp / total) "
            "| HBM GiB | fits | TFLOPs per step (XLA) | model TFLOPs | compile s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results:
        rep = r.get("report")
        if rep is None:
            why = ("--remat did not trace then (TraceContextError; fixed in 3fd9530)"
                   if "TraceContextError" in r.get("error", "") else "failed: see the JSON")
            lines.append(f"| {r['slice']} ({r['topology']}) | {r['batch_size']} | "
                         f"{r['param_sharding']} | {'yes' if r['remat'] else 'no'} | {why} "
                         "| | | | | |")
            continue
        b = rep["bytes_per_chip"]
        remat = ("yes (with --scan_layers)" if r.get("scan_layers") else "yes") if r["remat"] else "no"
        fits = "yes" if rep["fits"] else ("no (XLA refused)" if rep.get("error") else "no")
        sizes = (f"{_gib(b['arguments'])} / {_gib(b['temp'])} / {_gib(b['total'])}"
                 if b["total"] is not None else "-")
        oom = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)",
                        rep.get("error") or "")
        if oom:  # XLA's own words: its temporaries alone against the HBM it may use
            sizes = f"XLA: temporaries {oom.group(1)} > {oom.group(2)} usable"
        tflops = "-" if rep["flops_per_step"] is None else f"{rep['flops_per_step'] / 1e12:.1f}"
        if r.get("scan_layers") and rep["flops_per_step"] is not None:
            tflops += " (scan: a layer counted once)"
        lines.append(f"| {r['slice']} ({r['topology']}) | {r['batch_size']} | {r['param_sharding']} | "
                     f"{remat} | {sizes} | {_gib(rep['hbm_bytes_per_chip'])} "
                     f"| {fits} | {tflops} | {model_tflops(r['batch_size']):.1f} | {rep['compile_seconds']:.0f} |")
    return head + "\n".join(lines) + "\n"


def model_tflops(batch_size: int) -> float:
    """Model FLOPs of the step (`training.flops`: 3 x forward, 2 texts per pair, every text
    `SEQ_LENGTH` tokens), TFLOPs: what XLA's count is compared against."""
    from sbert_flax.training.flops import train_flops_per_token

    return train_flops_per_token(BertConfig(), SEQ_LENGTH) * 2 * batch_size * SEQ_LENGTH / 1e12


def save(out: str, date: str, results: list[dict], planned: int) -> None:
    write_json(out, {"date": date, "model": "BERT-base (zh vocab 21128, 12 layers x 768, "
                     "intermediate 3072, 12 heads), config only", "loss": "mnrl", "bf16": True,
                     "seq_length": SEQ_LENGTH, "rows_done": len(results), "rows_planned": planned,
                     "rows": results})
    with atomic_write(os.path.splitext(out)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    today = datetime.date.today().isoformat()
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", f"aot-{today}.json"))
    ap.add_argument("--only", action="append", choices=tuple(TOPOLOGIES), help="these slices only")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    ap.add_argument("--jobs", type=int, default=2, help="rows compiled at once")
    ap.add_argument("--remat-only", action="store_true", help="only the remat rows")
    ap.add_argument("--no-remat-only", action="store_true", help="only the rows without remat")
    ap.add_argument("--sharding", action="append", choices=SHARDINGS, help="these params only")
    ap.add_argument("--scan-with-remat", action="store_true",
                    help="remat rows also pass --scan_layers (compiles one layer: faster)")
    ap.add_argument("--batch", action="append", type=int, choices=BATCHES, help="these batches only")
    ap.add_argument("--render", metavar="JSON", nargs="+",
                    help="only write --out's markdown (and JSON) from these results, merged in plan order")
    args = ap.parse_args()
    if args.render:
        from sbert_flax.common.files import read_json

        parts = [read_json(p) for p in args.render]
        key = {(r["slice"], r["batch_size"], r["param_sharding"], r["remat"]): i
               for i, r in enumerate(rows(None))}
        merged = {key[(r["slice"], r["batch_size"], r["param_sharding"], r["remat"])]: r
                  for part in parts for r in part["rows"]}
        save(args.out, parts[0]["date"], [merged[k] for k in sorted(merged)], len(key))
        print(markdown([merged[k] for k in sorted(merged)]))
        return 0
    remat = (True,) if args.remat_only else (False,) if args.no_remat_only else REMAT
    todo = rows(args.only, args.batch, remat, tuple(args.sharding or SHARDINGS))
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "config.json")  # BertConfig's defaults are BERT-base Chinese
        with open(model, "w", encoding="utf-8") as f:
            json.dump(BertConfig().to_hf_dict(), f)
        # Rows run `--jobs` at a time (each a process of its own); results are kept in plan order.
        done: dict[int, dict] = {}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_row, row, model, args.timeout, args.scan_with_remat): i for i, row in enumerate(todo)}
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                row = todo[i]
                try:
                    res = fut.result()
                except subprocess.TimeoutExpired:
                    res = {**row, "error": f"timed out after {args.timeout:.0f} s"}
                done[i] = res
                results = [done[k] for k in sorted(done)]
                rep = res.get("report") or {}
                print(f"[{len(done)}/{len(todo)}] {row['slice']} batch {row['batch_size']} "
                      f"{row['param_sharding']} remat={row['remat']}: fits={rep.get('fits')} total="
                      f"{_gib((rep.get('bytes_per_chip') or {}).get('total'))} GiB "
                      f"({res.get('wall_seconds', '-')} s)", flush=True)
                save(args.out, today, results, len(todo))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
