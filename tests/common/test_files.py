"""`sbert_flax.common.files`: atomic writes that end with the user's umask modes, never half a file."""

import json
import os
import stat

import numpy as np
import pytest

from sbert_flax.common import files


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    """Runs the test under `request.param` as the process umask, restored afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _want(umask: int, is_dir: bool) -> int:
    # 0644 / 0755 under umask 022; 0640 / 0750 under 027: the umask is honoured, not hard-coded.
    return (0o777 if is_dir else 0o666) & ~umask


def test_current_umask_reads_without_changing(umask):
    assert files.current_umask() == umask
    assert files.current_umask() == umask  # still the same: reading did not change it
    assert files.default_file_mode() == _want(umask, False)
    assert files.default_dir_mode() == _want(umask, True)


def test_atomic_directory_and_nested_files_get_umask_modes(tmp_path, umask):
    dest = tmp_path / "model"
    with files.atomic_directory(str(dest)) as tmp:
        os.makedirs(os.path.join(tmp, "1_Pooling", "deep"))
        files.write_json(os.path.join(tmp, "1_Pooling", "config.json"), {"a": 1})
        with open(os.path.join(tmp, "1_Pooling", "deep", "x.bin"), "wb") as f:
            f.write(b"\0" * 10)
        np.save(os.path.join(tmp, "w.npy"), np.zeros(3))
    seen = 0
    for root, _dirs, names in os.walk(dest):
        assert _mode(root) == _want(umask, True), root
        for n in names:
            assert _mode(os.path.join(root, n)) == _want(umask, False), os.path.join(root, n)
            seen += 1
    assert seen == 3
    assert _mode(dest) == _want(umask, True)
    # No temp folder left beside it.
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_directory_overwrite_gets_umask_mode(tmp_path, umask):
    dest = tmp_path / "model"
    dest.mkdir(mode=0o700)
    (dest / "old.txt").write_text("old")
    with files.atomic_directory(str(dest), overwrite=True) as tmp:
        files.write_json(os.path.join(tmp, "new.json"), [])
    assert sorted(os.listdir(dest)) == ["new.json"]
    assert _mode(dest) == _want(umask, True)
    assert os.listdir(tmp_path) == ["model"]


def test_write_json_and_atomic_write_modes(tmp_path, umask):
    p = tmp_path / "a.json"
    files.write_json(str(p), {"k": "中文"})
    assert files.read_json(str(p)) == {"k": "中文"}
    assert _mode(p) == _want(umask, False)
    b = tmp_path / "b.bin"
    with files.atomic_write(str(b)) as f:
        f.write(b"abc")
    assert b.read_bytes() == b"abc" and _mode(b) == _want(umask, False)
    t = tmp_path / "c.txt"
    with files.atomic_write(str(t), "w") as f:
        f.write("行\n")
    assert t.read_text(encoding="utf-8") == "行\n" and _mode(t) == _want(umask, False)
    n = tmp_path / "e.npy"
    with files.atomic_path(str(n)) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(2, 3))[:] = 1.0
    assert np.load(n).sum() == 6.0 and _mode(n) == _want(umask, False)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin", "c.txt", "e.npy"]


def test_replacing_a_file_keeps_it_whole_and_gets_umask_mode(tmp_path, umask):
    p = tmp_path / "r.json"
    p.write_text("{}")
    os.chmod(p, 0o600)
    files.write_json(str(p), {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2} and _mode(p) == _want(umask, False)


def test_failed_writes_leave_nothing_behind(tmp_path):
    dest = tmp_path / "d"
    with pytest.raises(RuntimeError), files.atomic_directory(str(dest)) as tmp:
        files.write_json(os.path.join(tmp, "x.json"), {})
        raise RuntimeError("boom")
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_write(str(p)) as f:
        f.write(b"new, half")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    with pytest.raises(TypeError):  # not JSON: the old file stays, no temp file remains
        files.write_json(str(p), {"x": object()})
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_atomic_write_refuses_other_modes_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="mode"), files.atomic_write(str(tmp_path / "x"), "a"):
        pass
    with pytest.raises(FileNotFoundError, match="does not exist"), \
            files.atomic_write(str(tmp_path / "no" / "x")):
        pass


def test_orbax_params_in_a_saved_folder_get_umask_modes(tmp_path, umask):
    # The params/ checkpoint of a saved model is written by orbax, not by us: its files and
    # folders must still be readable by others.
    from sbert_flax.checkpoints import orbax_params as checkpoint

    dest = tmp_path / "model"
    with files.atomic_directory(str(dest)) as tmp:
        checkpoint.save_params(tmp, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    bad = []
    for root, _, names in os.walk(dest):
        if _mode(root) != _want(umask, True):
            bad.append(f"{root}: {oct(_mode(root))}")
        bad += [f"{os.path.join(root, n)}: {oct(_mode(os.path.join(root, n)))}" for n in names
                if _mode(os.path.join(root, n)) != _want(umask, False)]
    assert not bad, "\n".join(bad)
    np.testing.assert_array_equal(checkpoint.load_params(str(dest))["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
