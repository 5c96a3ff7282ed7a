"""Small file helpers shared by conversion, checkpointing and training: nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


def read_json(path: str) -> dict[str, Any]:
    """Reads a JSON object, naming the file in any error."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def write_json(path: str, obj: Any) -> None:
    """Writes JSON through a temp file + rename, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(dest: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp directory next to `dest`; renames it to `dest` only if the block succeeds.

    On any error the temp directory is removed and `dest` is untouched. With `overwrite`, an
    existing `dest` is replaced only after the new content is complete.
    """
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not overwrite:
        if not (os.path.isdir(dest) and not os.listdir(dest)):
            raise FileExistsError(f"{dest} already exists; choose another path or pass overwrite=True")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dest):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def read_text_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file (a leading BOM dropped, newline characters removed).

    Splits on \\n, \\r\\n and lone \\r like Python's text mode (what UER-py reads with), but not on
    the Unicode separators `str.splitlines` also breaks at, which can occur inside Chinese text.
    A final newline ends the last line; it does not start an empty one.

    Raises:
      FileNotFoundError: `path` is missing (or a directory).
      ValueError: `path:line: not valid UTF-8 ...`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "re-save the file as UTF-8") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines
