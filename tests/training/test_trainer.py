"""The Trainer with the contrastive losses end to end at toy size: the issue's command lines,
per-step metrics, several STS dev files, resume refusal, SIGKILL + resume through the grain
iterator state, and the standalone STS eval table."""

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
from test_train_loop import assert_best_is_results

from sbert_flax.cli import main as main_cli
from sbert_flax.cli import train as cli
from sbert_flax.retrieval.sts import sts_table
from sbert_flax.training.train_config import TrainConfig
from sbert_flax.training.trainer import ResumeMismatch, train_and_evaluate

REPO = helpers.REPO
TIMEOUT_S = 600  # a ceiling against a hang, not a speed bound


def _sets():
    chars = list(dict.fromkeys(helpers.random_zh_sentences(1, 400, 400, seed=0)[0]))
    return [chars[:16], chars[16:32]]


def write_contrastive(path, n, seed, negatives=False):
    """anchor and positive drawn from the same character set, negative from the other."""
    sets = _sets()
    rng = np.random.default_rng(seed)

    def sent(k):
        return "".join(rng.choice(sets[k], rng.integers(2, 12)))

    with open(path, "w", encoding="utf-8") as f:
        f.write("anchor\tpositive" + ("\tnegative" if negatives else "") + "\n")
        for _ in range(n):
            k = int(rng.integers(2))
            f.write(f"{sent(k)}\t{sent(k)}" + (f"\t{sent(1 - k)}" if negatives else "") + "\n")
    return str(path)


def write_sts(path, n, seed, invert=False):
    """Header-less s1, s2, score (5 same set, 0 otherwise; `invert`: the other way round), like
    stsb-zh."""
    sets = _sets()
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            ka, kb = rng.integers(2), rng.integers(2)
            a = "".join(rng.choice(sets[ka], rng.integers(2, 12)))
            b = "".join(rng.choice(sets[kb], rng.integers(2, 12)))
            f.write(f"{a}\t{b}\t{5 * int((ka == kb) != invert)}\n")
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64, pooling="mean")


