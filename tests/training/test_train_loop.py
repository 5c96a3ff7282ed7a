"""The training loop end to end at toy size: learning, compile counts, outputs, resume after
SIGKILL, SIGTERM, NaN, malformed data, UER inputs and the command line."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
import train_hooks

from sbert_flax.checkpoints.pretrained import load_pretrained
from sbert_flax.checkpoints.uer import hf_to_uer, read_uer_config
from sbert_flax.cli import train as cli
from sbert_flax.common.devdata import data_path
from sbert_flax.training.data import TRAIN_BUCKETS, bucket_of
from sbert_flax.training.train_config import TrainConfig
from sbert_flax.training.trainer import TrainingDiverged, train_and_evaluate

REPO = helpers.REPO
SCRIPT = os.path.join(REPO, "train", "run_classifier_siamese.py")
SUBPROCESS_TIMEOUT_S = 600  # a ceiling against a hang, not a speed bound


def write_pairs(path, n, seed, min_len=2, max_len=10, sts=False):
    """Synthetic task: two disjoint sets of 16 characters; each sentence draws from one set, and
    the label is 1 iff both sentences of a pair come from the same set. Nothing to memorise:
    every pair is new, only the set of each character can be learned. With `sts`, an STS file
    of the same task instead: no header, score 5 for a same-set pair, 0 otherwise."""
    chars = [c for c in helpers.random_zh_sentences(1, 400, 400, seed=0)[0]]
    sets = [list(dict.fromkeys(chars))[:16], list(dict.fromkeys(chars))[16:32]]
    rng = np.random.default_rng(seed)

    def sentence(k):
        return "".join(rng.choice(sets[k], rng.integers(min_len, max_len + 1)))

    with open(path, "w", encoding="utf-8") as f:
        if not sts:
            f.write("text_a\ttext_b\tlabel\n")
        for _ in range(n):
            ka, kb = rng.integers(2), rng.integers(2)
            f.write(f"{sentence(ka)}\t{sentence(kb)}\t{int(ka == kb) * (5 if sts else 1)}\n")
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64)


def _flat(tree):
    # orbax restores without a target give layer keys as strings ('0'); normalise to ints.
    return {re.sub(r"\['(\d+)'\]", r"[\1]", jax.tree_util.keystr(p)): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _env():
    # One CPU device, like the reference run below (sharding is proven in test_multidevice,
    # test_contrastive_step and test_multihost); compiled programs come from the session cache.
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=REPO)


def _args(cfg: TrainConfig, *extra):
    return [sys.executable, SCRIPT, "--pretrained_model_path", cfg.pretrained_model_path,
            "--train_path", cfg.train_path, "--dev_path", cfg.dev_path, "--epochs_num", str(cfg.epochs_num),
            "--batch_size", str(cfg.batch_size), "--seq_length", str(cfg.seq_length),
            "--learning_rate", str(cfg.learning_rate), "--save_every_steps", str(cfg.save_every_steps),
            "--output_dir", cfg.output_dir, "--no_export", "--no_progress_bar", *extra]


def _hooked(args: list[str], *hooks: str) -> list[str]:
    """`args` (python SCRIPT TRAIN_ARGS...) run through tests/train_hooks.py with `hooks`."""
    return [args[0], train_hooks.__file__, *hooks, "--", *args[2:]]


def _steps(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def test_learns_synthetic_task_and_writes_outputs(tmp_path, model, one_device):
    train = write_pairs(tmp_path / "train.tsv", 512, seed=1, max_len=40)
    dev = write_pairs(tmp_path / "dev.tsv", 128, seed=2, max_len=40)
    out = str(tmp_path / "run")
    # STS pairs of the same task: learning the task must show in the cosine similarity.
    sts = write_pairs(tmp_path / "sts.tsv", 64, seed=3, max_len=40, sts=True)
    cfg = TrainConfig(pretrained_model_path=model, train_path=train, dev_path=dev, test_path=dev,
                      sts_dev_path=sts, epochs_num=4, batch_size=32, seq_length=48, learning_rate=1e-3, pooling="mean",
                      output_dir=out, progress_bar=False, log_every_steps=5)
    t0 = time.perf_counter()
    summary = train_and_evaluate(cfg, devices=one_device)
    print(f"trained {summary['step']} steps in {time.perf_counter() - t0:.1f}s; history "
          f"{[round(h['accuracy'], 3) for h in summary['history']]}")
    assert summary["best"]["value"] >= 0.9
    # Same-set sentences share characters, so even the untrained model's mean-pooled cosine
    # ranks them somewhat higher; training must add to that. Measured: untrained 0.48, trained
    # 0.70 / 0.86 / 0.87 / 0.87 per epoch.
    from sbert_flax.inference.encoder import SentenceEncoder
    from sbert_flax.retrieval.sts import evaluate_sts

    untrained = evaluate_sts(SentenceEncoder.from_pretrained(
        model, pooling="mean", max_seq_length=48, devices=jax.devices()[:1]), sts)["spearman"]
    trained = summary["history"][-1]["sts_spearman"]
    print(f"STS Spearman: untrained {untrained:.3f}, per epoch "
          f"{[round(h['sts_spearman'], 3) for h in summary['history']]}")
    assert trained >= 0.75 and trained >= untrained + 0.2
    assert summary["test"]["accuracy"] >= 0.9
    # Lengths 2..40 chars (4..42 tokens) -> buckets 16, 32 and 48; both columns pad to one
    # (softmax): at most one compiled train step per bucket for all epochs.
    buckets = {bucket_of(n, 48, TRAIN_BUCKETS) for n in range(4, 43)}
    assert buckets == {16, 32, 48}
    assert 1 <= summary["train_step_traces"] <= len(buckets)
    assert 1 <= summary["eval_step_traces"] <= len(buckets)
    for name in ("config.json", "metrics.jsonl", "results.json", "train.log"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert any(f.startswith("events") for f in os.listdir(os.path.join(out, "tb")))
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    assert {"train", "dev"} <= {r["kind"] for r in recs}
    assert all(np.isfinite(r["loss"]) and "lr" in r and "sentences_per_s" in r
               for r in recs if r["kind"] == "train")
    assert TrainConfig.from_dict(json.load(open(os.path.join(out, "config.json")))) == cfg
    assert os.path.isfile(os.path.join(out, "best_model_pytorch", "modules.json"))
    enc = SentenceEncoder.from_pretrained(os.path.join(out, "best_model"), devices=jax.devices()[:1])
    assert enc.pooling.mode == "mean" and enc.max_seq_length == 48
    best = summary["best"]
    assert best["epoch"] == 1 + int(np.argmax([h["accuracy"] for h in summary["history"]]))


@pytest.fixture(scope="module")
def resume_run(tmp_path_factory, model):
    """The run the SIGKILL and SIGTERM tests interrupt and resume, trained once uninterrupted
    here, in a subprocess like theirs (one CPU device: XLA's CPU thread split, and so the last
    bits of a float sum, depend on the process's device count): (config, final params, dev
    accuracy per epoch). 10 steps an epoch x 2."""
    d = tmp_path_factory.mktemp("resume_run")
    cfg = TrainConfig(pretrained_model_path=model, train_path=write_pairs(d / "train.tsv", 150, seed=3),
                      dev_path=write_pairs(d / "dev.tsv", 40, seed=4), epochs_num=2,
                      batch_size=16, seq_length=16, learning_rate=1e-3, save_every_steps=3,
                      export=False, progress_bar=False, output_dir=str(d / "full"))
    r = subprocess.run(_args(cfg), env=_env(), capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(_steps(os.path.join(cfg.output_dir, "checkpoints"))) == 20
    res = json.load(open(os.path.join(cfg.output_dir, "results.json")))
    return (cfg, _resumed_params(os.path.join(cfg.output_dir, "checkpoints"), 20),
            [h["accuracy"] for h in res["history"]])


def assert_best_is_results(out: str) -> None:
    """`best/` holds one checkpoint, of the best `results.json` reports (what `best_model` is
    exported from)."""
    import orbax.checkpoint as ocp

    res = json.load(open(os.path.join(out, "results.json")))
    best_dir = os.path.join(out, "best")
    assert _steps(best_dir) == [res["best"]["step"]], (_steps(best_dir), res["best"])
    manager = ocp.CheckpointManager(best_dir, item_names=("meta",),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        meta = manager.restore(res["best"]["step"],
                               args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    assert meta["step"] == res["best"]["step"] and meta["best"] == res["best"], (meta, res["best"])


def _resumed_params(ckpt_dir, step):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        return _flat(ck.restore(os.path.join(ckpt_dir, str(step), "state"))["params"])


def test_kill_and_resume_equals_uninterrupted(tmp_path, resume_run):
    base, want, accuracy = resume_run
    cfg = dataclasses.replace(base, output_dir=str(tmp_path / "killed"))
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    proc = subprocess.Popen(_hooked(_args(cfg), "--step_delay", "0.4"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not _steps(ckpt_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert _steps(ckpt_dir), "no checkpoint appeared in time"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = _steps(ckpt_dir)
    assert killed_at and max(killed_at) < 20  # 10 steps/epoch x 2: it really stopped early
    r = subprocess.run(_args(cfg, "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stderr

    resumed = _resumed_params(ckpt_dir, 20)
    for k, v in want.items():
        np.testing.assert_allclose(resumed[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
    res = json.load(open(os.path.join(cfg.output_dir, "results.json")))
    assert [h["accuracy"] for h in res["history"]] == accuracy
    assert_best_is_results(cfg.output_dir)


def test_sigterm_saves_and_exits_preempted(tmp_path, resume_run):
    base, want, _ = resume_run
    cfg = dataclasses.replace(base, output_dir=str(tmp_path / "run"))
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    # No periodic checkpoints: the one SIGTERM saves (or the epoch end's) is what resume finds.
    proc = subprocess.Popen(_hooked(_args(cfg, "--save_every_steps", "0", "--log_every_steps", "1"),
                                    "--step_delay", "0.3"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and not (
                os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=600)  # saving on SIGTERM: a ceiling
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Not 0 (a scheduler would call the job done) and not 1/2 (failures): the requeue code.
    assert proc.returncode == 75, out[-3000:]
    assert "SIGTERM: saved checkpoint at step" in out and "--resume" in out
    assert "exit code 75" in out and cli.EXIT_PREEMPTED == 75
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    steps = _steps(ckpt_dir)
    assert steps and max(steps) < 20  # 10 steps/epoch x 2
    # What SIGTERM saved is a real resume point: continuing from it ends where an uninterrupted
    # run ends.
    r = subprocess.run(_args(cfg, "--save_every_steps", "0", "--resume"), env=_env(),
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {max(steps)} " in r.stderr, r.stderr[-3000:]
    assert max(_steps(ckpt_dir)) == 20
    resumed = _resumed_params(ckpt_dir, 20)
    for k, v in want.items():
        np.testing.assert_allclose(resumed[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, model, capsys):
    train = write_pairs(tmp_path / "train.tsv", 150, seed=7)
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({
        "pretrained_model_path": model, "train_path": train, "epochs_num": 1, "batch_size": 16,
        "seq_length": 16, "learning_rate": 1e-3, "save_every_steps": 2, "progress_bar": False,
        "output_dir": str(tmp_path / "run")}))
    # The config-file entry (`sbert-flax train --config FILE key=value`); step 5's loss is NaN.
    with train_hooks.installed(nan_at_step=5):
        rc = cli.main(["--config", str(cfg_file), "export=false"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "at step 5" in err and "last good checkpoint is step 4" in err
    import orbax.checkpoint as ocp

    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert _steps(str(ckpt_dir)) == [2, 4]
    with ocp.StandardCheckpointer() as ck:
        state = ck.restore(str(ckpt_dir / "4" / "state"))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
    with pytest.raises(TrainingDiverged, match="step 3"), train_hooks.installed(nan_at_step=3):
        train_and_evaluate(TrainConfig.from_json(str(cfg_file), {
            "output_dir": str(tmp_path / "run2"), "export": "false"}))


def test_config_files_of_earlier_runs_still_load():
    # Their config.json lists the retired test-hook fields, unset; a set one is refused.
    cfg = TrainConfig.from_dict({"loss": "mnrl", "debug_nan_at_step": None, "debug_step_delay": 0.0})
    assert cfg.loss == "mnrl" and not hasattr(cfg, "debug_nan_at_step")
    with pytest.raises(ValueError, match="debug_nan_at_step"):
        TrainConfig.from_dict({"debug_nan_at_step": 5})


CNLI_RAW = data_path("nli-zh", "cnli_dev_raw.txt")


@pytest.mark.skipif(CNLI_RAW is None, reason="shared/data/nli-zh/cnli_dev_raw.txt is absent")
def test_malformed_lines_stop_or_are_skipped(tmp_path, model, capsys, caplog):
    names = "entailment,neutral,contradiction"
    base = ["--pretrained_model_path", model, "--columns", "1,2,3", "--no_header", "--label_names", names,
            "--epochs_num", "1", "--batch_size", "16", "--seq_length", "16", "--no_progress_bar",
            "--no_export"]
    rc = cli.main(base + ["--train_path", CNLI_RAW, "--output_dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cnli_dev_raw.txt:" in err and "176" in err, err[-2000:]
    assert not os.path.exists(tmp_path / "a" / "checkpoints")  # stopped before training
    # Train on a small well-formed subset; the real file (as dev set) is read with --skip_bad_lines.
    subset = tmp_path / "subset.tsv"
    with open(CNLI_RAW, encoding="utf-8") as f:
        lines = [ln for ln in f.readlines()[:400] if len(ln.rstrip("\n").split("\t")) == 4][:64]
    subset.write_text("".join(lines), encoding="utf-8")
    rc = cli.main(base + ["--train_path", str(subset), "--dev_path", CNLI_RAW, "--skip_bad_lines",
                          "--eval_batch_size", "512", "--output_dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "skipped 176 malformed line(s)" in open(tmp_path / "b" / "train.log", encoding="utf-8").read()


def test_uer_checkpoint_and_config(tmp_path, model, caplog):
    import torch

    from sbert_flax.checkpoints import weight_maps as weights
    from sbert_flax.inference.encoder import SentenceEncoder

    hf = weights.read_weights(weights.find_weights_file(model))
    uer = hf_to_uer(hf, "single", 1)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in uer.items()}, tmp_path / "uer.bin")
    cfg_path = tmp_path / "sbert_config.json"
    cfg_path.write_text(json.dumps({
        "stream_0": {"emb_size": 32, "feedforward_size": 64, "hidden_size": 32, "hidden_act": "gelu",
                     "heads_num": 4, "layers_num": 1, "max_seq_length": 64, "dropout": 0.1,
                     "embedding": ["word", "pos", "seg"], "encoder": "transformer"},
        "pooling": "first", "tie_weights": True, "labels_num": 3, "learning_rate": 5e-5}))
    pooling, ignored = read_uer_config(str(cfg_path))
    assert pooling == "cls" and ignored == ["labels_num", "learning_rate"]
    pre = load_pretrained(str(tmp_path / "uer.bin"), vocab_path=helpers.zh_vocab_file(),
                          config_path=str(cfg_path), seq_length=32)
    ref = SentenceEncoder.from_pretrained(model, devices=jax.devices()[:1])
    assert pre.pooling == "cls" and pre.config == ref.config
    for k, v in _flat(ref.param_dict()).items():
        np.testing.assert_array_equal(_flat(pre.params)[k], v, err_msg=k)
    with pytest.raises(ValueError, match="vocab_path"):
        load_pretrained(str(tmp_path / "uer.bin"), config_path=str(cfg_path))


def test_cli_accepts_the_model_card_command():
    cfg, _ = cli._parse([
        "--pretrained_model_path", "models/google_zh_model.bin", "--vocab_path", "models/google_zh_vocab.txt",
        "--config_path", "models/sbert/base_config.json", "--train_path", "train.tsv", "--dev_path", "dev.tsv",
        "--learning_rate", "5e-5", "--epochs_num", "5", "--batch_size", "64", "--seq_length", "128",
        "--output_model_path", "models/sbert_nli.bin", "--embedding", "word", "pos", "seg",
        "--encoder", "transformer", "--mask", "fully_visible", "--uer-adamw", "--param-sharding", "fsdp"])
    assert (cfg.learning_rate, cfg.epochs_num, cfg.batch_size, cfg.seq_length) == (5e-5, 5, 64, 128)
    assert cfg.output_dir == "models/sbert_nli" and cfg.uer_adamw and cfg.param_sharding == "fsdp"
    assert cfg.seed == 7 and cfg.warmup == 0.1 and cfg.weight_decay == 0.01
    with pytest.raises(SystemExit):
        cli._parse(["--pretrained_model_path", "m", "--train_path", "t", "--no_such_flag", "1"])
