"""Profiling a measured stretch: a `jax.profiler` trace, then its device busy time and top ops.

`traced` records a block's trace under `sizes.TRACE_ROOT`, `profile_summary` parses it (`summarize`
on the trace file) into what the result JSON keeps.

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes
`dir/plugins/profile/<run>/perfetto_trace.json.gz`: Chrome trace events, one process per plane.
On a GPU the device planes are processes named `/device:GPU:N`; their kernels and copies sit on
threads named `Stream #N(...)`, beside derived summary lines ("XLA Modules", "XLA Ops", "Steps",
...) that repeat the same time and are left out here. On a CPU there is no device plane: XLA's
thunks run on the host's threads as events whose args name an `hlo_op`, and those stand in.

`summarize` says which was used (`source`): "device-streams", "device" (a device plane without
stream lines: every non-derived line), "host-xla-ops", or "none" (nothing recognisable: the
fractions are null and the op list empty).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import time
from collections.abc import Iterable

from gpu.sizes import TRACE_ROOT

# ---- parsing -------------------------------------------------------------------------------------

# Lines of a device plane that summarise the stream lines rather than add to them.
DERIVED_LINES = re.compile(r"^(XLA Modules|XLA Ops|Async XLA Ops|XLA TraceMe|Steps|Framework Ops|"
                           r"Framework Name Scope|Source code|TensorFlow Name Scope|TensorFlow Ops|"
                           r"Launch Stats|SparseCore.*)$", re.IGNORECASE)
COPY_NAMES = re.compile(r"memcpy|memset|MemcpyH2D|MemcpyD2H|MemcpyD2D", re.IGNORECASE)


def find_trace(trace_dir: str) -> str | None:
    """The newest perfetto (else Chrome) trace file under `trace_dir`, or None."""
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
        found = glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)
        if found:
            return max(found, key=os.path.getmtime)
    return None


def load_events(path: str) -> list[dict]:
    """The trace's events (a `{"traceEvents": [...]}` object or a bare list), gzip or plain."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data.get("traceEvents", []) if isinstance(data, dict) else list(data)


def _names(events: Iterable[dict]) -> tuple[dict, dict]:
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = (e.get("args") or {}).get("name", "")
        if e.get("name") == "process_name":
            procs[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = name
    return procs, threads


def select_device_events(events: list[dict]) -> tuple[str, list[dict]]:
    """(source, complete events that are device work); see the module docstring."""
    procs, threads = _names(events)
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    device_pids = {pid for pid, n in procs.items() if "/device:" in n and "cpu" not in n.lower()}
    if device_pids:
        lines = {k: n for k, n in threads.items() if k[0] in device_pids}
        streams = {k for k, n in lines.items() if n.lower().startswith("stream")}
        if streams:
            return "device-streams", [e for e in complete
                                      if (e.get("pid"), e.get("tid")) in streams]
        keep = {k for k, n in lines.items() if not DERIVED_LINES.match(n)}
        picked = [e for e in complete if e.get("pid") in device_pids
                  and ((e.get("pid"), e.get("tid")) in keep
                       or (e.get("pid"), e.get("tid")) not in lines)]
        if picked:
            return "device", picked
    host = [e for e in complete if "hlo_op" in (e.get("args") or {})]
    if host:
        return "host-xla-ops", host
    return "none", []


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, its duration less that of the events nested inside it on the same thread).

    Device streams do not nest; XLA:CPU's thunks do (a while loop holds its body's ops), and
    counting both would count the body twice."""
    by_line: dict = collections.defaultdict(list)
    for e in events:
        by_line[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for line in by_line.values():
        line.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [event, end, child time]
        for e in line:
            s, d = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][1] <= s:
                done = stack.pop()
                out.append((done[0], float(done[0]["dur"]) - done[2]))
            if stack:
                stack[-1][2] += min(d, stack[-1][1] - s)
            stack.append([e, s + d, 0.0])
        out += [(x[0], float(x[0]["dur"]) - x[2]) for x in stack]
    return out


def summarize(events: list[dict], wall_s: float, top: int = 10) -> dict:
    """Busy fractions and the `top` ops by device time of a trace that covered `wall_s` seconds.

    Returns:
      source, events (count), busy_s (union of device events), busy_fraction (of `wall_s`),
      span_s (first device event start to last end), busy_fraction_of_span,
      compute_busy_fraction (copies and memsets left out), device_time_s (sum of self times),
      top_ops: [{name, ms, share, count, hlo_op}] with `share` of device_time_s.
    """
    source, picked = select_device_events(events)
    out: dict = {"source": source, "events": len(picked), "wall_s": wall_s, "busy_s": None,
                 "busy_fraction": None, "span_s": None, "busy_fraction_of_span": None,
                 "compute_busy_fraction": None, "device_time_s": None, "top_ops": []}
    if not picked:
        return out
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in picked]
    busy = union_us(spans) / 1e6
    compute = union_us(s for s, e in zip(spans, picked, strict=True)
                       if not COPY_NAMES.search(e.get("name", ""))) / 1e6
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e6
    totals: dict = collections.defaultdict(lambda: [0.0, 0, None])
    for e, t in self_times(picked):
        row = totals[e.get("name", "?")]
        row[0] += t
        row[1] += 1
        if row[2] is None:
            row[2] = (e.get("args") or {}).get("hlo_op")
    device_time = sum(r[0] for r in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    out.update(busy_s=busy, span_s=span, compute_busy_fraction=compute / wall_s if wall_s else None,
               busy_fraction=busy / wall_s if wall_s else None,
               busy_fraction_of_span=busy / span if span else None, device_time_s=device_time / 1e6,
               top_ops=[{"name": name[:200], "ms": t / 1e3,
                         "share": t / device_time if device_time else 0.0, "count": n, "hlo_op": op}
                        for name, (t, n, op) in ranked])
    return out


def summarize_dir(trace_dir: str, wall_s: float, top: int = 10) -> dict:
    """`summarize` of the trace under `trace_dir` (source "none" with a reason when absent)."""
    path = find_trace(trace_dir)
    if path is None:
        return {"source": "none", "error": f"no trace file under {trace_dir}", "top_ops": []}
    out = summarize(load_events(path), wall_s, top)
    out["trace_mb"] = os.path.getsize(path) / 2**20
    return out


# ---- recording -----------------------------------------------------------------------------------

@contextlib.contextmanager
def traced(name: str):
    """A `jax.profiler` trace into TRACE_ROOT/name; yields a dict that gets the trace's dir."""
    import jax

    d = os.path.join(TRACE_ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, exist_ok=True)
    info = {"dir": d}
    with jax.profiler.trace(d, create_perfetto_trace=True):
        yield info


def profile_summary(info: dict, wall_s: float) -> dict:
    """`summarize_dir` of a `traced` block that took `wall_s`, with the parse's own time."""
    t = time.perf_counter()
    out = summarize_dir(info["dir"], wall_s)
    out["parse_s"] = round(time.perf_counter() - t, 3)
    return out
