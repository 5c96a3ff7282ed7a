"""Two processes x 4 CPU devices (gloo, loopback) train to the same params as 1 process x 8:
the siamese trainer end to end, and the mnrl step (in-batch negatives across the two hosts)."""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import helpers
import jax
import multihost_driver
import numpy as np
import pytest

from sbert_flax.common import sharding
from sbert_flax.training.train_config import TrainConfig
from sbert_flax.training.trainer import train_and_evaluate

DRIVER = os.path.join(helpers.TESTS, "multihost_driver.py")
TIMEOUT_S = 300  # two processes compile at once; a shared 2-core machine needs minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_pairs(path: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sents = helpers.random_zh_sentences(n, 2, 10, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text_a\ttext_b\tlabel\n")
        for i, s in enumerate(sents):
            same = bool(rng.integers(2))
            f.write(f"{s}\t{s if same else sents[(i + 1) % n]}\t{int(same)}\n")


def _run_two_processes(out_dir, *jobs: str, timeout_s: float = TIMEOUT_S) -> None:
    """Runs the driver as processes 0 and 1 of a loopback cluster; kills both on any failure.

    Each process logs to OUT_DIR/proc{i}.log. A run past the timeout is aborted with SIGABRT, so
    that faulthandler prints every thread's Python stack, and the failure shows both logs: a hang
    says where it hangs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(DRIVER)), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs, logs = [], [os.path.join(str(out_dir), f"proc{pid}.log") for pid in range(2)]

    def tails() -> str:
        return "\n".join(f"--- process {pid} ---\n{open(path, errors='replace').read()[-4000:]}"
                         for pid, path in enumerate(logs))

    try:
        for pid in range(2):
            with open(logs[pid], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, DRIVER, str(port), str(pid), str(out_dir), *jobs],
                    env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGABRT)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
            pytest.fail(f"the 2-process run did not finish in {timeout_s} s:\n{tails()}")
        for pid, p in enumerate(procs):
            assert p.returncode == 0, f"process {pid} failed:\n{tails()}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_bert):
    """One 2-process cluster start for both tests: the siamese trainer end to end, then the mnrl
    step. Returns (output folder, the trainer config)."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    model = tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64)
    _write_pairs(str(tmp_path / "train.tsv"), 72, seed=1)  # 5 batches of 16, the last padded
    _write_pairs(str(tmp_path / "dev.tsv"), 24, seed=2)
    cfg = TrainConfig(pretrained_model_path=model, train_path=str(tmp_path / "train.tsv"),
                      dev_path=str(tmp_path / "dev.tsv"), epochs_num=1, batch_size=16, seq_length=16,
                      learning_rate=1e-3, param_sharding="fsdp", mesh_fsdp=2, export=True,
                      progress_bar=False, output_dir=str(tmp_path / "multi"))
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(json.dumps(cfg.to_dict()))
    _run_two_processes(tmp_path, str(cfg_json), "--mnrl")
    return tmp_path, cfg


def test_two_processes_equal_one_process(cluster_run):
    tmp_path, cfg = cluster_run
    # The same run in this process (8 devices, one process).
    summary = train_and_evaluate(dataclasses.replace(cfg, output_dir=str(tmp_path / "single")))
    assert dict(summary["params"]["classifier"]["kernel"].sharding.mesh.shape) == {"data": 4, "fsdp": 2}
    single = _flat(sharding.host_tree(summary["params"], summary["params"]["classifier"]["kernel"]
                                      .sharding.mesh))
    multi = dict(np.load(tmp_path / "params.npz"))
    assert sorted(multi) == sorted(single)
    for k, b in single.items():
        err = np.max(np.abs(multi[k] - b)) / np.max(np.abs(b))
        assert err <= 1e-5, (k, err)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist[0]["accuracy"] == pytest.approx(summary["history"][0]["accuracy"])


def test_mnrl_two_processes_equal_one_process(cluster_run):
    """Each process holds half the anchors, positives and negatives (and its own padding rows);
    every anchor must still be scored against all of them: 3 mnrl steps equal 1 process x 8."""
    tmp_path, _ = cluster_run
    seen, params = multihost_driver.mnrl_run()
    np.testing.assert_allclose(json.loads((tmp_path / "losses.json").read_text()), seen, rtol=1e-5)
    single, multi = _flat(params), dict(np.load(tmp_path / "mnrl_params.npz"))
    assert sorted(multi) == sorted(single)
    for k, b in single.items():
        err = np.max(np.abs(multi[k] - b)) / np.max(np.abs(b))
        assert err <= 1e-5, (k, err)
