"""`sbert-flax compile`: will this training run compile and fit on that TPU slice? Asked on a CPU.

    sbert-flax compile --topology v5e:2x4 --model M --loss mnrl --batch_size 1024 \\
        --seq_length 128 --bf16 [--param-sharding fsdp] [--remat] [--encode] [--json]

Exit 0 when every program fits in HBM, 3 when one does not (the message says what to change),
2 for bad input (an unknown topology, a missing model, libtpu not installed). Only the options
are defined at import time: the parser is built without importing JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sbert_flax import libtpu
from sbert_flax.config import POOLING_MODES
from sbert_flax.training.train_config import LOSSES

EXIT_DOES_NOT_FIT = 3


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the `compile` subcommand to `sub` (the `sbert-flax` subparsers)."""
    p = sub.add_parser(
        "compile", help="AOT-compile the train step (and encode) for a TPU topology on this host: "
        "memory per chip, fits in HBM, FLOPs per step",
        description="Compiles the real train step (the one `sbert-flax train` runs, with its "
        "shardings) for a TPU slice, with compile-only devices from libtpu (the `tpu` extra): no "
        "TPU and no environment variables needed. The batch is the run's largest: every text at "
        "--seq_length. Exit 0 when it fits in HBM, 3 when it does not.")
    p.add_argument("--topology", required=True,
                   help="libtpu topology: v5e:2x4 (v5e-8), v5e:4x4 (v5e-16), v5p:2x2x1 (v5p-8), "
                   "v4:2x2x1 (v4-8), v6e:2x2, ...")
    p.add_argument("--model", required=True,
                   help="model folder (HF / sentence-transformers / sbert-flax) or a BERT "
                   "config.json (the architecture is all that is compiled; no weights needed)")
    p.add_argument("--pooling", choices=POOLING_MODES,
                   help="pooling (default: the folder's; mean for a config.json)")
    p.add_argument("--loss", choices=LOSSES, default="mnrl")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64,
                   help="global batch (all chips)")
    p.add_argument("--seq_length", "--seq-length", dest="seq_length", type=int, default=128,
                   help="tokens per text; every text of the batch is compiled at this length")
    p.add_argument("--mini_batch_size", "--mini-batch-size", dest="mini_batch_size", type=int,
                   help="cached-mnrl: sentences per forward pass")
    p.add_argument("--negatives", type=int, default=0,
                   help="hard-negative columns of the training file (mnrl / cached-mnrl)")
    p.add_argument("--labels_num", type=int, help="softmax: classes (default 3)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master params")
    p.add_argument("--param-sharding", "--param_sharding", dest="param_sharding",
                   choices=("replicated", "fsdp"), default="replicated")
    p.add_argument("--mesh_fsdp", type=int, help="fsdp axis size (default: all chips with fsdp)")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
    p.add_argument("--scan_layers", action="store_true", help="the layers as one lax.scan")
    p.add_argument("--no_windowed_einsum", action="store_true",
                   help="no XLA windowed einsum (fsdp all-gathers overlapped with the matmuls): "
                   "less memory, less overlap")
    p.add_argument("--no_pack", action="store_true", help="pad each text column instead of packing")
    p.add_argument("--encode", action="store_true",
                   help="also compile every packed encode shape (SentenceEncoder's programs)")
    p.add_argument("--max_batch_tokens", "--max-batch-tokens", dest="max_batch_tokens", type=int,
                   help="--encode: token budget of a packed batch (default: the encoder's)")
    p.add_argument("--hbm-gib", "--hbm_gib", dest="hbm_gib", type=float,
                   help="HBM per chip in GiB (default: the chip's, from a table of known chips)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)
    return p


def _model(path: str, pooling: str | None):
    from sbert_flax.config import BertConfig, PoolingConfig
    from sbert_flax.loading import load_model

    if os.path.isfile(path) and path.endswith(".json"):
        return BertConfig.from_json_file(path), PoolingConfig(pooling or "mean")
    loaded = load_model(path, pooling=pooling)
    return loaded.config, loaded.pooling


def run(args: argparse.Namespace) -> int:
    """Runs `sbert-flax compile`; returns the exit code (0 fits, 3 does not fit)."""
    import jax

    from sbert_flax.aot.measure import advice, compile_for_topology, format_report
    from sbert_flax.aot.topology import GiB, compile_only_topology
    from sbert_flax.encoder import DEFAULT_MAX_BATCH_TOKENS
    from sbert_flax.training.train_config import TrainConfig

    cfg = TrainConfig(loss=args.loss, batch_size=args.batch_size, seq_length=args.seq_length,
                      mini_batch_size=args.mini_batch_size, labels_num=args.labels_num,
                      bf16=args.bf16, param_sharding=args.param_sharding,
                      mesh_fsdp=args.mesh_fsdp, remat=args.remat, scan_layers=args.scan_layers,
                      windowed_einsum=not args.no_windowed_einsum, pack=not args.no_pack)
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        raise ValueError(f"--hbm-gib {args.hbm_gib} must be > 0")
    with libtpu.start_quiet():  # libtpu's complaints about the TPU it cannot find
        topology = compile_only_topology(
            args.topology, None if args.hbm_gib is None else int(args.hbm_gib * GiB))
    model, pooling = _model(args.model, args.pooling)
    if args.seq_length > model.max_position_embeddings:
        raise ValueError(f"--seq_length {args.seq_length} exceeds the model's "
                         f"max_position_embeddings ({model.max_position_embeddings})")
    # A compile-only executable goes into the persistent compilation cache but cannot be read
    # back ("PjRtCompiler must be constructed with a Client to call
    # DeserializeLoadedExecutable": a warning on the next run, and a full compile anyway), so
    # none is written: the minimum compile time to cache is lifted for these compiles only.
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        report = compile_for_topology(
            cfg, model, pooling, topology, encode=args.encode, negatives=args.negatives,
            max_batch_tokens=args.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report))
    if report.fits:
        return 0
    train_fits = report.train.fits(report.hbm)
    bad = next(p for p in (report.train, *report.encode) if not p.fits(report.hbm))
    what = "the train step" if not train_fits else f"the {bad.name} program"
    amount = (f"XLA ran out of memory: {bad.error[:300]}" if bad.error
              else f"needs {bad.total / GiB:.2f} GiB per chip")
    print(f"sbert-flax compile: {what} does not fit on {topology.name} ({amount}; HBM "
          f"{report.hbm / GiB:.2f} GiB per chip); try: " + "; ".join(advice(report.settings, train_fits, report.train)),
          file=sys.stderr)
    return EXIT_DOES_NOT_FIT
