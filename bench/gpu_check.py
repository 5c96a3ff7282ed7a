"""One GPU lease (issue 16, item 4): bf16 encode and the MNRL train step, measured and profiled.

`bench/gpu_check.sh` runs the parts below, each in its own process under its own `timeout`; each
part merges its section into one JSON file (rewritten atomically after every measurement, so a
part that is killed still leaves what it measured). Each part is a module of `bench/gpu/`, whose
docstring says what it measures:

  preflight  versions, device, git commit; a jitted forward + grad of a tiny SentenceEmbedder
             (a flax/jax mismatch fails here, in seconds); writes the random model folder.
  encode     SentenceEncoder, bf16, packed, at each token budget: timed passes, the host side
             alone, dispatch-side variants, a `jax.profiler` trace (busy fraction, top 10 ops).
  train      the jitted MNRL train step (BERT-base, bf16, seq 128, global batch 256 / 1024):
             step time, sentences/s, tokens/s, MFU, per attention implementation; profiled too.
  st-encode  sentence-transformers (fp16 on CUDA) on the same sentences, for the ratio.
  record-step, summary   the shell's bookkeeping: a part's wall time and exit code; the table.

The model is a random BERT-base-sized Chinese BERT written with numpy. `--dry-run` shrinks
everything so the whole lease runs on a CPU: CI runs it, so the profiling and parsing cannot rot.

    python bench/gpu_check.py preflight --json out.json --model /tmp/m [--dry-run]
    python bench/gpu_check.py encode --json out.json --model /tmp/m [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

# The parts import JAX, torch and the package only when they run: record-step is cheap.
from gpu.encode import encode  # noqa: E402
from gpu.preflight import preflight  # noqa: E402
from gpu.result_file import record_step, summary  # noqa: E402
from gpu.sizes import SIZES  # noqa: E402
from gpu.st_encode import st_encode  # noqa: E402
from gpu.train import train  # noqa: E402

PARTS = {"preflight": preflight, "encode": encode, "train": train, "st-encode": st_encode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=[*PARTS, "record-step", "summary"])
    ap.add_argument("--json", required=True, help="the result file (sections merged in)")
    ap.add_argument("--model", help="random model folder (written by preflight)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, for a CPU")
    ap.add_argument("--section", default="encode",
                    help="encode: the JSON section it writes (a rerun under other settings)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="seconds this part may take: it skips what no longer fits")
    ap.add_argument("--part", dest="step_part", help="record-step: the part's name")
    ap.add_argument("--wall-s", type=float, help="record-step: its wall seconds")
    ap.add_argument("--rc", type=int, help="record-step: its exit code")
    args = ap.parse_args()
    if args.part == "record-step":
        args.part = args.step_part
        return record_step(args)
    if args.part == "summary":
        return summary(args)
    if not args.model:
        ap.error("--model is required")
    sizes = SIZES[args.dry_run]
    PARTS[args.part](args, sizes)


if __name__ == "__main__":
    main()
