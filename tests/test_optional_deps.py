"""The CLI without its optional dependencies: every command but `serve` works, and `serve` says
in one line which extra to install.

The test environment has all extras installed, so one subprocess hides them: every finder on
`sys.meta_path` is wrapped to answer "not found" for the optional packages, which is what an
interpreter without them does (`import torch` raises ModuleNotFoundError, `find_spec` returns
None, so transformers also sees no torch). An eager `import fastapi` (or torch, ...) reached
from any command then fails here. `.ci/plain_install.sh` proves the same on a real `pip install .`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from make_tiny_model import make_tiny_st_dir

# What `pip install .` (no extras) lacks: the serve and torch extras and the test-only packages.
# Not prometheus_client: orbax-checkpoint, a base dependency, requires it.
OPTIONAL = ("torch", "fastapi", "starlette", "uvicorn", "orjson", "httptools", "uvloop",
            "sentence_transformers", "scipy", "sklearn", "openai", "httpx")

DRIVER = r"""
import contextlib, io, json, sys, traceback

BLOCKED = frozenset(sys.argv[1].split(","))


class Hidden:
    # Wraps one meta-path finder; the blocked top-level packages are invisible through it.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self.finder, attr)


already = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not already, f"imported before the block: {already}"
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]

from sbert_flax.cli import main as cli

results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            rc = "exception"
            err.write(traceback.format_exc())
    results.append({"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print(json.dumps({"results": results, "leaked": leaked}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Runs every command once in one subprocess with the optional packages hidden."""
    tmp = tmp_path_factory.mktemp("optional_deps")
    model = make_tiny_st_dir(str(tmp / "model"))
    lines = tmp / "lines.txt"
    lines.write_text("那个人很开心\n那只猫很开心\n\n今天天气很好。\n", encoding="utf-8")
    sts = tmp / "sts.tsv"
    sts.write_text("那个人很开心\t那个人非常开心\t4.5\n那只猫很开心\t今天天气很好。\t0.5\n北京\t猫\t1\n",
                   encoding="utf-8")
    pairs = tmp / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n那个人很开心\t那个人非常开心\n那只猫很开心\t今天天气很好。\n",
                     encoding="utf-8")
    commands = {
        "help": ["--help"],
        "serve": ["serve", "--model", model],
        "similarity": ["similarity", "--model", model, "那个人很开心", "那个人非常开心"],
        "encode": ["encode", "--model", model, "--input", str(lines),
                   "--output", str(tmp / "emb.npy"), "--no-progress"],
        "convert": ["convert", model, str(tmp / "flax")],
        "export": ["convert", str(tmp / "flax"), str(tmp / "st"), "--to", "pytorch"],
        "search": ["search", "--model", model, "--corpus", str(lines), "--queries", str(lines),
                   "--top-k", "1"],
        "eval": ["eval", "--model", model, "--sts", str(sts)],
        # One step of the smallest run: imports the trainer, the input pipeline and the export.
        "train": ["train", "--loss", "mnrl", "--pretrained_model_path", model,
                  "--train_path", str(pairs), "--batch_size", "2", "--max_steps", "1",
                  "--seq_length", "16", "--output_dir", str(tmp / "run"), "--no_progress_bar"],
    }
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-c", DRIVER, ",".join(OPTIONAL),
                        json.dumps(list(commands.values()))],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["leaked"] == [], report["leaked"]
    out = dict(zip(commands, report["results"], strict=True))
    out["_tmp"] = {"path": str(tmp)}
    return out


@pytest.mark.parametrize("name", ["help", "similarity", "encode", "convert", "export", "search",
                                  "eval", "train"])
def test_command_runs_without_optional_packages(runs, name):
    r = runs[name]
    assert r["rc"] == 0, (r["argv"], r["err"][-3000:])
    assert "Traceback" not in r["out"] + r["err"], r["err"][-3000:]


def test_outputs_of_the_commands(runs, one_device):
    """What the commands wrote without the optional packages equals what the full installation
    computes here (the same model, encoded in this process with everything importable)."""
    from sbert_flax import SentenceEncoder

    tmp = runs["_tmp"]["path"]
    assert "serve" in runs["help"]["out"]
    enc = SentenceEncoder.from_pretrained(os.path.join(tmp, "model"), devices=one_device)
    cosines = [float(line.split("\t")[0]) for line in runs["similarity"]["out"].splitlines()]
    e = enc.encode(["那个人很开心", "那个人非常开心"], normalize=True)
    assert cosines == [pytest.approx(float(e[0] @ e[1]), abs=1e-4)], runs["similarity"]["out"]
    lines = ["那个人很开心", "那只猫很开心", "", "今天天气很好。"]
    np.testing.assert_allclose(np.load(os.path.join(tmp, "emb.npy")), enc.encode(lines),
                               rtol=0, atol=1e-5)
    # The exported folder loads back to the same embeddings.
    exported = SentenceEncoder.from_pretrained(os.path.join(tmp, "st"), devices=one_device)
    np.testing.assert_allclose(exported.encode(lines), enc.encode(lines), rtol=0, atol=1e-5)
    assert os.path.isdir(os.path.join(tmp, "run", "best_model"))


def test_serve_without_the_serve_extra_is_one_line(runs):
    r = runs["serve"]
    assert r["rc"] == 2, r
    assert "Traceback" not in r["err"] and r["out"] == "", r
    lines = r["err"].strip().splitlines()
    assert len(lines) == 1, r["err"]
    assert lines[0].startswith("sbert-flax: error: ") and 'pip install "sbert-flax[serve]"' in lines[0]
