"""README stays short and every relative link in README.md and docs/ points at a file that exists.

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
