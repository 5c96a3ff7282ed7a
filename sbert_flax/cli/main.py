"""The `sbert-flax` console script: convert, encode, search, mine-negatives, similarity, eval, eval-sts, serve, train,
compile.

Only this module parses argv. Errors a user can fix (missing files, corrupt weights, bad config,
malformed input) become one line on stderr and exit code 2; anything else is a bug and prints its
traceback (exit 1). `--debug` shows the traceback of user errors too. `sbert_flax.common.errors` says
which is which.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from collections.abc import Sequence

from sbert_flax.aot import libtpu
from sbert_flax.checkpoints.hub import DEFAULT_MODEL
from sbert_flax.common.distributed import add_distributed_flags
from sbert_flax.common.errors import EXIT_USER_ERROR, is_user_error, report_bug
from sbert_flax.common.files import read_text_lines
from sbert_flax.inference.quantization import PRECISIONS
from sbert_flax.models.config import POOLING_MODES

PROG = "sbert-flax"


class UsageError(ValueError):
    """A bad combination of command-line arguments."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _load_encoder(args: argparse.Namespace, **kwargs):
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


def _check_dest(dest: str, overwrite: bool) -> None:
    # The library refuses too, but only after loading the model; fail before the slow part.
    if os.path.exists(dest) and not overwrite and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise FileExistsError(f"{dest} already exists and is not empty; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    import jax

    from sbert_flax.inference.encoder import SentenceEncoder

    _check_dest(args.dest, args.overwrite)
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


def cmd_encode(args: argparse.Namespace) -> int:
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

    enc = _load_encoder(args, max_batch_tokens=args.max_batch_tokens)
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


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from sbert_flax.util import search_corpus

    corpus, queries = read_lines(args.corpus), read_lines(args.queries)
    enc = _load_encoder(args)
    hits = search_corpus(enc, corpus, queries, top_k=args.top_k,
                         corpus_embeddings_path=args.corpus_embeddings,
                         batch_size=args.batch_size, query_prompt=args.query_prompt,
                         query_prompt_name=args.query_prompt_name,
                         corpus_prompt=args.corpus_prompt,
                         corpus_prompt_name=args.corpus_prompt_name)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for q, qh in zip(queries, hits, strict=True):
            if args.json:
                rec = {"query": q, "hits": [{**h, "text": corpus[h["corpus_id"]]} for h in qh]}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                out.write(f"{q}\n")
                for h in qh:
                    out.write(f"  {h['score']:.4f}\t{h['corpus_id']}\t{corpus[h['corpus_id']]}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_mine_negatives(args: argparse.Namespace) -> int:
    from sbert_flax.retrieval.mining import iter_mined, read_pairs, write_tsv

    # Every input is read and checked before the slow model load; nothing is written on error.
    anchors, positives = read_pairs(args.input)
    corpus = read_lines(args.corpus) if args.corpus else None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output directory does not exist: {out_dir}")
    enc = _load_encoder(args)
    t0 = time.perf_counter()
    # Written block by block as the anchors are mined, to a temp file renamed at the end.
    blocks = iter_mined(
        enc, anchors, positives, corpus=corpus, range_min=args.range_min, range_max=args.range_max,
        max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin, num_negatives=args.num_negatives,
        sampling_strategy=args.sampling_strategy, output_format=args.output_format,
        seed=args.seed, batch_size=args.batch_size, query_prompt=args.query_prompt,
        query_prompt_name=args.query_prompt_name, corpus_prompt=args.corpus_prompt,
        corpus_prompt_name=args.corpus_prompt_name, scratch_dir=args.scratch_dir or out_dir)
    rows = write_tsv(args.output, blocks)
    print(f"wrote {rows} {args.output_format} rows for {len(anchors)} pairs to {args.output} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sbert_flax.cli import serve as command

    return int(command.run(args) or 0)


def cmd_similarity(args: argparse.Namespace) -> int:
    enc = _load_encoder(args)
    sentences = [args.sentence, *args.others]
    emb = enc.encode(sentences, normalize=True)
    cos = enc.similarity(emb[:1], emb[1:])[0]
    for c, s in zip(cos, args.others, strict=True):
        print(f"{c:.4f}\t{s}")
    return 0


def cmd_eval_sts(args: argparse.Namespace) -> int:
    from sbert_flax.retrieval.sts import evaluate_sts, read_sts

    read_sts(args.data)  # report a malformed file before the slow model load
    enc = _load_encoder(args)
    t0 = time.perf_counter()
    r = evaluate_sts(enc, args.data, batch_size=args.batch_size)
    secs = time.perf_counter() - t0
    print(f"{args.data}: {r['pairs']} pairs, cosine vs gold ({secs:.1f} s)")
    print(f"spearman x100: {100 * r['spearman']:.2f}")
    print(f"pearson  x100: {100 * r['pearson']:.2f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from sbert_flax.retrieval.ir_evaluation import (
        SUMMARY_METRICS,
        format_retrieval_table,
        load_beir,
        retrieval_table,
    )
    from sbert_flax.retrieval.sts import format_sts_table, read_sts, sts_table

    if not args.sts and not args.retrieval:
        raise UsageError("eval needs at least one --sts FILE or --retrieval DIR")
    for path in args.sts:
        read_sts(path)  # a missing or malformed file fails before the slow model load
    # Every folder is validated (ids, qrels) before the model loads, and nothing is printed
    # until every result is in: a bad folder leaves no partial table.
    folders = [load_beir(d, args.split) for d in args.retrieval]
    enc = _load_encoder(args)
    sts_rows = sts_table(enc, args.sts, batch_size=args.batch_size) if args.sts else []
    ir_rows = retrieval_table(enc, folders, batch_size=args.batch_size,
                              query_prompt=args.query_prompt,
                              query_prompt_name=args.query_prompt_name,
                              corpus_prompt=args.corpus_prompt,
                              corpus_prompt_name=args.corpus_prompt_name)
    if args.json:
        names = [r["name"] for r in ir_rows]
        # Two folders with the same basename would collide as keys; those keep their path.
        keys = [n if names.count(n) == 1 else r["folder"] for n, r in zip(names, ir_rows, strict=True)]
        out = {"sts": {r["file"]: {"pairs": r["pairs"], "spearman": r["spearman"],
                                   "pearson": r["pearson"]} for r in sts_rows},
               "retrieval": {k: {m: float(r[m]) for m in SUMMARY_METRICS}
                             for k, r in zip(keys, ir_rows, strict=True)}}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    tables = ([format_sts_table(sts_rows)] if sts_rows else []) + \
        ([format_retrieval_table(ir_rows)] if ir_rows else [])
    print("\n\n".join(tables))
    return 0


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


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------

def add_hub_args(p: argparse.ArgumentParser) -> None:
    """--revision / --token / --cache-dir: how a hub id given as --model is fetched."""
    p.add_argument("--revision", help="hub ids: branch, tag or commit (default: the default branch)")
    p.add_argument("--token", help="hub ids: access token for a gated or private model "
                   "(default: HF_TOKEN or the saved `hf auth login`)")
    p.add_argument("--cache-dir", help="hub ids: where downloads are cached (default: "
                   "huggingface_hub's, HF_HUB_CACHE)")


def _model_args(p: argparse.ArgumentParser, dtype: bool = False) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Chinese Sentence-BERT in JAX/Flax: convert, encode, search, evaluate, "
        "serve, and fine-tune (UER siamese softmax or contrastive losses).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert between HF / sentence-transformers / UER-py and sbert-flax",
                       description="HF / sentence-transformers dir -> sbert-flax dir (default); "
                       "--to pytorch writes a sentence-transformers folder; a UER-py .bin SRC "
                       "needs --uer-config and --vocab.")
    add_convert_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("encode", help="embed one sentence per line into a .npy file (streamed)")
    _model_args(p, dtype=True)
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
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("search", help="semantic search: top-k corpus lines for each query line")
    _model_args(p, dtype=True)
    p.add_argument("--corpus", required=True, help="UTF-8 text, one document per line")
    p.add_argument("--queries", required=True, help="UTF-8 text, one query per line")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--corpus-embeddings", help=".npy cache of the corpus embeddings: read when it "
                   "matches the corpus, else written")
    p.add_argument("--output", help="write results here (default stdout)")
    p.add_argument("--json", action="store_true", help="one JSON object per query")
    add_prompt_args(p, "each query", "each corpus line")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("mine-negatives", help="hard negatives for anchor/positive pairs, as "
                       "sentence-transformers' mine_hard_negatives (output trains with mnrl)")
    _model_args(p, dtype=True)
    p.add_argument("--input", required=True, help="TSV with a header naming anchor and positive")
    p.add_argument("--output", required=True, help="TSV: anchor, positive, negative (triplet) or "
                   "negative_1..negative_n (n-tuple); written only on success")
    p.add_argument("--corpus", help="UTF-8 text, one candidate negative per line (default: the "
                   "positives; the positives are always added)")
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--range-min", type=int, default=0, help="skip the N best candidates")
    p.add_argument("--range-max", type=int, help="consider the N best candidates only")
    p.add_argument("--max-score", type=float, help="drop candidates with a higher cosine")
    p.add_argument("--min-score", type=float, help="drop candidates with a lower cosine")
    p.add_argument("--absolute-margin", type=float,
                   help="drop candidates within this cosine of the anchor's positive")
    p.add_argument("--relative-margin", type=float,
                   help="drop candidates above positive - |positive| x this")
    p.add_argument("--sampling-strategy", choices=("top", "random"), default="top")
    p.add_argument("--output-format", choices=("triplet", "n-tuple", "labeled-pair", "labeled-list"),
                   default="triplet")
    p.add_argument("--seed", type=int, default=12, help="random sampling seed")
    p.add_argument("--batch-size", type=int, default=None, help="encode batch (rows of 64 tokens)")
    p.add_argument("--scratch-dir", help="where the embeddings of a corpus over 100,000 texts "
                   "are kept while mining (removed at the end; default: the output's folder)")
    add_prompt_args(p, "the anchors", "the corpus (the candidate negatives)")
    p.set_defaults(func=cmd_mine_negatives)

    p = sub.add_parser("similarity", help="cosine of the first sentence against each of the rest")
    _model_args(p)
    p.add_argument("sentence", metavar="S1")
    p.add_argument("others", metavar="S2", nargs="+")
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("eval-sts", help="Spearman / Pearson x100 of cosine vs gold on s1<TAB>s2<TAB>score")
    _model_args(p, dtype=True)
    p.add_argument("--data", required=True, help="TSV: s1 \\t s2 \\t score per line")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_eval_sts)

    # Only the options: `sbert_flax.cli.serve` imports no optional dependency at module
    # level, so this works without the serve extra (FastAPI, uvicorn), which `serve` itself asks
    # for when it runs (tests/test_optional_deps.py).
    from sbert_flax.cli import serve as serve_command

    serve_command.add_parser(sub)
    sub.choices["serve"].set_defaults(func=cmd_serve)

    # `compile`: the options only here (no JAX import); it runs sbert_flax.cli.compile.run.
    from sbert_flax.cli import compile as compile_command

    compile_command.add_parser(sub)

    p = sub.add_parser("eval", help="Spearman x100 on STS files and their mean, and retrieval "
                       "metrics on BEIR folders (C-MTEB style table)")
    _model_args(p, dtype=True)
    p.add_argument("--sts", action="append", default=[],
                   help="s1<TAB>s2<TAB>score file; repeat for several")
    p.add_argument("--retrieval", action="append", default=[], metavar="DIR",
                   help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv): ndcg@10, "
                   "mrr@10, map@100, recall@1/10/100 with cosine scores; repeat for several")
    p.add_argument("--split", default="test", help="qrels split of the --retrieval folders "
                   "(default: test)")
    p.add_argument("--json", action="store_true",
                   help='print {"sts": {FILE: ...}, "retrieval": {FOLDER: ...}} instead of tables')
    p.add_argument("--batch-size", type=int, default=64)
    add_prompt_args(p, "the --retrieval queries", "the --retrieval documents (STS pairs take none)")
    p.set_defaults(func=cmd_eval)

    sub.add_parser("train", help="fine-tuning: siamese softmax (UER) or contrastive "
                   "(arguments go to the training CLI)", add_help=False)
    return parser


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e)).strip() or type(e).__name__


def _run(func, args, debug: bool) -> int:
    try:
        return func(args)
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
    from sbert_flax.cli import compile as compile_command

    # Backends start quietly now (libtpu's probe for a TPU), except where something must come
    # first: encode's jax.distributed.initialize (it starts them after), compile's libtpu.
    if args.func not in (compile_command.run, cmd_encode):
        libtpu.start_backends()
    return _run(args.func, args, args.debug)


def _enable_compilation_cache() -> None:
    # A second start loads compiled programs instead of compiling them (the library never turns
    # this on by itself: it is process-wide JAX config).
    from sbert_flax.inference.encoder import enable_compilation_cache

    enable_compilation_cache()


def convert_main(argv: Sequence[str] | None = None, *, to: str, uer: bool = False,
                 prog: str | None = None, description: str | None = None) -> int:
    """Entry point of the convert/ scripts: `convert` with a fixed direction."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_convert_args(parser, to=to, uer=uer)
    args = parser.parse_args(argv)
    return _run(cmd_convert, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
