"""`sbert-flax similarity`: the cosine of the first sentence against each of the rest."""

from __future__ import annotations

import argparse

from sbert_flax.cli.args import load_encoder, model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similarity", help="cosine of the first sentence against each of the rest")
    model_args(p)
    p.add_argument("sentence", metavar="S1")
    p.add_argument("others", metavar="S2", nargs="+")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    enc = load_encoder(args)
    sentences = [args.sentence, *args.others]
    emb = enc.encode(sentences, normalize=True)
    cos = enc.similarity(emb[:1], emb[1:])[0]
    for c, s in zip(cos, args.others, strict=True):
        print(f"{c:.4f}\t{s}")
    return 0
