"""`sbert-flax encode`: one sentence a line -> a `.npy` of embeddings (streamed; sharded over
processes with the multi-host flags)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from sbert_flax.aot import libtpu
from sbert_flax.cli.args import load_encoder, model_args
from sbert_flax.common.distributed import add_distributed_flags
from sbert_flax.inference.quantization import PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="embed one sentence per line into a .npy file (streamed)")
    model_args(p, dtype=True)
    p.add_argument("--input", required=True, help="UTF-8 text, one sentence per line")
    p.add_argument("--output", required=True, help=".npy file [lines, dim], row i = line i + 1")
    p.add_argument("--batch-size", type=int, default=None,
                   help="device batch as rows of 64 tokens (default: --max-batch-tokens)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one packed device batch (default 4096)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="output type, as sentence-transformers' quantize_embeddings")
    p.add_argument("--truncate-dim", type=int, help="keep the first N dimensions (Matryoshka)")
    p.add_argument("--prompt", help="text prepended to every line, as sentence-transformers' prompt")
    p.add_argument("--prompt-name", help="a prompt of the model's config_sentence_transformers.json "
                   "(default: its default_prompt_name, if any)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar in sentences/s (default on)")
    p.add_argument("--merge", action="store_true", help="multi-host: merge the shards into "
                   "one .npy (needs a filesystem every process sees)")
    add_distributed_flags(p)
    p.set_defaults(func=run, starts_backends=True)


def run(args: argparse.Namespace) -> int:
    from sbert_flax.common.distributed import init_distributed
    from sbert_flax.inference.corpus import encode_file

    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"input file not found: {args.input}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):  # before the slow part, not after it
        raise FileNotFoundError(f"output directory does not exist: {out_dir}")
    init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    libtpu.start_backends()
    import jax

    enc = load_encoder(args, max_batch_tokens=args.max_batch_tokens)
    t0 = time.perf_counter()
    res = encode_file(enc, args.input, args.output, batch_size=args.batch_size,
                      normalize=args.normalize, precision=args.precision,
                      truncate_dim=args.truncate_dim, show_progress_bar=args.progress,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      merge=args.merge, prompt=args.prompt, prompt_name=args.prompt_name)
    secs = time.perf_counter() - t0
    where = res.path if res.manifest is None else f"{res.path} (manifest {res.manifest})"
    print(f"wrote {res.rows} x {res.dim} {res.dtype} embeddings (lines {res.total_rows}) to {where} "
          f"({secs:.1f} s, {res.rows / max(secs, 1e-9):.1f} sentences/s)", file=sys.stderr)
    return 0
