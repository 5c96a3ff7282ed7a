"""A frozen copy of the training CLI's hand-written parser as it was before the flags were
generated from TrainConfig (commit 4131e53): tests/training/test_train_cli.py checks that every spelling it
took still parses to the same TrainConfig. Do not update it: it is the old contract.
"""

from __future__ import annotations

import argparse

from sbert_flax.common.distributed import add_distributed_flags
from sbert_flax.training.train_config import (
    BEST_METRICS,
    LOSSES,
    RETRIEVAL_BEST_METRICS,
    TrainConfig,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbert-flax train",
                                description="Sentence-BERT fine-tuning: UER-py's siamese softmax recipe "
                                            "or contrastive losses (mnrl, cached-mnrl, cosent).")
    a = p.add_argument
    a("--pretrained_model_path", required=True, help="HF/sentence-transformers/sbert-flax dir or UER .bin")
    a("--vocab_path", help="vocab file (required for a UER .bin)")
    a("--config_path", help="UER config json (heads_num, pooling ...) or HF config.json")
    a("--pooling", choices=["first", "cls", "mean", "max"],
      help="default: the UER config's; else cls for softmax, the model folder's for the others")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="softmax", choices=LOSSES)
    g.add_argument("--scale", type=float, default=20.0, help="cosine multiplier (mnrl, cosent)")
    g.add_argument("--symmetric", action="store_true", help="mnrl: add the positive->anchor term")
    g.add_argument("--mini_batch_size", type=int, help="cached-mnrl: sentences per forward pass")
    g.add_argument("--matryoshka_dims", help="comma-separated dims, e.g. 768,512,256,128,64")
    g = p.add_argument_group("data")
    g.add_argument("--train_path", required=True, help="TSV/CSV with a header, or JSONL")
    g.add_argument("--dev_path", help="softmax: labelled dev set (accuracy, per-label P/R/F1)")
    g.add_argument("--test_path", help="softmax: labelled test set, evaluated with the best model")
    g.add_argument("--sts-dev", "--sts_dev", "--sts_dev_path", dest="sts_dev_paths", action="append",
                   default=[], help="s1\\ts2\\tscore file; repeat for several (the first picks the best model)")
    g.add_argument("--ir-dev", "--ir_dev", dest="ir_dev_paths", action="append", default=[],
                   help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv): retrieval "
                        "metrics at each evaluation; repeat for several (--best_metric ndcg@10 "
                        "reads the first)")
    g.add_argument("--data_format", default="auto", choices=["auto", "tsv", "csv", "jsonl"])
    g.add_argument("--labels_num", type=int)
    g.add_argument("--label_names", help="comma-separated label strings in id order, e.g. "
                                         "entailment,neutral,contradiction")
    g.add_argument("--columns", help="names of the fields in order (sentence1,sentence2,score), or "
                                     "field indices of the loss's columns (1,2,3 for the raw CNLI file)")
    g.add_argument("--no_header", action="store_true", help="the files have no header line (needs --columns)")
    g.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true")
    g.add_argument("--score_scale", type=float, default=1.0, help="cosent: divide gold scores by this")
    g.add_argument("--group_by_length", action="store_true",
                   help="batches of similar length (default: random batches)")
    g.add_argument("--no_duplicates", action="store_true", help="no text twice in a batch")
    g.add_argument("--no_pack", action="store_true",
                   help="embedding losses: pad each text to its column's length bucket instead of "
                        "packing the batch's texts into shared rows (the default)")
    g.add_argument("--data_threads", type=int, default=2, help="input pipeline threads")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=2e-5)
    g.add_argument("--epochs_num", type=int, default=3)
    g.add_argument("--max_steps", type=int, help="stop after this many steps")
    g.add_argument("--batch_size", type=int, default=64, help="global batch")
    g.add_argument("--seq_length", type=int, default=128)
    g.add_argument("--warmup", type=float, default=0.1)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--uer-adamw", "--uer_adamw", dest="uer_adamw", action="store_true")
    g.add_argument("--max_grad_norm", type=float)
    g.add_argument("--seed", type=int, default=7)
    g.add_argument("--eval_batch_size", type=int)
    g.add_argument("--eval_steps", type=int,
                   help="also evaluate every N steps (default: at each epoch end and the end)")
    g = p.add_argument_group("scale")
    g.add_argument("--param-sharding", "--param_sharding", dest="param_sharding", default="replicated",
                   choices=["replicated", "fsdp"])
    g.add_argument("--mesh_fsdp", type=int, help="fsdp axis size (default: all devices with fsdp, else 1)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master params")
    g.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass (less activation memory)")
    g.add_argument("--scan_layers", action="store_true", help="run the layers as one lax.scan: compile time independent of depth")
    g.add_argument("--peak_flops", type=float, help="per-device peak FLOP/s for MFU (known TPU/GPU peaks otherwise)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", help="run directory (default ./runs/siamese)")
    g.add_argument("--output_model_path", help="UER's flag: a .bin path becomes the run directory without .bin")
    g.add_argument("--save_every_steps", type=int, default=0)
    g.add_argument("--max_to_keep", type=int, default=3)
    # No argparse choices: TrainConfig checks the name (and that a retrieval metric has an
    # --ir-dev folder), so a config file and a command line fail with the same message.
    g.add_argument("--best_metric", metavar="METRIC",
                   help=f"{' | '.join(BEST_METRICS)} | a retrieval metric of the first --ir-dev "
                        f"({', '.join(RETRIEVAL_BEST_METRICS)})")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--force", action="store_true", help="--resume even if seed/data/loss/batch/lr changed")
    g.add_argument("--no_export", action="store_true")
    g.add_argument("--log_every_steps", "--report_steps", dest="log_every_steps", type=int, default=10)
    g.add_argument("--nan_check_every", type=int, default=10)
    g.add_argument("--no_progress_bar", action="store_true")
    add_distributed_flags(p)
    return p


