"""Small file helpers shared by conversion, checkpointing and training: nothing half-written.

Everything written atomically (a temp name, then a rename) ends with the modes a plain `open` /
`os.makedirs` would give under the user's umask (0644 files, 0755 folders under umask 022):
`mkstemp` / `mkdtemp` create 0600 / 0700, which would leave a model saved on a shared server
unreadable by a colleague or a serving account.

And everything is durable: the new file (for a folder, each file in it) is fsynced before the
rename and the parent folder after it. Without that, a power loss can persist the rename but not
the data, and leave a zero-length "atomic" file where the old one was. A folder that replaces
another moves the old one aside under a fixed name first (`.NAME.old`); a crash between the two
renames is undone by `recover_directory`, which the next atomic write to that path runs first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux reports it in /proc/self/status; elsewhere it can only be read by setting it, which is
    done under a lock and restored at once (other threads creating files in that instant would
    briefly see umask 077: only more restrictive, never less).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What `open(path, "w")` gives a new file: 0o666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """What `os.makedirs` gives a new folder: 0o777 less the umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def fsync_file(path: str) -> None:
    """Flushes a file's data and size to disk (a close alone leaves them in the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flushes a folder's entries (the renames and creations in it) to disk.

    Best effort where the OS cannot: Windows cannot open a folder, and some filesystems refuse
    fsync on one (EINVAL); there a rename's durability is the filesystem's own.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsyncs every file under `root`, then every folder bottom-up (so each entry is on disk)."""
    for folder, _dirs, names in os.walk(root, topdown=False):
        for n in names:
            p = os.path.join(folder, n)
            if os.path.isfile(p) and not os.path.islink(p):
                fsync_file(p)
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temp file name next to `path`; renames it to `path` only if the block succeeds.

    For writers that want a file name rather than a file object (`numpy.lib.format.open_memmap`,
    `np.save(name)`). The temp file exists (empty) when the block starts; on success it gets the
    umask's mode and replaces `path`, on any error it is removed and `path` is untouched.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        fsync_file(tmp)  # data on disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(parent)  # the rename itself on disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`open(path, mode)` that readers only ever see complete: a temp file renamed on success.

    Args:
      path: destination file; its folder must exist.
      mode: "w" (text) or "wb" (binary).
      encoding: text mode's encoding (default UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


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
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _aside_path(dest: str) -> str:
    """Where an overwrite keeps the old `dest` during its swap: a fixed, recognisable name."""
    return os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.old")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _discard_aside(dest: str) -> None:
    """Deletes the old copy of `dest`: renamed out of the recoverable name first, so a crash
    during the (non-atomic) delete never leaves a half-deleted folder `recover_directory` would
    bring back."""
    aside = _aside_path(dest)
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.trash-", dir=os.path.dirname(dest))
    os.rmdir(trash)
    try:
        os.replace(aside, trash)
    except FileNotFoundError:
        return
    _remove(trash)


def recover_directory(dest: str) -> bool:
    """Finishes or undoes an overwrite of `dest` that a crash interrupted.

    An overwrite renames the old `dest` to `.NAME.old`, the new folder to `dest`, then deletes the
    old one. If `dest` is missing and the old copy exists, the crash came between the renames:
    the old copy is put back (returns True). If both exist, the swap completed and the old copy
    is deleted. Run by every `atomic_directory` on its destination before anything else; a
    loader can run it too.
    """
    dest = os.path.abspath(dest)
    aside = _aside_path(dest)
    if not os.path.lexists(aside):
        return False
    if not os.path.lexists(dest):
        os.replace(aside, dest)
        fsync_dir(os.path.dirname(dest))
        return True
    _discard_aside(dest)
    return False


@contextlib.contextmanager
def atomic_directory(dest: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp directory next to `dest`; renames it to `dest` only if the block succeeds.

    On any error the temp directory is removed and `dest` is untouched. With `overwrite`, an
    existing `dest` is replaced only after the new content is complete and on disk (every file
    fsynced); a crash at any moment leaves the old or the new folder at `dest`, or the old one
    aside, restored by `recover_directory` (run here first). `dest` ends with the umask's folder
    mode (what is written inside keeps the modes its writers gave it).
    """
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    if os.path.isdir(parent):
        recover_directory(dest)
    if os.path.exists(dest) and not overwrite:
        if not (os.path.isdir(dest) and not os.listdir(dest)):
            raise FileExistsError(f"{dest} already exists; choose another path or pass overwrite=True")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, default_dir_mode())  # mkdtemp's 0700 would hide the folder from others
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(dest):
        # Two renames, never one that deletes: from here to the second one `dest` is missing
        # and the aside copy is what `recover_directory` restores.
        os.replace(dest, _aside_path(dest))
        try:
            os.replace(tmp, dest)
        except BaseException:  # e.g. another writer put a folder there: keep the old one
            recover_directory(dest)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)
        _discard_aside(dest)
    else:
        os.replace(tmp, dest)
        fsync_dir(parent)


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


UTF8_BOM = b"\xef\xbb\xbf"


class BadLine(ValueError):
    """A line of an input file that cannot be read; the message is `path:line: what`."""

    def __init__(self, path: str, lineno: int, what: str):
        super().__init__(f"{path}:{lineno}: {what}")
        self.path, self.lineno, self.what = path, lineno, what


def decode_line(raw: bytes, path: str, lineno: int) -> str:
    """One line's bytes as text, the one place input lines are decoded (text files, training
    files, BEIR jsonl): UTF-8, with a BOM on line 1 dropped.

    Raises:
      BadLine: `path:line: not valid UTF-8 (... at byte N of the line); re-save the file as UTF-8`.
    """
    if lineno == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start} of the "
                      "line); re-save the file as UTF-8") from None


def iter_text_lines(path: str) -> Iterator[str]:
    """Streams the lines of a UTF-8 text file, exactly as `read_text_lines` splits them.

    Memory is one line at a time, so a corpus larger than RAM can be read. A NUL byte is an
    error (binary files and UTF-16 text are its usual sources).

    Raises:
      FileNotFoundError: `path` is missing (or a directory).
      ValueError: `path:line: not valid UTF-8 ...` or `path:line: contains a NUL byte`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    lineno = 0
    with open(path, "rb") as f:
        for raw in f:  # splits after b"\n"
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            # A lone \r also ends a line in Python's text mode (and in `read_text_lines`).
            for part in raw.split(b"\r"):
                lineno += 1
                if b"\x00" in part:
                    raise BadLine(path, lineno, "contains a NUL byte; is it a text file (UTF-8, "
                                  "one sentence per line)?")
                yield decode_line(part, path, lineno)


def count_text_lines(path: str) -> int:
    """How many lines `iter_text_lines` yields (validating them on the way)."""
    return sum(1 for _ in iter_text_lines(path))
