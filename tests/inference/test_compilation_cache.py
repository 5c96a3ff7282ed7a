"""A second process start loads compiled encode functions from the persistent cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers

# The child counts JAX's own compilation-cache events; the env turns the cache on (conftest turns
# it off for the CLI in the rest of the suite, which shares one session cache instead) and points it at a fresh directory.
CHILD = r"""
import json, sys
import jax
from jax import monitoring
events = {"hits": 0, "misses": 0}
def listen(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
    elif name == "/jax/compilation_cache/cache_misses":
        events["misses"] += 1
monitoring.register_event_listener(listen)
from sbert_flax import SentenceEncoder, enable_compilation_cache
enable_compilation_cache()  # what the CLI does; the library never turns it on by itself
enc = SentenceEncoder.from_pretrained(sys.argv[1], devices=jax.devices()[:1])
enc.encode(["那个人很开心", "一只猫在睡觉，它很开心。" * 3])
print(json.dumps({**events, "traces": enc.num_compiles}))
"""


def _run(model_dir: str, cache_dir: str) -> dict:
    env = {**helpers.without_test_cache(os.environ), "SBERT_FLAX_COMPILATION_CACHE": "1",
           "SBERT_FLAX_CACHE_DIR": cache_dir, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", CHILD, model_dir], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_start_hits_the_persistent_cache(tiny_bert, tmp_path):
    model_dir = tiny_bert()
    cache = str(tmp_path / "jax-cache")
    first = _run(model_dir, cache)
    assert first["traces"] == 1  # both sentences fit one batch: one compiled shape
    assert first["misses"] >= first["traces"] and first["hits"] == 0
    assert os.listdir(cache), "nothing was written to the compilation cache"
    second = _run(model_dir, cache)
    assert second["misses"] == 0, second
    assert second["hits"] >= second["traces"], second


def test_opt_out_leaves_jax_config_alone(monkeypatch):
    import jax

    from sbert_flax.inference.encoder import enable_compilation_cache

    monkeypatch.setenv("SBERT_FLAX_COMPILATION_CACHE", "0")
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache("/nonexistent/should-not-be-used") is None
    assert jax.config.jax_compilation_cache_dir == before
