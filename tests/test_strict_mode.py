"""Strict mode (tests/conftest.py): in CI every skip fails the run, with its reason; locally tests
may skip. And a reference-model fixture skips only when the model cannot be fetched, never on a
bug. The probes run in a pytest subprocess that uses this suite's own conftest.py."""

import os
import shutil
import subprocess
import sys

import conftest
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

PROBE = '''
import pytest

import conftest
from sbert_flax.common import devdata


def test_passes():
    pass


def test_skips():
    pytest.skip("probe: data absent")


@pytest.mark.skipif(True, reason="probe: marked")
def test_marked():
    pass


def test_offline_model_skips(monkeypatch):
    def offline(name):
        raise devdata.ReferenceModelUnavailable("probe: no network")

    monkeypatch.setattr(devdata, "reference_model", offline)
    conftest._reference_model("m3e-small")


def test_bug_in_model_fetch_errors(monkeypatch):
    def buggy(name):
        raise KeyError("probe: a bug")

    monkeypatch.setattr(devdata, "reference_model", buggy)
    conftest._reference_model("m3e-small")
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_module_for_the_probe")


def test_never_runs():
    pass
'''


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("strict_probe")
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(os.path.join(TESTS, name), d / name)
    (d / "test_probe.py").write_text(PROBE, encoding="utf-8")
    (d / "test_module_skip.py").write_text(MODULE_SKIP, encoding="utf-8")
    return d


def _pytest(probe_dir, **env) -> tuple[subprocess.CompletedProcess, str]:
    # A session of its own: nothing of this run's strictness, nor of its pytest-xdist worker
    # (whose variables tell plugins such as pytest-benchmark that xdist is active).
    full = {k: v for k, v in os.environ.items()
            if k not in ("CI", "SBERT_FLAX_STRICT") and not k.startswith("PYTEST_")}
    full.update(env, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                        "--continue-on-collection-errors", str(probe_dir)],
                       cwd=probe_dir, env=full, capture_output=True, text=True, timeout=300)
    return r, r.stdout + r.stderr


def test_local_run_skips_with_reasons_but_a_bug_still_fails(probe_dir):
    r, out = _pytest(probe_dir)
    assert r.returncode == 1, out  # only the bug fails
    assert "1 failed, 1 passed, 4 skipped" in out, out
    for reason in ("probe: data absent", "probe: marked", "probe: no network",
                   "no_such_module_for_the_probe"):
        assert reason in out, (reason, out)
    assert "FAILED test_probe.py::test_bug_in_model_fetch_errors" in out, out
    assert "KeyError" in out


def test_strict_run_fails_every_skip_with_its_reason(probe_dir):
    # CI's own switch; SBERT_FLAX_STRICT=1 selects the same mode (test_strict_mode_switch).
    r, out = _pytest(probe_dir, CI="true")
    assert r.returncode == 1, out
    # The two skips and the offline model fail, the bug too; a skip mark (at setup) and a
    # module-level skip (at collection) become errors. Nothing is reported skipped.
    assert "3 failed, 1 passed, 2 errors" in r.stdout.splitlines()[-1], out  # pytest's summary line
    for reason in ("probe: data absent", "probe: marked", "probe: no network",
                   "no_such_module_for_the_probe"):
        assert any("skipped in strict mode" in line and reason in line
                   for line in out.splitlines()), (reason, out)
    assert not any(line.startswith("SKIPPED") for line in out.splitlines()), out


def test_strict_mode_switch(monkeypatch):
    for ci, strict, want in [("", "", False), ("true", "", True), ("1", "", True),
                             ("", "1", True), ("true", "0", False), ("", "0", False),
                             ("false", "", False)]:
        monkeypatch.setenv("CI", ci)
        monkeypatch.setenv("SBERT_FLAX_STRICT", strict)
        assert conftest.strict_mode() is want, (ci, strict)
