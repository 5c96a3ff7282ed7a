"""README stays short, every relative link in README.md and docs/ points at a file that exists, every
import they show works, and their Python snippets run.

Fast and offline: the site itself is built by `.ci/run` (`mkdocs build --strict`), which also checks
anchors and the API pages; this catches a moved file before that.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

# [text](target) and ![alt](target), outside code; the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue  # http(s):, mailto:, ... or an anchor within the page
        out.append(target)
    return out


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_docs_site_exists():
    assert (ROOT / "mkdocs.yml").is_file()
    assert (DOCS / "index.md").is_file()


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    missing = []
    for target in _relative_links(path):
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not file_part:
            continue
        if not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)}: links to missing files: {missing}"


# `from sbert_flax... import ...` / `import sbert_flax...` statements in the Python blocks.
PY_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
IMPORT = re.compile(r"^\s*(from sbert_flax[\w.]* import [^#\n]+|import sbert_flax[\w.]*)",
                    re.MULTILINE)


def _doc_imports() -> list[tuple[str, str]]:
    out = []
    for path in _markdown_files():
        for block in PY_BLOCK.findall(path.read_text(encoding="utf-8")):
            out += [(str(path.relative_to(ROOT)), m.strip().rstrip("\\").strip())
                    for m in IMPORT.findall(block)]
    return out


def test_every_import_the_docs_show_works():
    """What README and the docs tell a user to import exists under that name (a moved or renamed
    module fails here, not in a user's first line)."""
    found = _doc_imports()
    assert any("SentenceEncoder" in stmt for _, stmt in found), found  # the tour is still there
    for where, stmt in found:
        if stmt.endswith("("):  # a parenthesised import continued on the next lines
            continue
        try:
            exec(stmt, {})
        except ImportError as e:
            raise AssertionError(f"{where}: `{stmt}` fails: {e}") from None


# A Python block is run unless the line before its fence says why not.
NOT_RUN = "<!-- snippet: not run"
SNIPPET = re.compile(r"^(.*)\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# What the snippets are run with: the hub download answers with a tiny random model (no network
# here; a hub id naming a reranker gets a tiny cross-encoder), in a scratch folder holding the
# files the snippets read.
RUNNER = """
import os, sys
from sbert_flax.checkpoints import hub
hub.download = lambda repo_id, **kwargs: os.environ[
    "DOCS_TINY_RERANKER" if "rerank" in repo_id else "DOCS_TINY_MODEL"]
code = open(sys.argv[1], encoding="utf-8").read()
exec(compile(code, sys.argv[2], "exec"), {"__name__": "__main__"})
"""


def _snippets() -> list[tuple[str, str]]:
    """(where, code): `README.md#1` is README's first Python block."""
    out = []
    for path in _markdown_files():
        blocks = [code for before, code in SNIPPET.findall(path.read_text(encoding="utf-8"))
                  if not before.startswith(NOT_RUN) and "sbert_flax" in code]
        out += [(f"{path.relative_to(ROOT)}#{i}", code) for i, code in enumerate(blocks, 1)]
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    import helpers
    from cross_encoder_helpers import make_tiny_cross_encoder_dir

    root = tmp_path_factory.mktemp("docs")
    return {"DOCS_TINY_MODEL": helpers.make_tiny_bert_dir(str(root / "tiny"), pooling="mean"),
            "DOCS_TINY_RERANKER": make_tiny_cross_encoder_dir(str(root / "reranker"))}


@pytest.mark.parametrize("where, code", _snippets(), ids=[w for w, _ in _snippets()])
def test_python_snippets_run(where, code, tiny_models, tmp_path):
    """Each Python block of README and docs runs as written (the model a tiny random one), so a
    renamed argument or a changed return shape fails here rather than in a user's first try."""
    import subprocess
    import sys

    import helpers

    np = pytest.importorskip("numpy")
    (tmp_path / "corpus.txt").write_text("那个人很开心\n天气很好\n", encoding="utf-8")
    np.save(tmp_path / "emb.npy", np.ones((2, 4), np.float32))
    (tmp_path / "out").mkdir()
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    env = {**helpers.without_test_cache(dict(__import__("os").environ)), **tiny_models}
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")
    r = subprocess.run([sys.executable, "runner.py", "snippet.py", where], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{where} fails:\n{r.stderr[-3000:]}"
