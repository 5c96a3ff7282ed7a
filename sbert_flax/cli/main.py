"""The `sbert-flax` console script: the top parser, the error policy, and the dispatch to one module
per command (`sbert_flax.cli.<command>`: `add_parser(sub)` and `run(args)`).

Only the CLI parses argv. Errors a user can fix (missing files, corrupt weights, bad config,
malformed input) become one line on stderr and exit code 2; anything else is a bug and prints its
traceback (exit 1). `--debug` shows the traceback of user errors too. `sbert_flax.common.errors`
says which is which. Parsing imports no JAX: each command imports what it uses when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from sbert_flax.aot import libtpu
from sbert_flax.cli.args import UsageError  # noqa: F401  (re-exported: the CLI's usage error)
from sbert_flax.common.errors import EXIT_USER_ERROR, is_user_error, report_bug

PROG = "sbert-flax"

# The commands in `--help` order: each a module of this package with add_parser(sub) / run(args).
# `train` is not among them: it owns its argv (UER-py's flags) and is forwarded whole.
COMMANDS = ("convert", "encode", "index", "search", "upload", "mine_negatives", "similarity",
            "rerank", "eval_sts", "serve", "compile", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Chinese Sentence-BERT in JAX/Flax: convert, encode, search, evaluate, "
        "serve, and fine-tune (UER siamese softmax or contrastive losses).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sbert_flax.cli.{name}").add_parser(sub)
    sub.add_parser("train", help="fine-tuning: siamese softmax (UER) or contrastive "
                   "(arguments go to the training CLI)", add_help=False)
    return parser


def cmd_train(argv: Sequence[str]) -> int:
    """Forwards to `sbert_flax.cli.train.main(argv)` when training is installed."""
    try:
        training_cli = importlib.import_module("sbert_flax.cli.train")
    except ModuleNotFoundError as e:
        # Only a missing training CLI means "not available"; a broken dependency inside it
        # (e.g. optax absent) is a real error and keeps its traceback.
        if e.name not in ("sbert_flax.training", "sbert_flax.cli.train"):
            raise
        print(f"{PROG}: training is not available in this installation "
              "(sbert_flax.cli.train not found)", file=sys.stderr)
        return 2
    return int(training_cli.main(list(argv)) or 0)


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e)).strip() or type(e).__name__


def run_command(func, args, debug: bool) -> int:
    """Runs one command under the error policy: a user's error is one line and exit 2, a bug its
    traceback and exit 1 (`--debug`: every traceback)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every error ends as a message and an exit code
        if debug:
            raise
        if not is_user_error(e):
            return report_bug(PROG, e)
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (argparse exits with 2 on usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `train` owns everything after it (its own options and --help), so it bypasses our parser.
    first = next((a for a in argv if a != "--debug"), None)
    if first == "train":
        train_argv = argv[argv.index("train") + 1:]
        if not {"-h", "--help"} & set(train_argv):  # help answers without importing JAX
            _enable_compilation_cache()
        return cmd_train(train_argv)
    # Parsing (and --help) imports no JAX: the commands import what they use when they run.
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    # Backends start quietly now (libtpu's probe for a TPU), except where something must come
    # first: encode's jax.distributed.initialize (it starts them after), compile's libtpu.
    if not getattr(args, "starts_backends", False):
        libtpu.start_backends()
    return run_command(args.func, args, args.debug)


def _enable_compilation_cache() -> None:
    # A second start loads compiled programs instead of compiling them (the library never turns
    # this on by itself: it is process-wide JAX config).
    from sbert_flax.inference.encoder import enable_compilation_cache

    enable_compilation_cache()


if __name__ == "__main__":
    sys.exit(main())
