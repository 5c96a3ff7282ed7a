"""`sbert-flax compile`: will this training run compile and fit on that TPU slice? Asked on a CPU.

    sbert-flax compile --topology v5e:2x4 --model M --loss mnrl --batch_size 1024 \\
        --seq_length 128 --bf16 [any other `sbert-flax train` flag] [--encode] [--json]
    sbert-flax compile --topology v5e:2x4 --config run.json [flags that override it]

The run is the `TrainConfig` that `sbert-flax train` would build from the same flags (every
field's flag, with train's defaults; `--model` is `--pretrained_model_path`), so no setting of the
run is left out of what is compiled. Exit 0 when every program fits in HBM (less
`--hbm-headroom`), 3 when one does not (the message says what to change), 2 for bad input (an
unknown topology, a missing model, libtpu not installed). Only the options are defined at import
time: the parser is built without importing JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from sbert_flax.aot import libtpu
from sbert_flax.cli.train import add_config_flags, config_from_args
from sbert_flax.training.train_config import TrainConfig

EXIT_DOES_NOT_FIT = 3


# compile's earlier spellings of train's flags, kept so that its command lines run unchanged.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "pretrained_model_path": ("--model",), "batch_size": ("--batch-size",),
    "seq_length": ("--seq-length",), "mini_batch_size": ("--mini-batch-size",),
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the `compile` subcommand to `sub` (the `sbert-flax` subparsers)."""
    p = sub.add_parser(
        "compile", help="AOT-compile a training run's programs (train step, evaluator, encode) "
        "for a TPU topology on this host: memory per chip, fits in HBM, FLOPs per step",
        description="Compiles the programs of the run that `sbert-flax train` would start with "
        "the same flags (the train step with its shardings; the evaluator's when the run names "
        "dev data; with --encode the encoder's) for a TPU slice, with compile-only devices from "
        "libtpu (the `tpu` extra): no TPU and no environment variables needed. The batch is the "
        "run's largest: every text at --seq_length. No data is read: --negatives stands for the "
        "training file's negative columns, --labels_num defaults to 3. Exit 0 when it fits in "
        "HBM, 3 when it does not.")
    p.add_argument("--topology", required=True,
                   help="libtpu topology: v5e:2x4 (v5e-8), v5e:4x4 (v5e-16), v5p:2x2x1 (v5p-8), "
                   "v4:2x2x1 (v4-8), v6e:2x2, ...")
    p.add_argument("--config", help="a TrainConfig JSON file (what `sbert-flax train --config` "
                   "reads); flags given here override its fields")
    p.add_argument("--negatives", type=int, default=0,
                   help="hard-negative columns of the training file (mnrl / cached-mnrl)")
    p.add_argument("--encode", action="store_true",
                   help="also compile every packed encode shape (SentenceEncoder's programs)")
    p.add_argument("--max_batch_tokens", "--max-batch-tokens", dest="max_batch_tokens", type=int,
                   help="--encode: token budget of a packed batch (default: the encoder's)")
    p.add_argument("--max-seq-length", "--max_seq_length", dest="max_seq_length", type=int,
                   help="--encode: tokens per text (default: the model's max_seq_length, what "
                   "`encode` and `serve` run at; a bare config.json: its max_position_embeddings)")
    p.add_argument("--hbm-gib", "--hbm_gib", dest="hbm_gib", type=float,
                   help="HBM per chip in GiB (default: the chip's, from a table of known chips)")
    p.add_argument("--hbm-headroom", "--hbm_headroom", dest="hbm_headroom", type=float,
                   help="share of each chip's HBM left to the TPU runtime (its own buffers and "
                   "the executables): a program fits in the rest (default 0.05)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    # Every TrainConfig field, as `sbert-flax train` spells it; --model is the model flag.
    add_config_flags(p, extra_spellings=SPELLINGS, required=False)
    p.set_defaults(func=run, starts_backends=True)
    return p


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config: `--config`'s fields, overridden by the flags given, train's defaults
    else (as `sbert-flax train` builds it)."""
    values: dict = {}
    if args.config:
        values = dataclasses.asdict(TrainConfig.from_json(args.config))
    return config_from_args(argparse.Namespace(**{**values, **vars(args)}))


def run(args: argparse.Namespace) -> int:
    """Runs `sbert-flax compile`; returns the exit code (0 fits, 3 does not fit)."""
    import jax

    from sbert_flax.aot import run_model
    from sbert_flax.aot.measure import (
        DEFAULT_HBM_HEADROOM,
        advice,
        compile_for_topology,
        format_report,
    )
    from sbert_flax.aot.topology import GiB, compile_only_topology
    from sbert_flax.inference.encoder import DEFAULT_MAX_BATCH_TOKENS

    cfg = train_config(args)
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        raise ValueError(f"--hbm-gib {args.hbm_gib} must be > 0")
    headroom = DEFAULT_HBM_HEADROOM if args.hbm_headroom is None else args.hbm_headroom
    if not 0 <= headroom < 1:
        raise ValueError(f"--hbm-headroom {headroom} must be in [0, 1) (a share of the HBM)")
    with libtpu.start_quiet():  # libtpu's complaints about the TPU it cannot find
        topology = compile_only_topology(
            args.topology, None if args.hbm_gib is None else int(args.hbm_gib * GiB))
    model = run_model.resolve(cfg, encode_seq_length=args.encode and not args.max_seq_length)
    # A compile-only executable goes into the persistent compilation cache but cannot be read
    # back ("PjRtCompiler must be constructed with a Client to call
    # DeserializeLoadedExecutable": a warning on the next run, and a full compile anyway), so
    # none is written: the minimum compile time to cache is lifted for these compiles only.
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        report = compile_for_topology(
            cfg, model.config, model.pooling, topology, encode=args.encode,
            negatives=args.negatives,
            max_batch_tokens=args.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS,
            encode_seq_length=args.max_seq_length or model.max_seq_length,
            hbm_headroom=headroom)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report))
    if report.fits:
        return 0
    usable = report.usable_hbm
    train_fits = report.train.fits(usable)
    bad = next(p for p in report.programs if not p.fits(usable))
    what = "the train step" if not train_fits else f"the {bad.name} program"
    amount = (f"XLA ran out of memory: {bad.error[:300]}" if bad.error
              else f"needs {bad.total / GiB:.2f} GiB per chip")
    failing = "evaluate" if any(bad is p for p in report.evaluate) else "encode"
    tips = advice(report.settings, train_fits, report.train, failing=failing)
    print(f"sbert-flax compile: {what} does not fit on {topology.name} ({amount}; HBM "
          f"{report.hbm / GiB:.2f} GiB per chip, {usable / GiB:.2f} usable with "
          f"{report.hbm_headroom:.0%} headroom); try: " + "; ".join(tips), file=sys.stderr)
    return EXIT_DOES_NOT_FIT
