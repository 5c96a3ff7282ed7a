"""User errors vs bugs: a bad file, flag value or missing model is one line and exit 2; an error
that is not the user's (a TypeError inside the library, a ValueError from inside numpy) prints
its traceback, says it is a bug and exits 1 -- in `sbert-flax` and in `sbert-flax train`."""

from __future__ import annotations

import numpy as np
import pytest

from sbert_flax.checkpoints import orbax_params as checkpoint
from sbert_flax.cli import main as cli
from sbert_flax.cli import train as train_cli
from sbert_flax.common import errors, files


def _raise(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def test_every_listed_user_error_class_exists():
    classes = errors.user_error_classes(import_modules=True)
    assert len(classes) == sum(len(v) for v in errors.USER_ERROR_CLASSES.values())
    assert all(issubclass(c, Exception) for c in classes)


def test_classification(tmp_path):
    bad_json = tmp_path / "x.json"
    bad_json.write_text("{")
    # The library refusing input: user errors.
    assert errors.is_user_error(_raise(lambda: files.read_json(str(bad_json))))
    assert errors.is_user_error(_raise(lambda: files.read_json(str(tmp_path / "missing.json"))))
    assert errors.is_user_error(OSError(28, "No space left on device"))
    assert errors.is_user_error(ModuleNotFoundError("No module named 'torch'", name="torch"))
    # Not the user's: bugs.
    assert not errors.is_user_error(_raise(lambda: np.reshape(np.zeros(3), (2, 2))))
    assert not errors.is_user_error(_raise(lambda: {}["k"]))
    assert not errors.is_user_error(TypeError("f() got an unexpected keyword argument 'x'"))
    assert not errors.is_user_error(ModuleNotFoundError("no sbert_flax.gone", name="sbert_flax.gone"))
    assert not errors.is_user_error(ImportError("cannot import name 'x'", name="sbert_flax.models.bert"))
    assert not errors.is_user_error(_raise(lambda: (_ for _ in ()).throw(ValueError("test code"))))


@pytest.fixture(scope="module")
def tiny(tiny_bert) -> str:
    return tiny_bert()


def _failing_save(exc_fn):
    def save(directory, *args, **kwargs):
        exc_fn()
    return save


@pytest.mark.parametrize("name, exc_fn", [
    ("TypeError in the library", lambda: checkpoint.load_params(1, 2, 3)),
    ("ValueError inside numpy", lambda: np.reshape(np.zeros(3), (2, 2))),
])
def test_a_bug_prints_its_traceback_and_exits_1(tiny, tmp_path, capsys, monkeypatch, name, exc_fn):
    monkeypatch.setattr(checkpoint, "save_params", _failing_save(exc_fn))
    rc = cli.main(["convert", tiny, str(tmp_path / "dest")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback (most recent call last)" in err and "this is a bug in sbert-flax" in err, err


def test_a_user_error_is_one_line_and_exits_2(tiny, tmp_path, capsys, monkeypatch):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    monkeypatch.setattr(checkpoint, "save_params",
                        _failing_save(lambda: files.read_json(str(bad_json))))
    rc = cli.main(["convert", tiny, str(tmp_path / "dest")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sbert-flax: error: ") and "not valid JSON" in err


def test_train_cli_bug_vs_user_error(tmp_path, capsys, monkeypatch):
    from sbert_flax.training import trainer
    from sbert_flax.training.data import DataError

    def bug(cfg):  # a shape bug surfacing as numpy's ValueError: today's CLI called it bad input
        np.reshape(np.zeros(3), (2, 2))

    def bad_data(cfg):
        raise DataError("train.tsv:3: expected 3 columns, got 2")

    argv = ["--pretrained_model_path", str(tmp_path), "--train_path", str(tmp_path / "t.tsv"),
            "--output_dir", str(tmp_path / "run")]
    monkeypatch.setattr(trainer, "train_and_evaluate", bug)
    rc = train_cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "this is a bug in sbert-flax" in err, err

    monkeypatch.setattr(trainer, "train_and_evaluate", bad_data)
    rc = train_cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "expected 3 columns" in err, err
