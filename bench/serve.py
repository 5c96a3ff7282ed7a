"""Benchmark: `sbert-flax serve` vs Infinity vs a direct `encode`, side by side on one machine.

Closed-loop clients at each concurrency (default 1, 8, 32, 128) send STS-B-zh test sentences,
1-8 per request (a fixed random sequence of requests), to
  (a) `sbert-flax serve` (POST /v1/embeddings),
  (b) Infinity (`infinity_emb v2`, torch engine, POST /embeddings), when its virtualenv exists,
  (c) no server: `SentenceEncoder.encode` of all the sentences in one call (the ceiling).
Reports sentences/s, p50/p99 request latency, the ratios (a)/(c) and (a)/(b), and sentences per
CPU-second of the server process (of this process for (c)): on a shared machine wall-clock rates
move with the other load, CPU-time rates much less. The load generator runs in this process, on
the same cores as the server, as a client on the host would.

Infinity lives in its own virtualenv (its pins must not touch ours); create it once with
    python -m venv ~/.cache/sbert_flax/infinity-venv
    ~/.cache/sbert_flax/infinity-venv/bin/pip install "infinity-emb[server,torch,optimum]==0.0.78" "torch==2.13.0"
and pass `--infinity-venv` if it lives elsewhere; without it (b) is skipped with the reason.

After each level the server's /metrics gives the device batches of that level
(`te_batch_next_size`: how many, inputs per batch, their spread over the buckets).

    python bench/serve.py                              # m3e-small, 15 s per level
    python bench/serve.py --seconds 5 --concurrency 1,32 --no-infinity   # quicker
    python bench/serve.py --model bert-base --concurrency 1,32 --no-infinity  # issue 16's case
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "sbert_flax", "infinity-venv")


def load_sentences() -> list[str]:
    from sbert_flax.common.devdata import data_path

    path = data_path("stsb-zh", "test.tsv")
    if path is None:
        sys.exit("STS-B-zh test.tsv not found: set SBERT_FLAX_DATA to the shared data folder")
    sents = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            sents += line.rstrip("\n").split("\t")[:2]
    return sents


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: str) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            with open(log, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{f.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s (log: {log})")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc; None elsewhere.

    Sentences per server CPU-second measure efficiency apart from what else the machine runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def _load(url: str, path: str, model: str, requests: list[list[str]], concurrency: int,
                seconds: float, pid: int) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request as soon as the last
    one is answered, for `seconds` after a warm-up round."""
    import httpx

    latencies: list[float] = []
    sentences = 0
    cursor = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def send(texts: list[str]) -> None:
            r = await client.post(path, json={"model": model, "input": texts})
            if r.status_code != 200:
                raise RuntimeError(f"{url}{path}: {r.status_code} {r.text[:300]}")
            if len(r.json()["data"]) != len(texts):
                raise RuntimeError(f"{url}{path}: wrong number of embeddings")

        await asyncio.gather(*(send(requests[i % len(requests)]) for i in range(concurrency)))
        end = time.perf_counter() + seconds

        async def client_loop() -> None:
            nonlocal cursor, sentences
            while time.perf_counter() < end:
                texts = requests[cursor % len(requests)]
                cursor += 1
                t0 = time.perf_counter()
                await send(texts)
                latencies.append(time.perf_counter() - t0)
                sentences += len(texts)

        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed, cpu1 = time.perf_counter() - t0, cpu_seconds(pid)
    lat = sorted(latencies)
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    return {"sent_per_s": sentences / elapsed, "requests": len(lat),
            "sent_per_cpu_s": sentences / cpu if cpu else None,
            "p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def batch_histogram(url: str, name: str = "te_batch_next_size") -> dict | None:
    """A histogram's cumulative buckets, sum and count from the server's /metrics (None: absent)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    out: dict = {"buckets": {}}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out["buckets"][le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum"):
            out["sum"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out if "count" in out else None


def batch_delta(before: dict | None, after: dict | None) -> dict | None:
    """The batches of one level: after - before, per bucket (not cumulative), mean size."""
    if before is None or after is None:
        return None
    count = after["count"] - before["count"]
    per, last = {}, 0.0
    for le, c in after["buckets"].items():
        cum = c - before["buckets"].get(le, 0.0)
        if cum - last:
            per[le] = int(cum - last)
        last = cum
    return {"batches": int(count), "mean_inputs": (after["sum"] - before["sum"]) / count if count
            else None, "per_bucket": per}


def run_levels(name: str, url: str, path: str, model: str, requests, levels, seconds, pid,
               metrics: bool = False) -> dict:
    out = {}
    for c in levels:
        hist0 = batch_histogram(url) if metrics else None
        r = asyncio.run(_load(url, path, model, requests, c, seconds, pid))
        r["batches"] = batch_delta(hist0, batch_histogram(url)) if metrics else None
        b = r["batches"]
        print(f"  {name} c={c}: {r['sent_per_s']:.1f} sent/s, p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms ({r['requests']} requests), "
              f"{r['sent_per_cpu_s'] or 0:.1f} sent per server CPU-s"
              + (f"; {b['batches']} device batches, {b['mean_inputs'] or 0:.1f} inputs each, "
                 f"by te_batch_next_size bucket (le: count) {b['per_bucket']}" if b else ""),
              flush=True)
        out[c] = r
    return out


def bench_direct(model: str, sentences: list[str], repeats: int) -> tuple[float, float]:
    """(c): one `encode` call over all the sentences, best of `repeats` after a warm-up pass."""
    import jax

    from sbert_flax import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(model, devices=jax.local_devices()[:1])
    enc.encode(sentences)
    best, best_cpu = 0.0, 0.0
    for _ in range(repeats):
        t0, cpu0 = time.perf_counter(), time.process_time()
        enc.encode(sentences)
        best = max(best, len(sentences) / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, len(sentences) / (time.process_time() - cpu0))
    return best, best_cpu


def bench_sbert_flax(model, requests, levels, seconds, extra_args, logdir) -> tuple[dict, float]:
    port = free_port()
    log = os.path.join(logdir, "sbert-flax-serve.log")
    cmd = [sys.executable, "-m", "sbert_flax.cli.serve", "--model", model, "--port",
           str(port), "--served-model-name", "bench", "--log-level", "warning", *extra_args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"))
    try:
        ready = wait_healthy(f"http://127.0.0.1:{port}", proc, 900, log)
        print(f"(a) sbert-flax serve ready in {ready:.0f} s", flush=True)
        return run_levels("(a) sbert-flax", f"http://127.0.0.1:{port}", "/v1/embeddings", "bench",
                          requests, levels, seconds, proc.pid, metrics=True), ready
    finally:
        stop(proc)


def bench_infinity(venv, model, requests, levels, seconds, batch_size, logdir) -> tuple[dict | None, str]:
    exe = os.path.join(venv, "bin", "infinity_emb")
    if not os.path.isfile(exe):
        return None, (f"skipped: {exe} not found (create the virtualenv as this script's "
                      "docstring says, or pass --infinity-venv)")
    port = free_port()
    log = os.path.join(logdir, "infinity.log")
    cmd = [exe, "v2", "--model-id", model, "--served-model-name", "bench", "--engine", "torch",
           "--device", "cpu", "--batch-size", str(batch_size), "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0"))
    try:
        ready = wait_healthy(f"http://127.0.0.1:{port}", proc, 900, log)
        print(f"(b) Infinity ready in {ready:.0f} s", flush=True)
        return run_levels("(b) Infinity", f"http://127.0.0.1:{port}", "/embeddings", "bench",
                          requests, levels, seconds, proc.pid), f"torch engine, batch size {batch_size}"
    except (RuntimeError, TimeoutError) as e:
        return None, f"skipped: Infinity did not start ({str(e)[-300:]})"
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: m3e-small from the reference models); "
                   "`bert-base`: a random BERT-base-sized Chinese BERT (bench/common.py)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed passes of the direct encode (0: skip it)")
    p.add_argument("--infinity-venv", default=DEFAULT_VENV)
    p.add_argument("--no-infinity", action="store_true")
    p.add_argument("--infinity-batch-size", type=int, default=32)
    p.add_argument("--serve-args", default="", help="extra `sbert-flax serve` flags, one string")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    # The server runs on the CPU (JAX_PLATFORMS=cpu below); so does the direct encode beside it.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sbert_flax.common.devdata import reference_model

    if args.model == "bert-base":
        from common import bert_base_dir

        model = bert_base_dir()
    else:
        model = args.model or reference_model("m3e-small")
    levels = [int(x) for x in args.concurrency.split(",")]
    sentences = load_sentences()
    rng = random.Random(args.seed)
    requests = [rng.sample(sentences, rng.randint(1, 8)) for _ in range(20000)]
    logdir = os.path.join(os.path.expanduser("~"), ".cache", "sbert_flax", "bench-serve")
    os.makedirs(logdir, exist_ok=True)
    print(f"model {model}; {len(sentences)} STS-B-zh sentences; {os.cpu_count()} CPUs; "
          f"{args.seconds:.0f} s per level", flush=True)

    direct, direct_cpu = bench_direct(model, sentences, args.repeats) if args.repeats else (0.0, 0.0)
    print(f"(c) direct encode: {direct:.1f} sent/s, {direct_cpu:.1f} sent per CPU-s"
          if args.repeats else "(c) direct encode: skipped (--repeats 0)", flush=True)
    a, a_ready = bench_sbert_flax(model, requests, levels, args.seconds, args.serve_args.split(),
                                  logdir)
    b, b_note = (None, "skipped: --no-infinity") if args.no_infinity else bench_infinity(
        args.infinity_venv, model, requests, levels, args.seconds, args.infinity_batch_size, logdir)

    print("\n| concurrency | (a) sbert-flax serve sent/s | p50 / p99 ms | (b) Infinity sent/s | "
          "p50 / p99 ms | (c) direct encode sent/s | (a)/(c) | (a)/(b) | sent per server CPU-s "
          "(a) / (b) / (c) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        ra, rb = a[c], (b or {}).get(c)
        bcol = (f"{rb['sent_per_s']:.1f} | {rb['p50_ms']:.0f} / {rb['p99_ms']:.0f}" if rb
                else "- | -")
        ratio_b = f"{ra['sent_per_s'] / rb['sent_per_s']:.2f}" if rb else "-"
        eff = " / ".join(f"{x:.1f}" if x else "-" for x in (
            ra["sent_per_cpu_s"], rb and rb["sent_per_cpu_s"], direct_cpu))
        print(f"| {c} | {ra['sent_per_s']:.1f} | {ra['p50_ms']:.0f} / {ra['p99_ms']:.0f} | {bcol} | "
              f"{direct:.1f} | {ra['sent_per_s'] / direct if direct else 0:.2f} | {ratio_b} | "
              f"{eff} |")
    print(f"\n(b): {b_note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model, "direct_sent_per_s": direct,
                       "direct_sent_per_cpu_s": direct_cpu, "sbert_flax": a,
                       "sbert_flax_ready_s": a_ready, "infinity": b, "infinity_note": b_note},
                      f, indent=2)


if __name__ == "__main__":
    main()
