"""`sbert-flax rerank`: score (query, document) pairs with a cross-encoder.

Two modes:

- `--query Q --documents docs.txt [--top-k K] [--json]`: the documents (one per line) ranked for
  the query, best first, as sentence-transformers' `CrossEncoder.rank` orders them; lines of
  `score<TAB>corpus_id<TAB>text`, or with `--json` one JSON list of
  `{"corpus_id", "score", "text"}` (corpus_id = the document's line number - 1).
- `--pairs pairs.tsv --output scores.npy`: every line `text_a<TAB>text_b` scored as
  `CrossEncoder.predict` does; float32 [n] (one label) or [n, labels], row i = line i + 1,
  written to a temp file and renamed. The file is read as it is scored (memory O(window)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from sbert_flax.cli.args import UsageError, add_hub_args, read_lines
from sbert_flax.common.files import iter_text_lines

ACTIVATIONS = ("sigmoid", "identity", "tanh", "relu")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="score (query, document) pairs with a cross-encoder",
                       description="Rank documents for a query (--query/--documents) or score "
                       "a TSV of pairs (--pairs/--output) with a cross-encoder (a "
                       "sentence-transformers CrossEncoder / HF sequence-classification folder, "
                       "a hub id, or a UER-py run_classifier .bin with --vocab and --uer-config).")
    p.add_argument("--model", required=True, help="cross-encoder dir, hub id, or UER-py .bin")
    add_hub_args(p)
    p.add_argument("--max-length", type=int, help="tokens per pair incl. [CLS] and both [SEP]; "
                   "longer pairs lose tokens from the longer text first (default: the model's)")
    p.add_argument("--batch-size", type=int, help="device batch in rows of 64 tokens (default: "
                   "a 4096-token budget)")
    p.add_argument("--activation", choices=ACTIVATIONS, help="applied to the logits (default: "
                   "the model's; sigmoid for one label, identity for several)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (scores are float32 either way)")
    g = p.add_argument_group("rank documents for a query")
    g.add_argument("--query", help="the query")
    g.add_argument("--documents", help="text file, one document per line")
    g.add_argument("--top-k", type=int, help="print only the best K (default: all)")
    g.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    g = p.add_argument_group("score a file of pairs")
    g.add_argument("--pairs", help="TSV file, one text_a<TAB>text_b per line")
    g.add_argument("--output", help="where the scores go (.npy, float32)")
    g.add_argument("--apply-softmax", action="store_true",
                   help="models with several labels: softmax over them (after --activation)")
    g = p.add_argument_group("UER-py checkpoints")
    g.add_argument("--uer-config", help="UER-py (or HF) config json of the .bin file")
    g.add_argument("--vocab", help="vocab.txt of the UER-py model")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> str:
    """Which mode the flags ask for ("rank" or "pairs"); a bad combination is a UsageError."""
    rank = args.query is not None or args.documents is not None
    pairs = args.pairs is not None or args.output is not None
    if rank == pairs:
        raise UsageError("rerank: give either --query and --documents, or --pairs and --output")
    if rank and (args.query is None or args.documents is None):
        raise UsageError("rerank: --query and --documents go together")
    if pairs and (args.pairs is None or args.output is None):
        raise UsageError("rerank: --pairs and --output go together")
    if rank and args.apply_softmax:
        raise UsageError("rerank: --apply-softmax is for --pairs (ranking needs one label)")
    if pairs and (args.top_k is not None or args.json):
        raise UsageError("rerank: --top-k and --json are for --query/--documents")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"rerank: --top-k {args.top_k} must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"rerank: --batch-size {args.batch_size} must be >= 1")
    if (args.vocab is None) != (args.uer_config is None):
        raise UsageError("rerank: --vocab and --uer-config go together (UER-py checkpoints)")
    return "rank" if rank else "pairs"


def read_pairs(path: str) -> Iterator[tuple[str, str]]:
    """The (text_a, text_b) of each line of a TSV file, lazily.

    Raises:
      FileNotFoundError: no such file.
      ValueError: `path:line: ...` for a line without exactly one tab (or not UTF-8).
    """
    for lineno, line in enumerate(iter_text_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected text_a<TAB>text_b (2 tab-separated "
                             f"fields), got {len(fields)}")
        yield fields[0], fields[1]


def run(args: argparse.Namespace) -> int:
    mode = _check_args(args)
    if mode == "pairs":
        if not os.path.isfile(args.pairs):
            raise FileNotFoundError(f"--pairs: file not found: {args.pairs}")
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--output: directory does not exist: {parent}")
    else:
        documents = read_lines(args.documents)  # before the slow model load
    import numpy as np

    from sbert_flax.common.files import atomic_write
    from sbert_flax.inference.cross_encoder import CrossEncoder

    load = {"vocab_path": args.vocab, "config_path": args.uer_config} if args.vocab else {}
    ce = CrossEncoder(args.model, max_length=args.max_length, activation_fn=args.activation,
                      dtype=args.dtype, revision=args.revision, token=args.token,
                      cache_dir=args.cache_dir, **load)
    if mode == "pairs":
        scores = ce.predict(read_pairs(args.pairs), batch_size=args.batch_size,
                            apply_softmax=args.apply_softmax)
        with atomic_write(args.output, "wb") as f:  # a file object: np.save adds no ".npy"
            np.save(f, scores)
        print(f"{len(scores)} pairs scored -> {args.output} (float32 {list(scores.shape)})",
              file=sys.stderr)
        return 0
    results = ce.rank(args.query, documents, top_k=args.top_k, return_documents=True,
                      batch_size=args.batch_size)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    else:
        for r in results:
            print(f"{r['score']:.6f}\t{r['corpus_id']}\t{r['text']}")
    return 0
