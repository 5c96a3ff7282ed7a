"""`bench/gpu_check.sh --dry-run`: the GPU lease's script, end to end on the CPU at toy size.

A GPU lease is a few minutes with no second try, so the script that spends it must not rot: this
runs every part (preflight, encode, train, sentence-transformers) as the lease would, then checks
that the JSON holds every section with positive rates and profiles whose parsing found ops (on a
CPU the trace has no device streams: the XLA ops on the host threads stand in).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from sbert_flax.common.devdata import data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ("stsb-zh/test.tsv", "contrastive/nli-zh-pairs.tsv", "vocab/google_zh_vocab.txt")

sys.path.insert(0, os.path.join(REPO, "bench"))
from gpu import profiling  # noqa: E402  (bench/gpu/profiling.py)


def _check_profile(prof: dict, where: str) -> None:
    assert prof["source"] in ("device-streams", "device", "host-xla-ops"), (where, prof)
    assert prof["events"] > 0 and prof["busy_s"] > 0, (where, prof)
    assert 0 < prof["busy_fraction_of_span"] <= 1.0 + 1e-6, (where, prof)
    ops = prof["top_ops"]
    assert 0 < len(ops) <= 10, (where, ops)
    assert all(op["ms"] >= 0 and 0 <= op["share"] <= 1 for op in ops), (where, ops)
    assert ops == sorted(ops, key=lambda o: -o["ms"]), where


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    missing = [p for p in NEEDED if not os.path.isfile(os.path.join(data_dir(), p))]
    if missing:
        pytest.skip(f"shared data missing under {data_dir()}: {missing}")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "JAX_PLATFORMS": "cpu", "SBERT_FLAX_DATA": data_dir(),
           "MODEL": str(tmp_path / "model"), "GPU_CHECK_TRACES": str(tmp_path / "traces")}
    # A ceiling against a hang, not a speed test: the dry run has no time limits of its own
    # (a part that skipped work for time would make this verdict depend on the machine).
    try:
        r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("bench/gpu_check.sh --dry-run did not finish within 3600 s; its "
                             f"output so far:\n{(e.stdout or b'')[-4000:]!r}") from None
    log = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, log
    (path,) = glob.glob(str(out / "gpu-*.json"))
    d = json.loads(open(path, encoding="utf-8").read())

    assert d["env"]["device"]["platform"] == "cpu" and d["env"]["dry_run"] is True
    assert d["env"]["versions"]["jax"] and d["env"]["modules"]["flax"]
    assert [s["part"] for s in d["steps"]] == ["preflight", "encode", "train", "st-encode"], d["steps"]
    assert all(s["rc"] == 0 and s["wall_s"] > 0 for s in d["steps"]), d["steps"]

    enc = d["encode"]
    assert enc["sentences"] >= 2722 and set(enc["budgets"]) == {"512", "2048"}
    for key, b in enc["budgets"].items():
        assert "error" not in b, b
        for rate in ("sentences_per_s", "tokens_per_s"):
            assert b[rate] > 0 and b["host"][rate] > 0, (key, b)
        assert b["steps_s"]["warmup"] > 0 and b["host"]["by_workers"], (key, b)
        assert all(h["sentences_per_s"] > 0 for h in b["host"]["by_workers"].values()), (key, b)
        _check_profile(b["profile"], f"encode {key}")
    # The first budget: the host side at 0 (tokenize and pack timed apart), 1 and 2 preparation
    # threads, and encode timed at 1 and 2.
    first = enc["budgets"]["512"]
    assert set(first["host"]["by_workers"]) == {"0", "1", "2"}, first["host"]
    assert first["host"]["tokenize_s"] > 0 and first["host"]["pack_s"] > 0, first["host"]
    assert set(first["sentences_per_s_by_host_workers"]) == {"1", "2"}, first
    assert all(first["variants"][k] > 0 for k in ("one_call_a_window", "in_flight_8",
                                                  "switch_interval_0.2ms", "dispatch_only",
                                                  "process_prep"))
    # cuDNN attention cannot run on a CPU: recorded as an error, not a crash.
    assert "error" in enc["extra"]["cudnn-1024"]

    tr = d["train"]
    ran = [c for c in tr["configs"] if "step_ms" in c]
    assert {(c["name"], c["prng_impl"], c["global_batch"]) for c in ran} == {
        ("xla", "threefry", 32), ("xla-rbg", "unsafe_rbg", 32)}, tr["configs"]
    for c in ran:
        assert c["finite"] and c["compilations"] == 1, c
        for rate in ("step_ms", "sentences_per_s", "tokens_per_s", "model_tflops_per_s"):
            assert c[rate] > 0, c
        assert c["mfu"] is None  # no peak FLOP/s for a CPU
        _check_profile(c["profile"], f"train {c['name']} {c['global_batch']}")
    assert all(("error" in c) or ("skipped" in c) or ("step_ms" in c) for c in tr["configs"])
    assert tr["batches"]["32"]["real_tokens_per_batch"] > 0
    assert "error" in next(c for c in tr["configs"] if c["name"] == "cudnn-rbg"), tr["configs"]

    st = d["st_encode"]
    assert st["sentences_per_s"] > 0 and st["sbert_flax_over_st"] > 0


def test_profile_parsing_of_a_gpu_trace():
    """The device path (which a CPU never produces): stream lines counted, summary lines not."""
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "process_name", "pid": 701, "args": {"name": "/host:CPU"}}]
    kernels = [{"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 40, "name": "gemm",
                "args": {"hlo_op": "dot.1"}},
               {"ph": "X", "pid": 1, "tid": 7, "ts": 50, "dur": 30, "name": "gemm"},
               {"ph": "X", "pid": 1, "tid": 7, "ts": 80, "dur": 10, "name": "MemcpyD2H"},
               {"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": 90, "name": "fusion.1"},
               {"ph": "X", "pid": 701, "tid": 3, "ts": 0, "dur": 500, "name": "PjitFunction(f)"}]
    s = profiling.summarize(meta + kernels, wall_s=200e-6)
    assert s["source"] == "device-streams" and s["events"] == 3
    assert s["busy_s"] == pytest.approx(80e-6) and s["busy_fraction"] == pytest.approx(0.4)
    assert s["compute_busy_fraction"] == pytest.approx(0.35)
    assert s["busy_fraction_of_span"] == pytest.approx(80 / 90)
    assert [(o["name"], o["count"], o["hlo_op"]) for o in s["top_ops"]] == [
        ("gemm", 2, "dot.1"), ("MemcpyD2H", 1, None)]
    assert s["top_ops"][0]["ms"] == pytest.approx(0.07) and s["top_ops"][0]["share"] == pytest.approx(0.875)


def test_nested_host_ops_count_self_time():
    """XLA:CPU thunks nest (a while loop holds its body): the parent keeps only its own time."""
    ev = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 100, "name": "while", "args": {"hlo_op": "w"}},
          {"ph": "X", "pid": 1, "tid": 1, "ts": 10, "dur": 30, "name": "dot", "args": {"hlo_op": "d"}},
          {"ph": "X", "pid": 1, "tid": 1, "ts": 50, "dur": 20, "name": "dot", "args": {"hlo_op": "d"}}]
    s = profiling.summarize(ev, wall_s=1e-3)
    assert s["source"] == "host-xla-ops" and s["busy_s"] == pytest.approx(100e-6)
    assert {o["name"]: o["ms"] for o in s["top_ops"]} == pytest.approx({"dot": 0.05, "while": 0.05})
