"""The library changes no process-wide JAX state: `import sbert_flax` and building and running a
`SentenceEncoder` leave `jax.config` (and the JAX/XLA environment variables) as they were; only
the explicit `sbert_flax.enable_compilation_cache()` turns the persistent cache on.

Each check runs in a fresh interpreter: this test process has already been configured by
conftest.py (8 CPU devices) and by other tests, which would hide a change or fake one.
"""

import json
import os
import subprocess
import sys

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os, sys

import jax

def config():
    plain = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, plain) else repr(v) for k, v in sorted(jax.config.values.items())}

def environ():
    return {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "TF_", "SBERT_FLAX_"))}

model, cache_dir = sys.argv[1], sys.argv[2]
snaps = {"start": (config(), environ())}
import sbert_flax
snaps["import"] = (config(), environ())
enc = sbert_flax.SentenceEncoder.from_pretrained(model, devices=jax.devices()[:1])
emb = enc.encode(["今天天气很好。", "一个男人在弹吉他。"])
assert emb.shape == (2, enc.dim), emb.shape
snaps["encoder"] = (config(), environ())
returned = sbert_flax.enable_compilation_cache(cache_dir)
snaps["enable"] = (config(), environ())
print("SNAPSHOTS" + json.dumps({"snaps": snaps, "returned": returned}))
"""

# Options the old encoder changed and the ones a library is most tempted to touch; the whole
# config is compared, these are named in the failure message first.
WATCHED = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache",
           "jax_enable_x64", "jax_default_matmul_precision", "jax_default_device",
           "jax_num_cpu_devices", "jax_platforms")


def _diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _run(tmp_path, model: str) -> dict:
    env = {k: v for k, v in helpers.without_test_cache(os.environ).items()
           if not k.startswith(("SBERT_FLAX_COMPILATION_CACHE", "SBERT_FLAX_CACHE_DIR", "XLA_FLAGS"))}
    # A user's plain environment: no opt-out of the cache (conftest sets one for this process),
    # one CPU device; HOME moved so nothing the library might write lands in the real one.
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, HOME=str(tmp_path / "home"))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cache_dir = str(tmp_path / "jax_cache")
    r = subprocess.run([sys.executable, "-c", SCRIPT, model, cache_dir], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("SNAPSHOTS"))
    out = json.loads(line[len("SNAPSHOTS"):])
    out["cache_dir"] = cache_dir
    return out


def test_import_and_encoder_change_no_global_config(tmp_path, tiny_bert):
    out = _run(tmp_path, tiny_bert(pooling="mean"))
    snaps = out["snaps"]
    start_cfg, start_env = snaps["start"]
    for stage in ("import", "encoder"):
        cfg, env = snaps[stage]
        changed = _diff(start_cfg, cfg)
        watched = {k: v for k, v in changed.items() if k in WATCHED}
        assert not changed, f"after {stage}: jax.config changed: {watched or changed}"
        assert env == start_env, f"after {stage}: environment changed: {_diff(start_env, env)}"

    # The explicit opt-in does change it, to the directory asked for, and says so.
    changed = _diff(snaps["encoder"][0], snaps["enable"][0])
    assert "jax_compilation_cache_dir" in changed, changed
    assert changed["jax_compilation_cache_dir"][1] == out["cache_dir"]
    assert out["returned"] == out["cache_dir"]
