"""The preflight part: what ran where, and a check that the stack works, in seconds.

Records the package versions, the device, the git commit and the environment the lease ran
under; runs a jitted forward + grad of a tiny SentenceEmbedder (a flax/jax mismatch fails here,
not minutes into the encode part); writes the random model folder the other parts load.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess

from gpu.inputs import make_model_dir, vocab_path
from gpu.result_file import Clock, error_text, update_json
from gpu.sizes import PACKAGES

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git() -> dict:
    """The checkout's commit and whether it is dirty (GIT_COMMIT where the copy has no .git)."""
    out = {"commit": os.environ.get("GIT_COMMIT") or None, "dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=_REPO)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, cwd=_REPO)
            out["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _nvidia_smi() -> str | None:
    """The GPU's name, driver, max SM clock and memory as nvidia-smi says (None without it)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi",
                            "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or r.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return error_text(e)


def preflight(args, sizes: dict) -> None:
    """The "env" section (rewritten as it fills), then the random model folder at `args.model`."""
    clock = Clock(args.budget_s)
    env: dict = {"python": platform.python_version(), "host": platform.node(),
                 "dry_run": args.dry_run, "git": _git(), "nvidia_smi": _nvidia_smi(),
                 "started": datetime.datetime.now(datetime.timezone.utc)
                 .isoformat(timespec="seconds"),
                 "PYTHONPATH": os.environ.get("PYTHONPATH"),
                 "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                 "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                 "versions": {}}
    for p in PACKAGES:
        try:
            env["versions"][p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    update_json(args.json, "env", env)
    with clock.step("import jax, flax, sbert_flax", env, "import_s"):
        import flax
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import sbert_flax.inference.encoder  # noqa: F401  (orbax, tokenizers: the encode path)
        from sbert_flax.models.config import BertConfig, PoolingConfig
        from sbert_flax.models.embedder import abstract_embedder
        from sbert_flax.training import losses, optim, state, step  # noqa: F401
    env["modules"] = {"jax": jax.__version__, "flax": flax.__version__,
                      "flax_file": flax.__file__, "jax_file": jax.__file__}
    dev = jax.devices()[0]
    env["device"] = {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
                     "all": [str(d) for d in jax.devices()]}
    print(json.dumps({k: env[k] for k in ("versions", "modules", "device", "git")}, indent=1),
          flush=True)
    update_json(args.json, "env", env)
    with clock.step("tiny SentenceEmbedder forward + grad (flax/jax check)", env, "sanity_s"):
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37)
        # Abstract + filled (eager random init is one dispatch per param: seconds on a CPU).
        graphdef, abstract = abstract_embedder(cfg, PoolingConfig("mean"), jnp.bfloat16)
        params = jax.tree.map(lambda a: jnp.full(a.shape, 0.02, a.dtype), abstract)
        ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64

        def loss(p):
            return nnx.merge(graphdef, p)(ids, jnp.ones_like(ids)).sum()

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        ok = bool(jnp.isfinite(value)) and all(bool(jnp.all(jnp.isfinite(g)))
                                               for g in jax.tree.leaves(grads))
        if not ok:
            raise RuntimeError("the tiny embedder's loss or gradients are not finite")
    with clock.step("random model folder", env, "model_s"):
        make_model_dir(args.model, sizes, vocab_path())
    env["model_dir"] = args.model
    update_json(args.json, "env", env)