def _ints(s: str | None) -> tuple[int, ...] | None:
    return tuple(int(x) for x in s.split(",")) if s else None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from sbert_flax.training.sources import parse_columns

    out = args.output_dir
    if out is None and args.output_model_path:
        out = args.output_model_path[:-4] if args.output_model_path.endswith(".bin") else args.output_model_path
    return TrainConfig(
        pretrained_model_path=args.pretrained_model_path, vocab_path=args.vocab_path,
        config_path=args.config_path, pooling=args.pooling, loss=args.loss, scale=args.scale,
        symmetric=args.symmetric, mini_batch_size=args.mini_batch_size,
        matryoshka_dims=_ints(args.matryoshka_dims), train_path=args.train_path,
        dev_path=args.dev_path, test_path=args.test_path, sts_dev_paths=tuple(args.sts_dev_paths),
        ir_dev_paths=tuple(args.ir_dev_paths), data_format=args.data_format,
        labels_num=args.labels_num,
        label_names=tuple(args.label_names.split(",")) if args.label_names else None,
        columns=parse_columns(args.columns), has_header=not args.no_header,
        skip_bad_lines=args.skip_bad_lines, score_scale=args.score_scale,
        group_by_length=args.group_by_length, no_duplicates=args.no_duplicates,
        pack=not args.no_pack, data_threads=args.data_threads, learning_rate=args.learning_rate,
        epochs_num=args.epochs_num, max_steps=args.max_steps, batch_size=args.batch_size,
        seq_length=args.seq_length, warmup=args.warmup, weight_decay=args.weight_decay,
        uer_adamw=args.uer_adamw, max_grad_norm=args.max_grad_norm, seed=args.seed,
        eval_batch_size=args.eval_batch_size, eval_steps=args.eval_steps,
        param_sharding=args.param_sharding,
        mesh_fsdp=args.mesh_fsdp, bf16=args.bf16, remat=args.remat, scan_layers=args.scan_layers,
        peak_flops=args.peak_flops, output_dir=out or TrainConfig.output_dir,
        save_every_steps=args.save_every_steps, max_to_keep=args.max_to_keep,
        best_metric=args.best_metric, resume=args.resume, force=args.force,
        export=not args.no_export, log_every_steps=args.log_every_steps,
        nan_check_every=args.nan_check_every, progress_bar=not args.no_progress_bar,
    )
