"""Arguments the commands share (the model, hub, prompt and convert options) and their readers.
Imports no JAX: `--help` builds every parser."""

from __future__ import annotations

import argparse
import os

from sbert_flax.checkpoints.hub import DEFAULT_MODEL
from sbert_flax.common.files import read_text_lines
from sbert_flax.models.config import POOLING_MODES


class UsageError(ValueError):
    """A bad combination of command-line arguments."""


def load_encoder(args: argparse.Namespace, **kwargs):
    """The SentenceEncoder of the model flags (`model_args`)."""
    from sbert_flax.inference.encoder import SentenceEncoder

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return SentenceEncoder.from_pretrained(
        args.model, pooling=args.pooling, max_seq_length=args.max_seq_length,
        dtype=getattr(args, "dtype", "float32"), revision=getattr(args, "revision", None),
        token=getattr(args, "token", None), cache_dir=getattr(args, "cache_dir", None), **kwargs)


def read_lines(path: str) -> list[str]:
    """One sentence per line, so row i of the output is line i+1 of the file; empty lines stay
    empty sentences."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    return read_text_lines(path)


def check_dest(dest: str, overwrite: bool) -> None:
    # The library refuses too, but only after loading the model; fail before the slow part.
    if os.path.exists(dest) and not overwrite and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise FileExistsError(f"{dest} already exists and is not empty; pass --overwrite to replace it")


def add_hub_args(p: argparse.ArgumentParser) -> None:
    """--revision / --token / --cache-dir: how a hub id given as --model is fetched."""
    p.add_argument("--revision", help="hub ids: branch, tag or commit (default: the default branch)")
    p.add_argument("--token", help="hub ids: access token for a gated or private model "
                   "(default: HF_TOKEN or the saved `hf auth login`)")
    p.add_argument("--cache-dir", help="hub ids: where downloads are cached (default: "
                   "huggingface_hub's, HF_HUB_CACHE)")


def model_args(p: argparse.ArgumentParser, dtype: bool = False) -> None:
    """--model, the hub options, --pooling, --max-seq-length[, --dtype]."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="sbert-flax dir, HF / sentence-transformers dir, or hub id "
                   f"(default: {DEFAULT_MODEL}, downloaded from the hub)")
    add_hub_args(p)
    p.add_argument("--pooling", choices=POOLING_MODES, help="override the model's pooling")
    p.add_argument("--max-seq-length", type=int, help="tokens per sentence incl. [CLS]/[SEP]; "
                   "longer input is truncated (default: the model's)")
    if dtype:
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype (the output is float32 either way)")


def add_prompt_args(p: argparse.ArgumentParser, queries: str, corpus: str) -> None:
    """--query-prompt[-name] (alias --prompt[-name]) and --corpus-prompt[-name]: the prompts of
    the two sides of a search, as sentence-transformers' `prompt` / `prompt_name`."""
    g = p.add_argument_group("prompts (as encode's --prompt / --prompt-name, per side)")
    g.add_argument("--query-prompt", "--prompt", dest="query_prompt",
                   help=f"text prepended to {queries}")
    g.add_argument("--query-prompt-name", "--prompt-name", dest="query_prompt_name",
                   help=f"a prompt of the model's config_sentence_transformers.json for {queries} "
                   "(default: its 'query' prompt, as sentence-transformers' encode_query)")
    g.add_argument("--corpus-prompt", dest="corpus_prompt", help=f"text prepended to {corpus}")
    g.add_argument("--corpus-prompt-name", dest="corpus_prompt_name",
                   help=f"a named prompt for {corpus} (default: its 'document', 'passage' or "
                   "'corpus' prompt, as sentence-transformers' encode_document)")


def add_convert_args(p: argparse.ArgumentParser, to: str | None = None, uer: bool = False) -> None:
    """The `convert` options; `to` fixes the direction, `uer` makes the UER options required."""
    p.add_argument("src", metavar="SRC", help="UER-py .bin file" if uer else
                   "HF / sentence-transformers / sbert-flax dir (or hub id), or a UER-py .bin file")
    p.add_argument("dest", metavar="DEST", help="output directory (written only on success)")
    if to is None:
        p.add_argument("--to", choices=("flax", "pytorch"), default="flax",
                       help="flax: sbert-flax dir (default); pytorch: sentence-transformers folder")
    else:
        p.set_defaults(to=to)
    p.add_argument("--pooling", choices=POOLING_MODES,
                   help="override the pooling (default: the folder's; cls for UER checkpoints)")
    p.add_argument("--max-seq-length", type=int,
                   help="sequence length to record (default: the folder's; 128 for UER)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    g = p.add_argument_group("UER-py checkpoints")
    g.add_argument("--uer-config", required=uer, help="UER-py (or HF) config json of the .bin file")
    g.add_argument("--vocab", required=uer, help="vocab.txt of the UER-py model")
    g.add_argument("--tower", type=int, choices=(0, 1), default=None,
                   help="sbert checkpoints: take this tower and ignore the other (default: "
                   "require tied towers, i.e. identical, and take tower 0)")


def add_db_args(p: argparse.ArgumentParser, required: bool = False,
                collection_help: str = "the collection of the corpus") -> None:
    """--uri / --collection / --db-token: a vector database (`sbert_flax.retrieval.vectorstore`).
    Not `--token`: that is the hub's (`add_hub_args`)."""
    g = p.add_argument_group("vector database (Milvus; the vectordb extra)")
    g.add_argument("--uri", required=required,
                   help="a local file ending in .db (Milvus Lite, embedded: nothing to start) or a "
                   "Milvus server, e.g. http://localhost:19530")
    g.add_argument("--collection", required=required, help=collection_help)
    g.add_argument("--db-token", default=os.environ.get("MILVUS_TOKEN"),
                   help="the server's token, user:password or an API key (default: $MILVUS_TOKEN)")
