"""The `sbert-flax` CLI and convert/ scripts, run in-process through `cli.main([...])`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import helpers
import numpy as np
import pytest

from sbert_flax import SentenceEncoder
from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.cli import main as cli
from sbert_flax.retrieval.sts import evaluate_sts

REPO = helpers.REPO
SENTS = ["那个人很开心", "那个人非常开心", "那只猫很开心", "今天天气很好。"]


@pytest.fixture(scope="module")
def tiny(tiny_bert) -> str:
    """A plain HF folder (no modules.json: mean pooling)."""
    return tiny_bert()


@pytest.fixture(scope="module")
def tiny_enc(tiny, one_device) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(tiny, devices=one_device)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sbert-flax: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


# ---- real subprocesses: the installed console script and the convert/ scripts ---------------

def test_console_script_and_convert_script_help():
    r = subprocess.run(["sbert-flax", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("convert", "encode", "search", "similarity", "eval-sts", "serve", "train"):
        assert command in r.stdout, (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "convert/pytorch_to_flax.py", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SRC" in r.stdout and "DEST" in r.stdout and "--to {" not in r.stdout, (r.stdout, r.stderr)


HELP_PROBE = """
import json, sys
from sbert_flax.cli import main as cli
out = {}
for argv in json.loads(sys.argv[1]):
    try:
        cli.main(argv)
    except SystemExit as e:
        out[" ".join(argv)] = e.code
