"""MkDocs hook: the CLI reference, generated from the argparse parsers at build time.

`docs/cli.md` holds the marker `<!-- cli-reference -->`; `on_page_markdown` replaces it with the
`--help` of `sbert-flax` and of every subcommand, taken from `sbert_flax.cli.main.build_parser()` (whose
`serve` and `compile` parsers come from `sbert_flax.cli.serve` / `sbert_flax.cli.compile`)
and, for `train`, from `sbert_flax.cli.train._parser()`. Nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for its subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _block(title: str, help_text: str) -> str:
    return f"### `{title}`\n\n```text\n{help_text.rstrip()}\n```\n"


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to $COLUMNS: the same page on every machine
    from sbert_flax.cli.main import build_parser
    from sbert_flax.cli.train import _parser as train_parser

    parser = build_parser()
    out = [_block("sbert-flax", parser.format_help())]
    for name, sub in _subparsers(parser).items():
        # `train` is a stub in build_parser (its arguments go to the training CLI's own parser).
        text = train_parser().format_help() if name == "train" else sub.format_help()
        out.append(_block(f"sbert-flax {name}", text))
        # A command with subcommands of its own (`index build`) gets each of them too.
        for sub_name, subsub in _subparsers(sub).items():
            out.append(_block(f"sbert-flax {name} {sub_name}", subsub.format_help()))
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
