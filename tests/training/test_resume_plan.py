"""The resume plan as data: every TrainConfig field refused or declared neutral, and what
`resume_plan` refuses, names and leaves unchecked (no training here; the end-to-end refusals that
keep config.json byte-identical are in test_trainer.py)."""

import dataclasses
import os

import numpy as np
import pytest

from sbert_flax.checkpoints.pretrained import model_sha256
from sbert_flax.models.config import BertConfig
from sbert_flax.training.train_config import (
    RESUME_FIELDS,
    RESUME_NEUTRAL,
    RESUME_REFUSED,
    TrainConfig,
    resume_plan,
)


def test_every_field_is_refused_or_neutral():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = sorted(fields - set(RESUME_REFUSED) - set(RESUME_NEUTRAL))
    assert not missing, (f"TrainConfig field(s) {missing}: add each to RESUME_REFUSED (it changes "
                         "the trajectory) or RESUME_NEUTRAL (with why it does not)")
    stale = sorted((set(RESUME_REFUSED) | set(RESUME_NEUTRAL)) - fields)
    assert not stale, f"not TrainConfig fields: {stale}"
    assert all(r.strip() for r in (*RESUME_REFUSED.values(), *RESUME_NEUTRAL.values()))


def test_refused_and_neutral_are_disjoint():
    assert not set(RESUME_REFUSED) & set(RESUME_NEUTRAL)
    assert set(RESUME_FIELDS) == set(RESUME_REFUSED)


def _meta(cfg: TrainConfig, **facts) -> dict:
    return {"config": cfg.resume_record(facts), "total_steps": facts.get("total_steps")}


FACTS = {"pooling": "mean", "model_sha256": "a" * 64, "vocab_sha256": "b" * 64, "total_steps": 4}


@pytest.mark.parametrize("change, name", [
    ({"seq_length": 64}, "seq_length: 128 -> 64"),
    ({"mini_batch_size": 4}, "mini_batch_size: 8 -> 4"),
    ({"scale": 10.0}, "scale: 20.0 -> 10.0"),
    ({"bf16": True}, "bf16: False -> True"),
    ({"matryoshka_dims": (8, 4)}, "matryoshka_dims: None -> (8, 4)"),
])
def test_changed_fields_are_refused_by_name(change, name):
    cfg = TrainConfig(loss="cached-mnrl", mini_batch_size=8)
    plan = resume_plan(dataclasses.replace(cfg, **change), _meta(cfg, **FACTS), FACTS)
    assert plan.refused == (name,) and plan.unrecorded == ()


@pytest.mark.parametrize("fact, now, name", [
    ("pooling", "cls", "pooling: 'mean' -> 'cls'"),
    ("model_sha256", "c" * 64, "pretrained model content (model_sha256"),
    ("vocab_sha256", "d" * 64, "vocab content (vocab_sha256)"),
    ("total_steps", 6, "total_steps"),
    ("num_labels", 2, "num_labels"),
])
def test_changed_facts_are_refused_by_name(fact, now, name):
    cfg = TrainConfig(loss="mnrl")
    saved = _meta(cfg, **FACTS, num_labels=3)
    plan = resume_plan(cfg, saved, {**FACTS, "num_labels": 3, fact: now})
    assert len(plan.refused) == 1 and name in plan.refused[0], plan
    assert resume_plan(cfg, saved, {**FACTS, "num_labels": 3}).refused == ()


def test_pooling_is_compared_resolved():
    """--pooling mean on a folder whose pooling is mean trains the same: not refused."""
    saved = _meta(TrainConfig(loss="mnrl"), **FACTS)
    assert resume_plan(TrainConfig(loss="mnrl", pooling="mean"), saved, FACTS).refused == ()


def test_checkpoint_without_hashes_resumes_unchecked():
    """A checkpoint from before the plan recorded 8 fields and no facts: nothing is refused, what
    it lacks is listed for the warning."""
    cfg = TrainConfig(loss="mnrl")
    old = {"config": {f: getattr(cfg, f) for f in ("seed", "train_path", "loss", "batch_size",
                                                   "learning_rate", "pack", "group_by_length",
                                                   "no_duplicates")},
           "total_steps": 4}
    plan = resume_plan(cfg, old, FACTS)
    assert plan.refused == ()
    for name in ("model_sha256", "vocab_sha256", "seq_length", "mini_batch_size", "pooling"):
        assert name in plan.unrecorded
    assert "total_steps" not in plan.unrecorded


