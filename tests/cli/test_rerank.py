"""`sbert-flax rerank` on a tiny random cross-encoder, against sentence-transformers' CrossEncoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cross_encoder_helpers as ceh
import helpers
import numpy as np
import pytest

from sbert_flax.cli import main as cli

st = pytest.importorskip("sentence_transformers")
torch = pytest.importorskip("torch")

TOL = 1e-5
DOCS = ["今天天气很好。", "我喜欢吃苹果和香蕉", "", "一个男人在弹吉他。", "北京今天晴，气温二十度"]


@pytest.fixture(scope="module")
def ce_dirs(tmp_path_factory, zh_vocab) -> dict[int, str]:
    return {n: ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp(f"ce{n}")),
                                               num_labels=n, seed=20 + n, max_position=64,
                                               vocab_file=zh_vocab)
            for n in (1, 3)}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _user_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sbert-flax: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


def test_help_imports_no_jax():
    probe = ("import sys\nfrom sbert_flax.cli import main as cli\n"
             "try:\n    cli.main(['rerank', '--help'])\nexcept SystemExit as e:\n"
             "    assert e.code == 0, e.code\n"
             "heavy = {m.partition('.')[0] for m in sys.modules} & {'jax', 'flax', 'torch', "
             "'transformers', 'tokenizers'}\nprint('HEAVY', sorted(heavy))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--documents" in r.stdout and "--pairs" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []", r.stdout[-500:]


def test_rank_documents_as_sentence_transformers(ce_dirs, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    query = "今天天气怎么样"
    want = st.CrossEncoder(ce_dirs[1]).rank(query, DOCS, return_documents=True)
    rc, out, err = run(capsys, "rerank", "--model", ce_dirs[1], "--query", query,
                       "--documents", str(docs), "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert [(r["corpus_id"], r["text"]) for r in got] == [(r["corpus_id"], r["text"]) for r in want]
    assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want, strict=True)) <= TOL
    rc, out, err = run(capsys, "rerank", "--model", ce_dirs[1], "--query", query,
                       "--documents", str(docs), "--top-k", "2")
    assert rc == 0, err
    lines = [line.split("\t") for line in out.strip("\n").split("\n")]
    assert [(int(c), t) for _, c, t in lines] == [(r["corpus_id"], r["text"]) for r in want[:2]]
    assert all(abs(float(s) - r["score"]) <= 1e-6 for (s, _, _), r in zip(lines, want, strict=False))


@pytest.mark.parametrize("n", [1, 3])
def test_pairs_file_scores_as_sentence_transformers(ce_dirs, tmp_path, capsys, n):
    pairs = ceh.make_pairs(8, seed=21, max_len=25)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    out_path = tmp_path / "scores"  # no .npy suffix: written exactly where asked
    extra = ["--apply-softmax"] if n == 3 else ["--activation", "identity"]
    rc, _, err = run(capsys, "rerank", "--model", ce_dirs[n], "--pairs", str(tsv),
                     "--output", str(out_path), "--batch-size", "4", *extra)
    assert rc == 0, err
    got = np.load(out_path)
    ref = st.CrossEncoder(ce_dirs[n])
    want = ref.predict(pairs, apply_softmax=True) if n == 3 else \
        ref.predict(pairs, activation_fn=torch.nn.Identity())
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert sorted(os.listdir(tmp_path)) == ["pairs.tsv", "scores"]  # no temp file left


def test_errors_name_file_and_line(ce_dirs, tmp_path, capsys):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("今天\t明天\n只有一列\n", encoding="utf-8")
    out_path = tmp_path / "scores.npy"
    rc, _, err = run(capsys, "rerank", "--model", ce_dirs[1], "--pairs", str(tsv),
                     "--output", str(out_path))
    _user_error(rc, err, f"{tsv}:2:", "2 tab-separated fields")
    assert not out_path.exists() and sorted(os.listdir(tmp_path)) == ["bad.tsv"]
    rc, _, err = run(capsys, "rerank", "--model", ce_dirs[1], "--pairs", str(tmp_path / "no.tsv"),
                     "--output", str(out_path))
    _user_error(rc, err, "no.tsv")
    rc, _, err = run(capsys, "rerank", "--model", ce_dirs[1], "--query", "q")
    _user_error(rc, err, "--documents")
    docs = tmp_path / "docs.txt"
    docs.write_text("一\n二\n", encoding="utf-8")
    rc, _, err = run(capsys, "rerank", "--model", ce_dirs[3], "--query", "q",
                     "--documents", str(docs))
    _user_error(rc, err, "num_labels=1")
