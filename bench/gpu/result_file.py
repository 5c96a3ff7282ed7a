"""The lease's result JSON file and its bookkeeping: sections merged in, part clock, summary.

Every part merges its section into one file, rewritten atomically after every measurement, so a
part that `timeout` kills still leaves what it measured. `record_step` appends a part's wall time
and exit code (the shell measures them); `summary` prints a short table of everything at the end
of the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from gpu.sizes import SCHEMA


def read_json(path: str) -> dict:
    """The JSON file at `path`; {} while it is absent or unreadable (no part has written yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def update_json(path: str, section: str, value) -> None:
    """Sets `section` of the JSON file at `path` (temp file + rename: never half written)."""
    data = read_json(path)
    data.setdefault("schema", SCHEMA)
    data[section] = value
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


class Clock:
    """Wall time since the part started, a deadline, and timed, printed sub-steps."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    @contextlib.contextmanager
    def step(self, name: str, record: dict | None = None, key: str | None = None):
        t = time.perf_counter()
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        yield
        dt = time.perf_counter() - t
        if record is not None:
            record[key or name] = round(dt, 3)
        print(f"[{self.elapsed():6.1f}s] {name}: {dt:.2f} s", flush=True)


def error_text(e: BaseException) -> str:
    """An exception as the JSON records it: type and the message's first 800 characters."""
    return f"{type(e).__name__}: {str(e)[:800]}"


def close_item(rec: dict, t_item: float, worst: float | None, path: str, part: str,
               section: dict) -> float | None:
    """Stamps an item's wall time, rewrites the part's JSON; returns the longest successful item
    so far (what the next one may take, for the part's time budget)."""
    rec["wall_s"] = round(time.perf_counter() - t_item, 3)
    if "error" not in rec:
        worst = max(worst or 0.0, rec["wall_s"])
    update_json(path, part, section)
    return worst


def record_step(args) -> None:
    """Appends a part's wall time and exit code (as the shell saw them) to the "steps" list."""
    steps = read_json(args.json).get("steps", [])
    steps.append({"part": args.part, "wall_s": args.wall_s, "rc": args.rc,
                  "timed_out": args.rc in (124, 137)})
    update_json(args.json, "steps", steps)


def summary(args) -> None:
    """A short table of the JSON file's results, for the end of the log."""
    d = read_json(args.json)
    env = d.get("env", {})
    print(f"device {env.get('device', {}).get('kind')}; jax {env.get('modules', {}).get('jax')}, "
          f"flax {env.get('modules', {}).get('flax')}; commit {env.get('git', {}).get('commit')}")
    for s in d.get("steps", []):
        print(f"  part {s['part']}: {s['wall_s']:.1f} s, rc {s['rc']}")
    enc = d.get("encode", {})
    for key, r in {**enc.get("budgets", {}), **enc.get("extra", {})}.items():
        p = r.get("profile", {})
        print(f"encode {key}: " + (f"{r['sentences_per_s']:,.0f} sent/s, "
                                    f"{r['tokens_per_s']:,.0f} tok/s, host "
                                    f"{r.get('host', {}).get('sentences_per_s', 0):,.0f} sent/s "
                                    f"(by workers {r.get('sentences_per_s_by_host_workers')}), "
                                    f"busy {p.get('busy_fraction')} [{p.get('source')}]"
                                    if "sentences_per_s" in r
                                    else r.get("error") or r.get("skipped") or "?"))
    for r in d.get("train", {}).get("configs", []):
        head = (f"train {r['name']} ({r['attention_impl']}, {r.get('prng_impl')}) "
                f"b{r['global_batch']}: ")
        if "step_ms" in r:
            mfu = r.get("mfu")
            print(head + f"{r['step_ms']:.1f} ms, {r['sentences_per_s']:,.0f} sent/s, "
                  f"{r['tokens_per_s']:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}")
        else:
            print(head + str(r.get("error") or r.get("skipped") or "?"))
    st = d.get("st_encode", {})
    if "sentences_per_s" in st:
        print(f"sentence-transformers {st['dtype']}: {st['sentences_per_s']:,.0f} sent/s; "
              f"sbert-flax / ST {st.get('sbert_flax_over_st')}")
