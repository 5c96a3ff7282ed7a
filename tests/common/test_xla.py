"""Per-function XLA:CPU compile options (sbert_flax.common.xla)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from sbert_flax.common import xla


@pytest.fixture
def fresh_options(monkeypatch):
    """Clears the once-per-process option probe before and after a test that changes its inputs."""
    xla._supported_cpu_options.cache_clear()
    yield monkeypatch
    xla._supported_cpu_options.cache_clear()


def test_cpu_devices_get_the_options():
    assert xla.compiler_options(jax.devices("cpu")) == xla.CPU_COMPILER_OPTIONS


def test_non_cpu_devices_get_none():
    gpu = types.SimpleNamespace(platform="gpu")
    assert xla.compiler_options([gpu]) is None
    assert xla.compiler_options([jax.devices("cpu")[0], gpu]) is None
    assert xla.compiler_options([]) is None


def test_flag_set_by_the_user_wins(fresh_options):
    fresh_options.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    assert xla.compiler_options(jax.devices("cpu")) is None


def test_option_unknown_to_this_jaxlib_is_dropped(fresh_options):
    fresh_options.setattr(xla, "CPU_COMPILER_OPTIONS",
                          {"xla_cpu_no_such_option_in_any_jaxlib": True, **xla.CPU_COMPILER_OPTIONS})
    assert xla.compiler_options(jax.devices("cpu")) == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_options_reach_the_compiled_program(tiny_bert, one_device):
    """The encoder's program compiles without YNNPACK fusions (what the option turns off)."""
    from sbert_flax import SentenceEncoder

    x = jnp.ones((256, 256))
    default = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(x, x).compile().as_text()
    assert "ynn" in default  # guards the test: this jaxlib does fuse dots into YNNPACK
    enc = SentenceEncoder.from_pretrained(tiny_bert(), devices=one_device)
    ids = jnp.ones((8, 64), jnp.int32)
    ours = enc._fn("float32", "sentence").lower(enc.params, ids, ids, ids).compile().as_text()
    assert "dot" in ours
    assert "ynn" not in ours