heavy = sorted({m.partition(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax", "orbax",
               "optax", "grain", "torch", "transformers", "tokenizers", "fastapi", "uvicorn",
                                 "faiss", "usearch", "pymilvus"})
print(json.dumps({"codes": out, "heavy": heavy}))
"""


def test_help_imports_no_jax():
    """`sbert-flax --help` and every `COMMAND --help` answer without importing JAX, Flax, orbax,
    torch or the server: the parsers are built from light modules and each command imports what
    it uses when it runs (the answer takes well under a second instead of 4-5 s)."""
    from sbert_flax.cli.main import COMMANDS

    # Every registered command (a new one is covered without editing this list), and train.
    commands = [c.replace("_", "-") for c in COMMANDS] + ["train", "index build"]
    argvs = [["--help"], *[[*c.split(), "--help"] for c in commands]]
    r = subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(argvs)], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report["codes"].values()) == {0}, report
    assert len(report["codes"]) == len(argvs), report
    assert report["heavy"] == [], report


# ---- convert ---------------------------------------------------------------------------------

def test_convert_to_flax_and_back_to_sentence_transformers(tiny, tiny_enc, tmp_path, capsys, one_device):
    flax_dir, st_dir = str(tmp_path / "flax"), str(tmp_path / "st")
    rc, out, _ = run(capsys, "convert", tiny, flax_dir, "--pooling", "cls", "--max-seq-length", "64")
    assert rc == 0 and "sbert-flax" in out
    meta = json.load(open(os.path.join(flax_dir, "sbert_flax.json")))
    assert meta["pooling"] == "cls" and meta["max_seq_length"] == 64
    flax_enc = SentenceEncoder.from_pretrained(flax_dir, devices=one_device)
    ref = SentenceEncoder.from_pretrained(tiny, pooling="cls", max_seq_length=64, devices=one_device)
    np.testing.assert_array_equal(flax_enc.encode(SENTS), ref.encode(SENTS))

    rc, _, _ = run(capsys, "convert", flax_dir, st_dir, "--to", "pytorch")
    assert rc == 0
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(st_dir, device="cpu")
    assert st.max_seq_length == 64
    np.testing.assert_allclose(st.encode(SENTS), ref.encode(SENTS), atol=1e-5, rtol=1e-4)


def test_convert_uer_checkpoint(tiny, tiny_enc, tmp_path, capsys, one_device, zh_vocab):
    import torch

    from sbert_flax.checkpoints.uer import hf_to_uer

    # A UER-py sbert checkpoint (two tied towers) made from the tiny HF model's weights.
    hf = weights.flax_to_hf(tiny_enc.param_dict(), tiny_enc.config)
    uer = hf_to_uer(hf, "sbert", tiny_enc.config.num_hidden_layers, tower=0)
    uer.update(hf_to_uer(hf, "sbert", tiny_enc.config.num_hidden_layers, tower=1))
    untied = dict(uer)
    untied["encoder.encoder_1.transformer.0.layer_norm_1.gamma"] = uer[
        "encoder.encoder_1.transformer.0.layer_norm_1.gamma"] + 1.0
    ckpt, untied_ckpt = str(tmp_path / "model.bin"), str(tmp_path / "untied.bin")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in uer.items()}, ckpt)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in untied.items()}, untied_ckpt)
    uer_cfg = tmp_path / "config.json"
    uer_cfg.write_text(json.dumps({"emb_size": 32, "hidden_size": 32, "heads_num": 4,
                                   "feedforward_size": 37, "layers_num": 2}))
    dest = str(tmp_path / "flax")
    rc, _, err = run(capsys, "convert", ckpt, dest, "--uer-config", str(uer_cfg), "--vocab", zh_vocab)
    assert rc == 0, err
    got = SentenceEncoder.from_pretrained(dest, devices=one_device)
    assert got.pooling.mode == "cls" and got.max_seq_length == 128  # UER defaults
    ref = SentenceEncoder.from_pretrained(tiny, pooling="cls", devices=one_device)
    np.testing.assert_allclose(got.encode(SENTS), ref.encode(SENTS), atol=1e-6)

    # Untied towers: refused unless a tower is named; --tower 0 takes tower 0's weights.
    args = ["--uer-config", str(uer_cfg), "--vocab", zh_vocab]
    rc, _, err = run(capsys, "convert", untied_ckpt, str(tmp_path / "u"), *args)
    assert_user_error(rc, err, "towers are not tied", "tower=0 or tower=1")
    assert not os.path.exists(tmp_path / "u")
    rc, _, err = run(capsys, "convert", untied_ckpt, str(tmp_path / "u"), *args, "--tower", "0")
    assert rc == 0, err
    u = SentenceEncoder.from_pretrained(str(tmp_path / "u"), devices=one_device)
    np.testing.assert_array_equal(u.encode(SENTS[:2]), got.encode(SENTS[:2]))

    rc, _, err = run(capsys, "convert", ckpt, str(tmp_path / "x"))
    assert_user_error(rc, err, "--uer-config", "--vocab")


def test_convert_missing_src(tmp_path, capsys):
    rc, _, err = run(capsys, "convert", str(tmp_path / "no" / "such" / "model"), str(tmp_path / "out"))
    assert_user_error(rc, err, "model directory not found")
    assert not os.path.exists(tmp_path / "out")


# ---- encode ----------------------------------------------------------------------------------

def test_encode_keeps_line_order_and_empty_lines(tiny, tiny_enc, tmp_path, capsys):
    lines = ["那个人很开心", "", "  ", "😀 emoji", "今天天气很好。"]
    src = tmp_path / "in.txt"
    src.write_bytes(("\r\n".join(lines) + "\n").encode("utf-8"))  # CRLF, final newline
    out = tmp_path / "emb.npy"
    rc, _, err = run(capsys, "encode", "--model", tiny, "--input", str(src), "--output", str(out),
                     "--batch-size", "2", "--normalize")
    assert rc == 0, err
    emb = np.load(out)
    assert emb.shape == (len(lines), tiny_enc.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, tiny_enc.encode(lines, normalize=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["emb.npy", "in.txt"]  # no temp file left


def test_encode_bfloat16_outputs_float32(tiny, tiny_enc, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTS), encoding="utf-8")  # no final newline
    out = tmp_path / "emb.npy"
    rc, _, _ = run(capsys, "encode", "--model", tiny, "--input", str(src), "--output", str(out),
                   "--dtype", "bfloat16", "--max-seq-length", "16")
    assert rc == 0
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (len(SENTS), tiny_enc.dim)
    ref = tiny_enc.encode(SENTS, max_seq_length=16)
    cos = np.sum(emb * ref, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999  # measured 0.999997 (see test_encoder's bf16 test)


@pytest.mark.parametrize("problem", ["model", "input", "output_dir", "utf8"])
def test_encode_user_errors(tiny, tmp_path, capsys, problem):
    src = tmp_path / "in.txt"
    src.write_text("你好\n", encoding="utf-8")
    model, out = tiny, tmp_path / "emb.npy"
    needle = {"model": "model directory not found", "input": "input file not found",
              "output_dir": "output directory does not exist", "utf8": "in.txt:2: not valid UTF-8"}
    if problem == "model":
        model = str(tmp_path / "missing_model")
    elif problem == "input":
        src = tmp_path / "missing.txt"
    elif problem == "output_dir":
        out = tmp_path / "no_dir" / "emb.npy"
    else:
        src.write_bytes(b"ok\n\xff\xfe bad\n")
    rc, _, err = run(capsys, "encode", "--model", model, "--input", str(src), "--output", str(out))
    assert_user_error(rc, err, needle[problem])
    assert not out.exists()


# ---- similarity ------------------------------------------------------------------------------

def test_similarity_prints_cosine_per_sentence(tiny, tiny_enc, capsys):
    rc, out, _ = run(capsys, "similarity", "--model", tiny, *SENTS[:3])
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split("\t")[1] for ln in lines] == SENTS[1:3]
    emb = tiny_enc.encode(SENTS[:3])
    want = tiny_enc.similarity(emb[:1], emb[1:])[0]
    np.testing.assert_allclose([float(ln.split("\t")[0]) for ln in lines], want, atol=1e-4)


def test_similarity_needs_two_sentences(tiny, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["similarity", "--model", tiny, "只有一句"])
    assert e.value.code == 2


# ---- eval-sts --------------------------------------------------------------------------------

def test_eval_sts(tiny, tiny_enc, tmp_path, capsys):
    data = tmp_path / "sts.tsv"
    data.write_text("那个人很开心\t那个人非常开心\t5\n那个人很开心\t那只猫很开心\t2\n"
                    "今天天气很好。\t那只猫很开心\t0\n今天天气很好。\t天气很好\t4\n", encoding="utf-8")
    rc, out, _ = run(capsys, "eval-sts", "--model", tiny, "--data", str(data), "--batch-size", "8")
    assert rc == 0
    r = evaluate_sts(tiny_enc, str(data))
    assert f"spearman x100: {100 * r['spearman']:.2f}" in out
    assert f"pearson  x100: {100 * r['pearson']:.2f}" in out
    assert "4 pairs" in out


def test_eval_sts_malformed_line(tiny, tmp_path, capsys):
    data = tmp_path / "bad.tsv"
    data.write_text("a\tb\t1\na\tb\t2\nonly one field\n", encoding="utf-8")
    rc, _, err = run(capsys, "eval-sts", "--model", tiny, "--data", str(data))
    assert_user_error(rc, err, f"{data}:3:", "expected 3 tab-separated fields")


# ---- train slot ------------------------------------------------------------------------------

def test_train_forwards_argv_to_training_cli(monkeypatch):
    seen = []
    fake = types.ModuleType("sbert_flax.cli.train")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sbert_flax.cli.train", fake)
    assert cli.main(["train", "--config", "x.py", "--help"]) == 0
    assert seen == [["--config", "x.py", "--help"]]


def test_train_unavailable(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sbert_flax.cli.train", None)  # import -> ModuleNotFoundError
    rc, _, err = run(capsys, "train", "--epochs", "1")
    assert rc == 2 and "training is not available" in err


def test_default_model_offline_names_it_without_traceback(tmp_path):
    # No --model: the default is uer/sbert-base-chinese-nli from the hub, unreachable here.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               SBERT_FLAX_COMPILATION_CACHE="0")
    r = subprocess.run(["sbert-flax", "similarity", "那个人很开心", "那个人非常开心"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "uer/sbert-base-chinese-nli" in r.stderr and "local directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_libtpu_noise_on_a_host_without_a_tpu(tiny, tmp_path):
    """The `test` extra installs libtpu; without JAX_PLATFORMS, JAX then probes for a TPU and, on
    a host without one, libtpu logs a screenful ("could not determine TPU accelerator type"...).
    The CLI starts the backends with that held back: the command's output is all there is."""
    from sbert_flax.aot import libtpu

    assert libtpu.installed(), "the test extra installs libtpu (jax[tpu])"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(HF_HUB_OFFLINE="1", SBERT_FLAX_COMPILATION_CACHE="0")
    r = subprocess.run(["sbert-flax", "similarity", "--model", tiny, "那个人很开心", "那个人非常开心"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "TPU" not in r.stderr and "libtpu" not in r.stderr, r.stderr
    assert r.stdout.strip().endswith("那个人非常开心"), r.stdout


def test_search_prints_top_k(tiny, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("那个人很开心\n那只猫很开心\n今天下雨了\n", encoding="utf-8")
    queries = tmp_path / "q.txt"
    queries.write_text("那个人很开心\n", encoding="utf-8")
    cache = tmp_path / "corpus.npy"
    argv = ["search", "--model", tiny, "--corpus", str(corpus), "--queries", str(queries),
            "--top-k", "2", "--json", "--corpus-embeddings", str(cache)]
    assert cli.main(argv) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["query"] == "那个人很开心" and len(rec["hits"]) == 2
    assert rec["hits"][0]["corpus_id"] == 0 and rec["hits"][0]["text"] == "那个人很开心"
    assert rec["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert cache.exists()
    assert cli.main(argv) == 0  # second run reads the cached corpus embeddings
    assert json.loads(capsys.readouterr().out.strip()) == rec
