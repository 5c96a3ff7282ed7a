"""`sbert-flax convert`: HF / sentence-transformers / UER-py weights <-> an sbert-flax or
sentence-transformers folder; also the entry point of the convert/ scripts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from sbert_flax.cli.args import UsageError, add_convert_args, check_dest


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between HF / sentence-transformers / UER-py and sbert-flax",
                       description="HF / sentence-transformers dir -> sbert-flax dir (default); "
                       "--to pytorch writes a sentence-transformers folder; a UER-py .bin SRC "
                       "needs --uer-config and --vocab.")
    add_convert_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from sbert_flax.inference.encoder import SentenceEncoder

    check_dest(args.dest, args.overwrite)
    # Conversion runs no computation; one device is enough to hold the params.
    kwargs = {"devices": jax.local_devices()[:1]}
    if os.path.isfile(args.src):
        if not (args.uer_config and args.vocab):
            raise UsageError(f"{args.src} is a file, read as a UER-py checkpoint: pass --uer-config "
                             "(UER or HF config json) and --vocab (vocab.txt)")
        enc = SentenceEncoder.from_uer(args.src, args.vocab, args.uer_config,
                                       pooling=args.pooling or "cls",
                                       max_seq_length=args.max_seq_length or 128,
                                       tower=args.tower, **kwargs)
    else:
        if args.uer_config or args.vocab:
            raise UsageError("--uer-config/--vocab apply to a UER-py .bin file; "
                             f"{args.src} is not a file")
        enc = SentenceEncoder.from_pretrained(args.src, pooling=args.pooling,
                                              max_seq_length=args.max_seq_length, **kwargs)
    if args.to == "pytorch":
        enc.export_pytorch(args.dest, overwrite=args.overwrite)
        what = "sentence-transformers (PyTorch)"
    else:
        enc.save(args.dest, overwrite=args.overwrite)
        what = "sbert-flax"
    print(f"wrote {what} model to {args.dest} (pooling={enc.pooling.mode}, "
          f"normalize={enc.pooling.normalize}, max_seq_length={enc.max_seq_length}, "
          f"{enc.config.num_hidden_layers} layers, dim {enc.dim})")
    return 0


def convert_main(argv: Sequence[str] | None = None, *, to: str, uer: bool = False,
                 prog: str | None = None, description: str | None = None) -> int:
    """Entry point of the convert/ scripts: `convert` with a fixed direction."""
    from sbert_flax.cli.main import run_command

    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_convert_args(parser, to=to, uer=uer)
    args = parser.parse_args(argv)
    return run_command(run, args, args.debug)
