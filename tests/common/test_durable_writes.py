"""Atomic and durable writes.

Atomicity under SIGKILL: a model folder being overwritten, and a JSON file, always load
afterwards (old or new content), never partial, never missing. The writer is
tests/crash_writer.py, a separate process killed for real (no `finally` runs). A SIGKILL leaves
the page cache intact, so those tests cannot see durability; the fsync calls that give it (data
before the rename that names it, the folder after the rename) are recorded in order instead
(`test_fsync_order_*`)."""

import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import helpers
import pytest

from sbert_flax.checkpoints.loading import load_model
from sbert_flax.common import files
from sbert_flax.inference.encoder import SentenceEncoder

WRITER = os.path.join(helpers.TESTS, "crash_writer.py")
KILLS = 20


def _run_writer(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WRITER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _same_tree(a: str, b: str) -> bool:
    """Same file names at every level and the same bytes in each file."""
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(os.path.join(a, d), os.path.join(b, d)) for d in cmp.common_dirs)


def _tree(path: str, files_: dict[str, bytes]) -> str:
    for name, data in files_.items():
        p = os.path.join(path, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return path


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_overwrite_killed_before_each_rename_keeps_a_destination(tmp_path, k):
    # An overwrite renames (1) the old folder aside, (2) the new one in, (3) the old one to the
    # trash. A kill just before rename k, then the next write to the same path (which fails here,
    # to see only what recovery did): the destination is the old folder or the new one.
    old = _tree(str(tmp_path / "old"), {"config.json": b'{"v": 1}', "1_Pooling/config.json": b"{}"})
    new = _tree(str(tmp_path / "new"), {"config.json": b'{"v": 2}', "w.bin": b"\1" * 4096})
    dest = str(tmp_path / "out" / "model")
    os.makedirs(os.path.dirname(dest))
    with files.atomic_directory(dest) as tmp:
        _tree(tmp, {"config.json": b'{"v": 1}', "1_Pooling/config.json": b"{}"})
    proc = _run_writer("kill-at", dest, new, str(k))
    _, err = proc.communicate(timeout=600)  # a ceiling against a hang
    assert proc.returncode in (-signal.SIGKILL, 0), err
    killed = proc.returncode == -signal.SIGKILL
    assert killed or k > 3, f"rename {k} was never reached"

    with pytest.raises(RuntimeError), files.atomic_directory(dest, overwrite=True):
        raise RuntimeError("the next start fails before it writes")
    assert os.path.isdir(dest), f"killed before rename {k}: no destination left"
    assert _same_tree(dest, old) or _same_tree(dest, new)
    # Nothing recoverable is left beside it (only the killed writer's own temp folder).
    leftovers = [n for n in os.listdir(os.path.dirname(dest)) if n != "model"]
    assert all(".tmp-" in n for n in leftovers), leftovers


def test_recover_directory_restores_the_aside_copy(tmp_path):
    dest = tmp_path / "model"
    aside = tmp_path / ".model.old"
    _tree(str(aside), {"config.json": b"{}"})
    assert files.recover_directory(str(dest)) is True
    assert (dest / "config.json").read_bytes() == b"{}" and not aside.exists()
    # Both present: the swap had finished; the old copy goes.
    _tree(str(aside), {"config.json": b"[]"})
    assert files.recover_directory(str(dest)) is False
    assert (dest / "config.json").read_bytes() == b"{}" and not aside.exists()


@pytest.fixture(scope="module")
def two_models(tiny_bert, tmp_path_factory):
    """A tiny model saved twice: the sbert-flax folder and the sentence-transformers export."""
    enc = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean"), buckets=(32,))
    root = tmp_path_factory.mktemp("two_models")
    flax_dir, st_dir = str(root / "flax"), str(root / "st")
    enc.save(flax_dir)
    enc.export_pytorch(st_dir)
    return flax_dir, st_dir


def test_sigkill_at_random_moments_leaves_a_loadable_model(tmp_path, two_models):
    flax_dir, st_dir = two_models
    dest, json_path = str(tmp_path / "model"), str(tmp_path / "run.json")
    rng = random.Random(15)
    seen = set()
    mid_write = 0
    for i in range(KILLS):
        proc = _run_writer("loop", dest, json_path, flax_dir, st_dir)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            # Long enough for several complete writes: each kill lands at a random phase of one.
            time.sleep(rng.uniform(0.02, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=300)  # a ceiling against a hang; a SIGKILL ends it at once
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # A leftover temp folder or file: this kill landed inside a write, not between two.
        leftovers = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path) if ".tmp-" in n]
        mid_write += bool(leftovers)
        for p in leftovers:  # safe to delete (README), and the next count sees only new ones
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        files.recover_directory(dest)  # what the next writer (or a loader) runs first
        if not os.path.exists(dest):
            assert i == 0, "a destination that existed is gone"  # the first write never finished
            continue
        which = "flax" if _same_tree(dest, flax_dir) else "st" if _same_tree(dest, st_dir) else None
        assert which, f"kill {i}: {dest} is neither complete copy: {sorted(os.listdir(dest))}"
        seen.add(which)
        if os.path.exists(json_path):
            with open(json_path, encoding="utf-8") as f:
                assert isinstance(json.load(f)["gen"], int)
    assert seen, "no write ever completed"
    # Writing is most of the loop's time; if few kills land inside a write, the test tests nothing.
    assert mid_write >= KILLS // 4, f"only {mid_write} of {KILLS} kills landed inside a write"
    print(f"{mid_write} of {KILLS} kills landed inside a write")
    loaded = load_model(dest)  # what is there loads with the real loader
    assert loaded.config.hidden_size > 0