def test_model_hash_is_content_not_layout():
    rng = np.random.default_rng(0)
    params = {"b": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
              "a": {"bias": np.zeros(3, np.float32)}}
    cfg = BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8)
    h = model_sha256(cfg, params)
    reordered = {"a": {"bias": params["a"]["bias"].copy()}, "b": {"kernel": params["b"]["kernel"].copy()}}
    assert model_sha256(cfg, reordered) == h  # key order of the dict does not matter
    assert model_sha256(dataclasses.replace(cfg, remat=True, scan_layers=True), params) == h
    params["b"]["kernel"][0, 0] += 1e-6
    assert model_sha256(cfg, params) != h
    assert model_sha256(dataclasses.replace(cfg, hidden_dropout_prob=0.2), reordered) != h


def test_fingerprint_tells_content_from_mtime(tmp_path, monkeypatch):
    """A full hash proves the content: a rewrite of the same bytes (a new mtime) is the same
    data, one changed byte is not. Above FULL_HASH_BYTES only the first and last MiB are hashed,
    so a same-size rewrite shows through the mtime."""
    from sbert_flax.training import fingerprint

    p = tmp_path / "pairs.tsv"
    p.write_bytes(b"anchor\tpositive\n" + b"a\tb\n" * 100)
    was = fingerprint.file_fingerprint(str(p))
    assert "sha256" in was and was["size"] == 16 + 400
    p.write_bytes(p.read_bytes())
    os.utime(p, ns=(was["mtime_ns"] + 10**9, was["mtime_ns"] + 10**9))
    assert fingerprint.change(was, fingerprint.file_fingerprint(str(p))) == ""
    p.write_bytes(b"anchor\tpositive\n" + b"a\tb\n" * 50 + b"a\tc\n" + b"a\tb\n" * 49)
    assert fingerprint.change(was, fingerprint.file_fingerprint(str(p))).startswith("sha256 ")
    p.write_bytes(b"anchor\tpositive\n" + b"a\tb\n" * 101)
    assert fingerprint.change(was, fingerprint.file_fingerprint(str(p))) == "size 416 -> 420 bytes"

    # A "large" file: the middle is not read, a same-size rewrite is caught by the mtime.
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 64)
    monkeypatch.setattr(fingerprint, "EDGE_BYTES", 16)
    p.write_bytes(b"anchor\tpositive\n" + b"a\tb\n" * 100)
    os.utime(p, ns=(10**18, 10**18))
    big = fingerprint.file_fingerprint(str(p))
    assert "edges_sha256" in big and "sha256" not in big
    assert fingerprint.change(big, fingerprint.file_fingerprint(str(p))) == ""
    p.write_bytes(b"anchor\tpositive\n" + b"a\tb\n" * 50 + b"a\tc\n" + b"a\tb\n" * 49)
    os.utime(p, ns=(10**18 + 10**9, 10**18 + 10**9))
    assert "modified" in fingerprint.change(big, fingerprint.file_fingerprint(str(p)))
    p.write_bytes(b"anchor\tpositive\n" + b"a\tb\n" * 99 + b"a\tc\n")  # the last MiB changed
    assert "first and last MiB" in fingerprint.change(big, fingerprint.file_fingerprint(str(p)))


def test_changed_training_file_is_refused_by_name(tmp_path):
    """The same path with other rows (re-mined negatives over the file) is refused, naming the
    file: the checkpoint's iterator position would continue over other rows."""
    from sbert_flax.training import fingerprint

    p = tmp_path / "pairs.tsv"
    p.write_text("anchor\tpositive\n" + "a\tb\n" * 100, encoding="utf-8")
    cfg = TrainConfig(loss="mnrl", train_path=str(p))
    saved = _meta(cfg, **FACTS, train_data=fingerprint.file_fingerprint(str(p)))
    now = {**FACTS, "train_data": fingerprint.file_fingerprint(str(p))}
    assert resume_plan(cfg, saved, now).refused == ()
    p.write_text("anchor\tpositive\n" + "a\tc\n" * 100, encoding="utf-8")  # same size, other rows
    plan = resume_plan(cfg, saved, {**FACTS, "train_data": fingerprint.file_fingerprint(str(p))})
    assert len(plan.refused) == 1, plan
    assert plan.refused[0].startswith(f"training data content (train_data): {p} changed since "
                                      "the checkpoint: sha256 "), plan.refused
    # A checkpoint from before the fingerprint: resumed, listed as unchecked.
    plan = resume_plan(cfg, _meta(cfg, **FACTS), now)
    assert plan.refused == () and plan.unrecorded == ("train_data",)