def _records(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _flat(tree):
    return {re.sub(r"\['(\d+)'\]", r"[\1]", jax.tree_util.keystr(p)): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def write_ir_dev(root, seed: int) -> str:
    """A tiny BEIR folder: each query's relevant document is drawn from its character set."""
    from helpers import write_beir

    sets = _sets()
    rng = np.random.default_rng(seed)

    def sent(k):
        return "".join(rng.choice(sets[k], rng.integers(2, 12)))

    kinds = [int(rng.integers(2)) for _ in range(12)]
    corpus = [(f"d{i}", "", sent(k)) for i, k in enumerate(kinds)]
    queries = [(f"q{i}", sent(k)) for i, k in enumerate(kinds[:6])]
    qrels = [(f"q{i}", f"d{i}", 1) for i in range(6)]
    return write_beir(root, corpus, queries, qrels)


def test_mnrl_command_line_logs_every_step_and_exports(tmp_path, model, capsys):
    train = write_contrastive(tmp_path / "pairs.tsv", 400, seed=1)
    sts1, sts2 = write_sts(tmp_path / "dev.tsv", 48, seed=2), write_sts(tmp_path / "dev2.tsv", 40, seed=3)
    ir = write_ir_dev(tmp_path / "ir-dev", seed=4)
    out = str(tmp_path / "run")
    # The issue's command line (sizes shrunk), with two STS dev files, a BEIR folder, an
    # evaluation every 5 steps and a peak for MFU.
    base = ["--loss", "mnrl", "--pretrained_model_path", model, "--train_path", train,
            "--batch_size", "16", "--learning_rate", "1e-3", "--epochs_num", "1",
            "--seq_length", "32", "--warmup", "0.1", "--seed", "7", "--sts-dev", sts1,
            "--sts-dev", sts2, "--max_steps", "20", "--no_progress_bar"]
    rc = cli.main([*base, "--log_every_steps", "1", "--peak_flops", "1e12", "--eval_steps", "5",
                   "--ir-dev", ir, "--output_dir", out])
    assert rc == 0, capsys.readouterr().err[-3000:]
    recs = _records(out)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 21))  # one record per step
    for r in train_recs:
        assert np.isfinite(r["loss"]) and r["lr"] >= 0 and r["sentences_per_s"] > 0
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and "grad_norm" in r
    dev = [r for r in recs if r["kind"] == "dev"]
    # Every 5 steps; step 20 is also the epoch's and the run's end, evaluated once.
    assert [r["step"] for r in dev] == [5, 10, 15, 20]
    for r in dev:
        assert set(r["sts"]) == {sts1, sts2} and r["sts_spearman"] == r["sts"][sts1]
        assert set(r["retrieval"]) == {"ir-dev"} and 0 <= r["retrieval"]["ir-dev"]["ndcg@10"] <= 1
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["best"]["metric"] == "sts_spearman" and res["step"] == 20
    best = max(dev, key=lambda r: r["sts_spearman"])
    assert (res["best"]["step"], res["best"]["value"]) == (best["step"], best["sts_spearman"])
    for d in ("best_model", "best_model_pytorch"):
        assert os.path.isdir(os.path.join(out, d)), d
    # The exported model reproduces the STS number the trainer measured on the mesh.
    from sbert_flax.inference.encoder import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(os.path.join(out, "best_model"), devices=jax.devices()[:1])
    rows = sts_table(enc, [sts1, sts2])
    assert abs(rows[0]["spearman"] - best["sts"][sts1]) < 1e-4
    assert abs(rows[1]["spearman"] - best["sts"][sts2]) < 1e-4
    # Standalone eval: a table of Spearman x100 per file and the mean.
    assert main_cli.main(["eval", "--model", os.path.join(out, "best_model"), "--sts", sts1, "--sts", sts2]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 5 and table[-1].startswith("mean")
    vals = [float(line.split()[-1]) for line in table[2:]]
    assert vals[2] == pytest.approx((vals[0] + vals[1]) / 2, abs=0.011)

    # --best_metric ndcg@10 picks by the first --ir-dev folder (no export: the choice is the test).
    out2 = str(tmp_path / "run-ndcg")
    assert cli.main([*base, "--eval_steps", "5", "--ir-dev", ir, "--best_metric", "ndcg@10",
                     "--no_export", "--output_dir", out2]) == 0
    dev2 = [r for r in _records(out2) if r["kind"] == "dev"]
    res2 = json.load(open(os.path.join(out2, "results.json")))
    ndcg = [r["retrieval"]["ir-dev"]["ndcg@10"] for r in dev2]
    first_best = dev2[ndcg.index(max(ndcg))]  # a later tie does not replace the best
    assert res2["best"] == {"metric": "ndcg@10", "value": max(ndcg), "epoch": 1,
                            "step": first_best["step"]}
    capsys.readouterr()
    # User errors (exit 2): a retrieval metric without --ir-dev names the flag; a bad BEIR folder
    # stops before training, naming file:line.
    assert cli.main([*base, "--best_metric", "ndcg@10", "--output_dir", str(tmp_path / "e1")]) == 2
    assert "--ir-dev" in capsys.readouterr().err
    with open(os.path.join(ir, "queries.jsonl"), "a", encoding="utf-8") as f:
        f.write("{not json\n")
    bad_out = tmp_path / "e2"
    assert cli.main([*base, "--ir-dev", ir, "--output_dir", str(bad_out)]) == 2
    assert "queries.jsonl:7" in capsys.readouterr().err
    assert not (bad_out / "checkpoints").exists()


def test_cosent_headerless_scores_and_learning(tmp_path, model):
    train = write_sts(tmp_path / "train.tsv", 256, seed=4)
    dev = write_sts(tmp_path / "dev.tsv", 64, seed=5)
    cfg, _ = cli._parse(["--loss", "cosent", "--pretrained_model_path", model, "--train_path", train,
                         "--no_header", "--columns", "sentence1,sentence2,score", "--score_scale", "5",
                         "--batch_size", "32", "--learning_rate", "1e-3", "--epochs_num", "3",
                         "--seq_length", "32", "--sts-dev", dev, "--output_dir", str(tmp_path / "run"),
                         "--no_export", "--no_progress_bar", "--log_every_steps", "4"])
    summary = train_and_evaluate(cfg)
    hist = [h["sts_spearman"] for h in summary["history"]]
    print("cosent dev Spearman per epoch", [round(x, 3) for x in hist])
    assert len(hist) == 3 and summary["step"] == 24
    assert hist[-1] >= 0.6 and summary["best"]["value"] == max(hist)
    assert summary["train_step_traces"] <= 2  # buckets of 32 tokens only (seq_length 32): one shape


def test_cached_mnrl_triplets_no_duplicates_matryoshka(tmp_path, model):
    """Each option does what it says, checked on the trainer's own pipeline and loss: no text
    twice in a batch; the loss of a batch is the sum over the Matryoshka dims of MNRL with the
    hard negatives among the candidates; and the run trains."""
    from sbert_flax.inference.encoder import SentenceEncoder
    from sbert_flax.training.pipeline import BatchPlan
    from sbert_flax.training.trainer import Trainer

    path = write_contrastive(tmp_path / "trip.tsv", 96, seed=6, negatives=True)
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    with open(path, "a", encoding="utf-8") as f:  # 32 rows twice: random batches repeat texts
        f.writelines(lines[1:33])
    cfg = TrainConfig(pretrained_model_path=model, train_path=path, loss="cached-mnrl",
                      mini_batch_size=8, matryoshka_dims=(32, 16), no_duplicates=True, batch_size=16,
                      seq_length=32, epochs_num=1, max_steps=3, learning_rate=1e-3, export=False,
                      progress_bar=False, log_every_steps=1, output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, devices=jax.devices()[:1])  # one device: sharding is proven elsewhere
    src, plan = trainer.train_src, trainer.pipeline.plan

    # --no_duplicates: no text (of any column) twice in any batch of the epoch, where the same
    # shuffle without the option does repeat one.
    def repeats(batches) -> int:
        return sum(len(t) - len(set(t)) for t in
                   ([x for c in src.columns for x in src.texts(b)[c]] for b in batches))

    assert src.columns == ("anchor", "positive", "negative")
    assert repeats(plan.epoch(0)) == 0
    assert sum(len(b) for b in plan.epoch(0)) == len(src) == 128  # every row still trains
    plain = BatchPlan(len(src), dataclasses.replace(trainer.pipeline.cfg, no_duplicates=False))
    assert repeats(plain.epoch(0)) > 0

    # The loss of step 0's batch (as the trainer feeds it: packed, negatives included, GradCache
    # in mini-batches of 8) against MNRL written out here on embeddings from the encoder.
    batch = trainer.pipeline.builder(0)
    assert "negative_row" in batch and np.all(batch["weights"] == 1)
    params = trainer.loss.initial_params(trainer.pre.params, trainer.pre.config, cfg.seed)
    loss, _, _ = jax.jit(lambda p, b: trainer.loss.value_and_grad(trainer.mdef.graphdef, p, b, None))(
        params, batch)
    texts = src.texts(plan.records(0))
    enc = SentenceEncoder.from_pretrained(model, devices=jax.devices()[:1])
    a, p, n = (enc.encode(texts[c], normalize=False).astype(np.float64) for c in src.columns)

    def mnrl(a, p, n, dim):  # mean over anchors of -log softmax(own positive | positives, negatives)
        def unit(x):
            return x[:, :dim] / np.linalg.norm(x[:, :dim], axis=1, keepdims=True)

        docs = unit(p) if n is None else np.concatenate([unit(p), unit(n)])
        scores = cfg.scale * unit(a) @ docs.T  # [B, B] or [B, 2B]; the own positive on the diagonal
        top = scores.max(axis=1)
        log_z = top + np.log(np.exp(scores - top[:, None]).sum(axis=1))
        return float(np.mean(log_z - np.diag(scores)))

    terms = {d: mnrl(a, p, n, d) for d in cfg.matryoshka_dims}
    assert float(loss) == pytest.approx(sum(terms.values()), rel=1e-5)
    # Each part moves the total by far more than that tolerance: both dims' terms are in it ...
    assert min(terms.values()) > 1e-3 * sum(terms.values())
    # ... and the negatives are among the candidates (without them every term is smaller).
    without = sum(mnrl(a, p, None, d) for d in cfg.matryoshka_dims)
    assert sum(terms.values()) - without > 1e-3 * sum(terms.values())

    summary = trainer.run()
    assert summary["step"] == 3
    assert [r["step"] for r in _records(cfg.output_dir) if r["kind"] == "train"] == [1, 2, 3]


def test_scan_layers_and_remat_train_the_same(tmp_path, tiny_bert):
    """--scan_layers --remat (2 layers, so the scan runs): the same losses and final params."""
    model = tiny_bert(hidden=32, layers=2, heads=4, intermediate=64, max_position=64, pooling="mean")
    train = write_contrastive(tmp_path / "pairs.tsv", 48, seed=5)

    def run(name, **flags):
        cfg = TrainConfig(pretrained_model_path=model, train_path=train, loss="mnrl", batch_size=16,
                          seq_length=32, epochs_num=1, learning_rate=1e-3, export=False,
                          progress_bar=False, log_every_steps=1, output_dir=str(tmp_path / name), **flags)
        summary = train_and_evaluate(cfg)
        losses = [r["loss"] for r in _records(cfg.output_dir) if r["kind"] == "train"]
        return losses, jax.tree.leaves(summary["params"])

    (l0, p0), (l1, p1) = run("plain"), run("scan", scan_layers=True, remat=True)
    assert len(l0) == 3
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(p1, p0, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def _checkpoint_files(out):
    root = os.path.join(out, "checkpoints")
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_resume_refusals_keep_config_json(tmp_path, model, tiny_bert, zh_vocab, capsys):
    """Every refusal names the field and leaves config.json and the checkpoints as they were; the
    model and vocab are compared by content (a moved model resumes, other weights at its path do
    not)."""
    import shutil

    train = write_contrastive(tmp_path / "pairs.tsv", 64, seed=7)
    out = str(tmp_path / "run")
    here = shutil.copytree(model, tmp_path / "model")  # this test replaces its weights below
    base = ["--loss", "cached-mnrl", "--mini_batch_size", "8", "--pretrained_model_path", str(here),
            "--train_path", train, "--batch_size", "16",
            "--seq_length", "32", "--epochs_num", "1", "--max_steps", "2", "--save_every_steps", "1",
            "--no_export", "--no_progress_bar", "--output_dir", out]
    assert cli.main(base) == 0
    config_json = open(os.path.join(out, "config.json")).read()
    ckpt_files = _checkpoint_files(out)
    capsys.readouterr()
    assert cli.main(base) == 2  # checkpoints there, no --resume
    assert "--resume" in capsys.readouterr().err
    vocab = open(zh_vocab, encoding="utf-8").read().split("\n")  # the model's vocab
    vocab[200], vocab[201] = vocab[201], vocab[200]  # same size, two ids swapped
    (tmp_path / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    for flag, value, field in (("--seed", "8", "seed: 7 -> 8"), ("--learning_rate", "1e-3", "learning_rate"),
                               ("--batch_size", "8", "batch_size: 16 -> 8"),
                               ("--train_path", write_contrastive(tmp_path / "other.tsv", 64, seed=8),
                                "train_path"),
                               ("--seq_length", "16", "seq_length: 32 -> 16"),
                               ("--mini_batch_size", "4", "mini_batch_size: 8 -> 4"),
                               ("--pooling", "cls", "pooling: 'mean' -> 'cls'"),
                               ("--vocab_path", str(tmp_path / "vocab.txt"), "vocab_sha256"),
                               # refused before config.json is written, with the step count
                               ("--max_steps", "3", "max_steps: 2 -> 3; total_steps: 2 -> 3")):
        assert cli.main([*base, "--resume", flag, value]) == 2
        err = capsys.readouterr().err
        assert "cannot resume" in err and field in err and "--force" in err, err[-2000:]
        assert open(os.path.join(out, "config.json")).read() == config_json
        assert _checkpoint_files(out) == ckpt_files
    # Other rows written over the training file (re-mined negatives; the same count, so the same
    # total_steps): refused by content, naming the file.
    write_contrastive(train, 64, seed=11)
    assert cli.main([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"training data content (train_data): {train} changed since the checkpoint" in err, \
        err[-2000:]
    assert open(os.path.join(out, "config.json")).read() == config_json
    assert _checkpoint_files(out) == ckpt_files
    write_contrastive(train, 64, seed=7)  # the same bytes again (a new mtime): the same data
    # The model moved (same weights, another folder): it is the same model, the run resumes.
    moved = shutil.move(str(here), tmp_path / "moved")
    assert cli.main([*base[:4], "--pretrained_model_path", str(moved), *base[6:], "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    config_json = open(os.path.join(out, "config.json")).read()
    ckpt_files = _checkpoint_files(out)
    # Other weights at the original path: refused by content.
    other = tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64, pooling="mean", seed=1)
    shutil.copytree(other, here)
    assert cli.main([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "pretrained model content (model_sha256" in err and "--force" in err, err[-2000:]
    assert open(os.path.join(out, "config.json")).read() == config_json
    assert _checkpoint_files(out) == ckpt_files
    assert cli.main([*base, "--resume", "--loss", "cosent"]) == 2  # wrong columns for cosent
    assert cli.main([*base, "--resume", "--no_pack"]) == 2  # other batches than checkpointed
    assert "pack: True -> False" in capsys.readouterr().err
    assert cli.main([*base, "--resume", "--group_by_length"]) == 2
    assert "group_by_length: False -> True" in capsys.readouterr().err
    # A checkpoint from before packing existed trained padded: resuming it packed is refused too.
    assert TrainConfig(loss="mnrl").resume_mismatches({"seed": 7}) == ["pack: False -> True"]
    assert TrainConfig(loss="softmax").resume_mismatches({"seed": 7}) == ["pack: False -> True"]
    with pytest.raises(ResumeMismatch, match="seed"):
        train_and_evaluate(TrainConfig(pretrained_model_path=str(here), train_path=train,
                                       loss="cached-mnrl", mini_batch_size=8, batch_size=16,
                                       seq_length=32, epochs_num=1, max_steps=2, seed=9,
                                       resume=True, export=False, output_dir=out))
    # --force continues (the run is already at its last step: nothing left to train).
    capsys.readouterr()
    assert cli.main([*base, "--resume", "--seed", "8", "--force"]) == 0
    err = capsys.readouterr().err  # --force names what it overrides
    assert re.search(r"--force: resuming although .*seed: 7 -> 8.*model_sha256", err), err[-2000:]
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 8


def test_resume_on_changed_dev_data_starts_the_best_over(tmp_path, model, one_device, capsys):
    """Other content at the STS dev path on resume: the old best (a Spearman on other pairs) is
    no bar for the new scores. The best starts over, with a log line, and best/ follows it."""
    train = write_contrastive(tmp_path / "pairs.tsv", 64, seed=12)
    dev = write_sts(tmp_path / "dev.tsv", 40, seed=13)
    out = str(tmp_path / "run")
    args = ["--loss", "mnrl", "--pretrained_model_path", model, "--train_path", train,
            "--batch_size", "16", "--seq_length", "32", "--epochs_num", "1", "--max_steps", "4",
            "--learning_rate", "1e-3", "--eval_steps", "2", "--save_every_steps", "2",
            "--sts-dev", dev, "--no_export", "--no_progress_bar", "--output_dir", out]
    # A preemption after step 2: evaluated (the best), saved, stopped.
    cfg, _ = cli._parse(args)
    with train_hooks.installed(sigterm_after_step=2):
        assert train_and_evaluate(cfg, devices=one_device)["preempted"]
    first = [r for r in _records(out) if r["kind"] == "dev"]
    assert [r["step"] for r in first] == [2] and first[0]["sts_spearman"] > 0
    # The same path, the scores inverted: a model that ranks same-set pairs higher now scores
    # below zero, under the old best.
    write_sts(dev, 40, seed=13, invert=True)
    capsys.readouterr()
    summary = train_and_evaluate(dataclasses.replace(cfg, resume=True), devices=one_device)
    assert summary["step"] == 4
    err = capsys.readouterr().err
    assert re.search(r"the dev data of sts_spearman changed since the checkpoint \(.*dev\.tsv: "
                     r"sha256 .*the best starts over at the next evaluation", err), err[-3000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["best"]["step"] == 4 and res["best"]["value"] < 0, res["best"]
    assert_best_is_results(out)


def test_group_by_length_resume_needs_the_same_length_buckets():
    """Length-grouped batches depend on the bucket grid: a checkpoint that does not record its
    grid was trained on the first one, and resuming it on today's would regroup the data."""
    from types import SimpleNamespace

    from sbert_flax.training.data import FIRST_TRAIN_BUCKETS, TRAIN_BUCKETS
    from sbert_flax.training.train_config import RESUME_FIELDS
    from sbert_flax.training.trainer import Trainer

    cfg = TrainConfig(loss="mnrl", group_by_length=True)
    saved = {f: getattr(cfg, f) for f in RESUME_FIELDS}
    trainer = SimpleNamespace(cfg=cfg)
    with pytest.raises(ResumeMismatch, match=re.escape(f"length buckets of --group_by_length: "
                                                       f"{FIRST_TRAIN_BUCKETS} -> {TRAIN_BUCKETS}")):
        Trainer._check_resume(trainer, {"config": saved})
    Trainer._check_resume(trainer, {"config": {**saved, "length_buckets": list(TRAIN_BUCKETS)}})
    plain = SimpleNamespace(cfg=TrainConfig(loss="mnrl"))  # random batches: the grid does not matter
    Trainer._check_resume(plain, {"config": {f: getattr(plain.cfg, f) for f in RESUME_FIELDS}})


def test_batch_sizes_validated(tmp_path, model, capsys):
    train = write_contrastive(tmp_path / "pairs.tsv", 32, seed=9)
    base = ["--loss", "mnrl", "--pretrained_model_path", model, "--train_path", train, "--seq_length", "32",
            "--no_export", "--no_progress_bar"]
    assert cli.main([*base, "--batch_size", "16", "--eval_batch_size", "12", "--output_dir",
                     str(tmp_path / "a")]) == 2
    assert "eval_batch_size=12 must be a multiple of the 8 devices" in capsys.readouterr().err
    assert cli.main([*base, "--batch_size", "12", "--output_dir", str(tmp_path / "b")]) == 2
    assert "batch_size=12 must be a multiple" in capsys.readouterr().err
    assert cli.main([*base, "--batch_size", "16", "--dev_path", train, "--output_dir", str(tmp_path / "c")]) == 2
    assert "--sts-dev" in capsys.readouterr().err


def test_uer_config_must_match_the_weights(tmp_path, tiny_bert):
    import torch

    from sbert_flax.checkpoints import weight_maps as weights
    from sbert_flax.checkpoints.pretrained import load_pretrained
    from sbert_flax.checkpoints.uer import hf_to_uer

    small = tiny_bert(hidden=8, layers=2, heads=2, intermediate=16, max_position=64)
    uer = hf_to_uer(weights.read_weights(weights.find_weights_file(small)), "single", 2)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in uer.items()}, tmp_path / "uer.bin")
    cfg = tmp_path / "base_config.json"
    from sbert_flax.models.config import ConfigError

    kw = dict(vocab_path=helpers.zh_vocab_file(), config_path=str(cfg), seq_length=32)
    # UER's base_config.json next to 8-wide 2-layer weights: 12 heads cannot split 8 dims.
    cfg.write_text(json.dumps({"emb_size": 768, "feedforward_size": 3072, "hidden_size": 768,
                               "heads_num": 12, "layers_num": 12, "pooling": "first"}))
    with pytest.raises(ConfigError, match="hidden_size=8 is not divisible by num_attention_heads=12"):
        load_pretrained(str(tmp_path / "uer.bin"), **kw)
    cfg.write_text(json.dumps({"emb_size": 768, "feedforward_size": 3072, "hidden_size": 768,
                               "heads_num": 2, "layers_num": 12, "pooling": "first"}))
    with pytest.raises(weights.WeightsError, match=r"hidden_size=768 but the weights have hidden_size=8"):
        load_pretrained(str(tmp_path / "uer.bin"), **kw)
    cfg.write_text(json.dumps({"hidden_size": 8, "heads_num": 2, "layers_num": 12}))
    with pytest.raises(weights.WeightsError, match=r"layers_num=12 but the weights have num_hidden_layers=2"):
        load_pretrained(str(tmp_path / "uer.bin"), **kw)
    cfg.write_text(json.dumps({"hidden_size": 8, "heads_num": 2, "layers_num": 2}))
    assert load_pretrained(str(tmp_path / "uer.bin"), **kw).config.hidden_size == 8


def test_issue_command_lines_parse():
    m, pairs, stsb = "M", "../shared/data/contrastive/nli-zh-pairs.tsv", "../shared/data/stsb-zh"
    cfg, _ = cli._parse(["--loss", "mnrl", "--pretrained_model_path", m, "--train_path", pairs,
                         "--batch_size", "64", "--learning_rate", "2e-5", "--epochs_num", "1",
                         "--seq_length", "64", "--warmup", "0.1", "--seed", "7", "--sts-dev",
                         f"{stsb}/dev.tsv", "--output_dir", "OUT"])
    assert (cfg.loss, cfg.batch_size, cfg.seq_length, cfg.sts_dev_paths) == ("mnrl", 64, 64, (f"{stsb}/dev.tsv",))
    assert cfg.resolved_best_metric == "sts_spearman" and not cfg.group_by_length
    cfg, _ = cli._parse(["--loss", "cosent", "--pretrained_model_path", m, "--train_path", f"{stsb}/train.tsv",
                         "--no_header", "--columns", "sentence1,sentence2,score", "--score_scale", "5",
                         "--batch_size", "64", "--learning_rate", "2e-5", "--epochs_num", "1",
                         "--seq_length", "64", "--sts-dev", f"{stsb}/dev.tsv", "--output_dir", "OUT"])
    assert cfg.columns == ("sentence1", "sentence2", "score") and not cfg.has_header and cfg.score_scale == 5
    cfg, _ = cli._parse(["--loss", "mnrl", "--pretrained_model_path", m, "--train_path", pairs,
                         "--max_steps", "20", "--log_every_steps", "1", "--output_dir", "OUT"])
    assert (cfg.max_steps, cfg.log_every_steps) == (20, 1)
    # The config-file form keeps working, comma strings included.
    assert TrainConfig.from_dict({"columns": "1,2,3", "matryoshka_dims": [64, 32]}).columns == (1, 2, 3)


def _env():
    # One CPU device, like the reference run (sharding is proven in test_contrastive_step and
    # test_multihost); compiled programs come from the session cache conftest.py sets up.
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=REPO)


def _steps(ckpt_dir):
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []


def test_mnrl_sigkill_and_resume_equals_uninterrupted(tmp_path, model):
    train = write_contrastive(tmp_path / "pairs.tsv", 150, seed=10)
    out = str(tmp_path / "killed")
    args = [sys.executable, "-m", "sbert_flax.cli.main", "train", "--loss", "mnrl", "--pretrained_model_path", model,
            "--train_path", train, "--batch_size", "16", "--seq_length", "32", "--epochs_num", "2",
            "--learning_rate", "1e-3", "--save_every_steps", "3", "--log_every_steps", "1",
            "--no_export", "--no_progress_bar", "--output_dir", out]
    ckpt_dir = os.path.join(out, "checkpoints")
    # Slowed down through tests/train_hooks.py (the same training CLI), so it can be killed
    # between checkpoints.
    hooked = [sys.executable, train_hooks.__file__, "--step_delay", "0.4", "--", *args[4:]]
    proc = subprocess.Popen(hooked, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _steps(ckpt_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        time.sleep(0.6)  # a step or two past the checkpoint: those must not be logged twice
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = _steps(ckpt_dir)
    assert killed_at and max(killed_at) < 20  # 10 steps/epoch x 2
    r = subprocess.run([*args, "--resume"], env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {max(killed_at)} " in r.stderr
    steps = [rec["step"] for rec in _records(out) if rec["kind"] == "train"]
    assert steps == list(range(1, 21))  # no step twice, none missing
    assert_best_is_results(out)

    # The uninterrupted run, in a subprocess like the killed one (one CPU device: XLA's CPU thread
    # split, and so the last bits of a float sum, depend on the process's device count).
    full_out = str(tmp_path / "full")
    r = subprocess.run([*args[:-1], full_out], env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        want = _flat(ck.restore(os.path.join(full_out, "checkpoints", "20", "state"))["params"])
        resumed = _flat(ck.restore(os.path.join(ckpt_dir, "20", "state"))["params"])
    assert sorted(want) == sorted(resumed)
    for k, v in want.items():
        np.testing.assert_allclose(resumed[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


def test_kill_between_best_and_latest_save(tmp_path, model, one_device):
    """A hard kill after the best checkpoint of step 8 and before the latest of step 8: the
    resumed run starts from step 6 and sets its best at step 7, below the dead run's best/8. The
    best/8 of the dead stretch is dropped, best/7 is saved, and best_model is step 7's params."""
    import orbax.checkpoint as ocp

    from sbert_flax.inference.encoder import SentenceEncoder

    # The killed run of test_mnrl_sigkill_and_resume_equals_uninterrupted (the same programs,
    # compiled once per session), evaluated every 4 steps. No dev data: every evaluation (steps
    # 4, 8, ...) is the best.
    train = write_contrastive(tmp_path / "pairs.tsv", 150, seed=10)
    out = str(tmp_path / "run")
    args = ["--loss", "mnrl", "--pretrained_model_path", model, "--train_path", train,
            "--batch_size", "16", "--seq_length", "32", "--epochs_num", "2",
            "--learning_rate", "1e-3", "--save_every_steps", "3", "--log_every_steps", "1",
            "--eval_steps", "4", "--no_progress_bar", "--output_dir", out]
    r = subprocess.run([sys.executable, train_hooks.__file__, "--kill_after_best", "8", "--",
                        *args, "--no_export"],
                       env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert _steps(os.path.join(out, "checkpoints")) == [3, 6]
    assert 8 in _steps(os.path.join(out, "best"))
    # Resumed to a shorter end (--force: another max_steps), so its last evaluation, step 7, is
    # its best and lies below the dead run's step 8 (on one device, as the killed run).
    cfg, _ = cli._parse([*args, "--max_steps", "7", "--resume", "--force"])
    summary = train_and_evaluate(cfg, devices=one_device)
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["best"]["step"] == 7 and res["step"] == summary["step"] == 7
    assert_best_is_results(out)
    with ocp.StandardCheckpointer() as ck:
        final = _flat(ck.restore(os.path.join(out, "checkpoints", "7", "state"))["params"])
        best = _flat(ck.restore(os.path.join(out, "best", "7", "params")))
    exported = _flat(SentenceEncoder.from_pretrained(os.path.join(out, "best_model"),
                                                     devices=jax.devices()[:1]).param_dict())
    assert exported
    for k, v in best.items():
        np.testing.assert_array_equal(v, final[k], err_msg=k)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, final[f"['embedder']['backbone']{k}"], err_msg=k)
