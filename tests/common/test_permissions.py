"""Everything the project writes is readable by others under umask 022: 0644 files, 0755 folders.

One umask, every output tree: `encode` (.npy; the shards, manifest and merge of a multi-process
run), `convert` to an sbert-flax folder and to a sentence-transformers export, and a short
training run (checkpoints, logs, the exported models). A writer that goes through `mkstemp`,
`mkdtemp` or a library that does (safetensors writes its file 0600) shows up here by path.
"""

from __future__ import annotations

import os
import stat

import jax
import numpy as np
import pytest

from sbert_flax.cli import main as cli
from sbert_flax.inference.corpus import encode_file
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.training.train_config import TrainConfig
from sbert_flax.training.trainer import train_and_evaluate
from sbert_flax.util import load_embeddings, manifest_path, merge_shards, shard_path

UMASK = 0o022


@pytest.fixture(scope="module", autouse=True)
def umask_022():
    """The whole module runs under umask 022 (the test process may have another one)."""
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(*roots: str) -> list[str]:
    """`path: mode` for every file not 0644 and folder not 0755 under `roots` (roots included)."""
    bad = []

    def check(path: str, want: int) -> None:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if mode != want:
            bad.append(f"{path}: {mode:o} (want {want:o})")

    for root in roots:
        assert os.path.exists(root), root
        if os.path.isfile(root):
            check(root, 0o644)
            continue
        check(root, 0o755)
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                check(os.path.join(dirpath, d), 0o755)
            for f in filenames:
                check(os.path.join(dirpath, f), 0o644)
    return bad


@pytest.fixture(scope="module")
def model(tiny_bert) -> str:
    return tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64, pooling="mean")


@pytest.fixture(scope="module")
def enc(model, one_device) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(model, devices=one_device)


LINES = ["那个人很开心", "那只猫很开心", "", "今天天气很好。", "北京", "猫", "一个男人在弹吉他。"]


def test_encode_outputs(enc, tmp_path, capsys, model):
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    # The CLI's .npy, float and quantized (the quantized path writes a scratch file first).
    assert cli.main(["encode", "--model", model, "--input", str(src), "--output",
                     str(out / "emb.npy"), "--no-progress"]) == 0, capsys.readouterr().err
    encode_file(enc, str(src), str(out / "emb_int8.npy"), precision="int8")
    assert wrong_modes(str(out / "emb.npy"), str(out / "emb_int8.npy")) == []


def test_multi_process_encode_outputs(enc, tmp_path, monkeypatch):
    # Two processes' shards written in turn by this one process; the collectives that would
    # gather the row counts and wait for the other process are answered locally.
    from jax.experimental import multihost_utils

    from sbert_flax.inference.corpus import line_range

    src = tmp_path / "lines.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    rows = [len(range(*line_range(len(LINES), i, 2))) for i in range(2)]
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.asarray(rows))
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    out = str(tmp_path / "emb.npy")
    for i in (1, 0):  # process 0 writes the manifest after both shards exist
        encode_file(enc, str(src), out, process_index=i, process_count=2)
    written = [shard_path(out, 0, 2), shard_path(out, 1, 2), manifest_path(out)]
    assert load_embeddings(out).shape == (len(LINES), enc.dim)
    merge_shards(out, keep_shards=True)
    assert wrong_modes(*written, out) == []


def test_convert_and_export_outputs(model, tmp_path, capsys):
    flax_dir, st_dir, st2_dir = (str(tmp_path / n) for n in ("flax", "st", "st2"))
    assert cli.main(["convert", model, flax_dir]) == 0, capsys.readouterr().err
    assert cli.main(["convert", flax_dir, st_dir, "--to", "pytorch"]) == 0, capsys.readouterr().err
    # The Python API's export, replacing an existing folder.
    enc = SentenceEncoder.from_pretrained(flax_dir, devices=jax.devices()[:1])
    os.makedirs(st2_dir)
    (tmp_path / "st2" / "stale.txt").write_text("old", encoding="utf-8")
    enc.export_pytorch(st2_dir, overwrite=True)
    assert not os.path.exists(os.path.join(st2_dir, "stale.txt"))
    assert os.path.isfile(os.path.join(st_dir, "model.safetensors"))
    assert wrong_modes(flax_dir, st_dir, st2_dir) == []


def test_training_run_outputs(model, tmp_path, one_device):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(
        f"{a}\t{b}\n" for a, b in zip(LINES, LINES[1:] + LINES[:1], strict=True) if a and b),
        encoding="utf-8")
    out = str(tmp_path / "run")
    cfg = TrainConfig(pretrained_model_path=model, loss="mnrl", train_path=str(pairs),
                      batch_size=4, seq_length=16, max_steps=2, save_every_steps=1,
                      output_dir=out, progress_bar=False, data_threads=0)
    train_and_evaluate(cfg, devices=one_device)
    for d in ("checkpoints", "best_model", "best_model_pytorch"):
        assert os.path.isdir(os.path.join(out, d)), d
    assert wrong_modes(out) == []