def test_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    dest = str(tmp_path / "model")
    with files.atomic_directory(dest) as tmp:
        _tree(tmp, {"config.json": b'{"v": 1}'})
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder into place
            raise OSError(39, "Directory not empty")
        return real(a, b)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="not empty"), files.atomic_directory(dest, overwrite=True) as tmp:
        _tree(tmp, {"config.json": b'{"v": 2}'})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"]
    assert (tmp_path / "model" / "config.json").read_bytes() == b'{"v": 1}'


# ---- durability: the fsync calls, recorded -------------------------------------------------------

@pytest.fixture
def syscalls(monkeypatch):
    """Records ("fsync", path) and ("replace", src, dst) in call order, then calls the real ones."""
    calls: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", os.path.abspath(a), os.path.abspath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return calls


def _index(calls, *call) -> int:
    assert call in calls, (call, calls)
    return calls.index(call)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fds")
def test_fsync_order_of_a_file_write(tmp_path, syscalls):
    dest = str(tmp_path / "run.json")
    files.write_json(dest, {"gen": 1})
    (_, tmp, _), = [c for c in syscalls if c[0] == "replace"]
    # The data reaches the disk before the name points at it, then the rename itself.
    assert _index(syscalls, "fsync", tmp) < _index(syscalls, "replace", tmp, dest) \
        < _index(syscalls, "fsync", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fds")
def test_fsync_order_of_a_folder_overwrite(tmp_path, syscalls):
    dest = str(tmp_path / "model")
    with files.atomic_directory(dest) as tmp:
        _tree(tmp, {"config.json": b"{}"})
    syscalls.clear()
    with files.atomic_directory(dest, overwrite=True) as tmp:
        _tree(tmp, {"config.json": b'{"v": 2}', "1_Pooling/config.json": b"{}"})
    swap_in = next(i for i, c in enumerate(syscalls) if c[:2] == ("replace", tmp))
    synced = [c[1] for c in syscalls[:swap_in] if c[0] == "fsync"]
    # Every file and folder of the new content is on disk before it replaces the old folder...
    for p in ("config.json", "1_Pooling/config.json", "1_Pooling", ""):
        assert os.path.normpath(os.path.join(tmp, p)) in synced, (p, syscalls)
    # ...and the parent's entries (the swap) after it.
    assert ("fsync", str(tmp_path)) in syscalls[swap_in:], syscalls
