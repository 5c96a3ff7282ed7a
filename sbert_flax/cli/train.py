"""Command line of fine-tuning: UER-py's `run_classifier_siamese.py` flags (plus the contrastive
losses' flags), or a config file.

    python train/run_classifier_siamese.py --pretrained_model_path M --train_path T --dev_path D ...
    sbert-flax train --loss mnrl --pretrained_model_path M --train_path pairs.tsv --sts-dev dev.tsv ...
    sbert-flax train --config run.json epochs_num=2 output_dir=/tmp/run

Multi-host: pass `--coordinator_address host:port --num_processes N --process_id I` on every
host, or nothing on TPU pods / SLURM (auto-detected). Exit codes: 0 done, 1 diverged (NaN/inf),
2 bad input (data, config, paths), 75 (`EXIT_PREEMPTED`) stopped by SIGTERM with a checkpoint saved.
A bug (an error that is not bad input, see `sbert_flax.common.errors`) prints its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from sbert_flax.aot import libtpu
from sbert_flax.common.distributed import add_distributed_flags, init_distributed
from sbert_flax.common.errors import EXIT_USER_ERROR, is_user_error, report_bug
from sbert_flax.training.train_config import (
    BEST_METRICS,
    CHOICES,
    RETRIEVAL_BEST_METRICS,
    TrainConfig,
    _coerce,
)

# A SIGTERM'd run saved its checkpoint and stopped early: not done, not failed. It must not exit 0
# (a scheduler would mark the job complete and never rerun it) nor 1 (read as a crash, it burns a
# retry budget or pages someone). 75 is EX_TEMPFAIL from sysexits.h, "temporary failure, retry
# later": outside the codes a Python crash (1), argparse (2) or a signal death (128+N) produce, so
# a wrapper (`sbatch --requeue` script, Kubernetes podFailurePolicy onExitCodes) can requeue on it
# alone and rerun the same command with --resume.
EXIT_PREEMPTED = 75

# UER-py flags that describe its own model plumbing; accepted so UER command lines run unchanged,
# and ignored with a warning (the architecture comes from the weights and config).
UER_IGNORED_FLAGS = frozenset({
    "tokenizer", "spm_model_path", "embedding", "encoder", "mask", "layernorm_positioning",
    "remove_embedding_layernorm", "feed_forward", "layernorm", "relative_position_embedding",
    "remove_transformer_bias", "remove_attention_scale", "tie_weights", "factorized_embedding_parameterization",
    "parameter_sharing", "optimizer", "scheduler", "fp16", "fp16_opt_level", "soft_targets", "soft_alpha",
    "dropout", "frozen", "vocab_size", "data_processor", "deepspeed", "world_size", "log_path", "log_level",
    "log_file_level",
})


# ---- the command line, generated from TrainConfig ------------------------------------------------
#
# Every TrainConfig field is a flag `--<field>`: its type from the annotation, its default from the
# dataclass, its help from the field's comment in train_config.py, its group from the banner
# comment above it, its choices from `CHOICES`. A field added to TrainConfig is a flag with no edit
# here (tests/training/test_train_cli.py checks that every field has one). The tables below hold only what
# the rule cannot know: the spellings people already type, and the fields with no flag of their own.

# Option strings of a field other than `--<field>`: UER-py's spellings first, then the kebab-case
# aliases earlier versions accepted (a command line that ran before must run unchanged).
SPELLINGS: dict[str, tuple[str, ...]] = {
    "sts_dev_paths": ("--sts-dev", "--sts_dev", "--sts_dev_path"),
    "ir_dev_paths": ("--ir-dev", "--ir_dev"),
    "ir_dev_split": ("--ir_dev_split", "--ir-dev-split"),
    "skip_bad_lines": ("--skip_bad_lines", "--skip-bad-lines"),
    "uer_adamw": ("--uer-adamw", "--uer_adamw"),
    "param_sharding": ("--param-sharding", "--param_sharding"),
    "log_every_steps": ("--log_every_steps", "--report_steps"),
    "has_header": ("--no_header",),  # a True-default bool is turned off by --no_<field> otherwise
}
# Fields without a flag of their own, with why.
NO_FLAG: dict[str, str] = {
    "sts_dev_path": "the old single-file field, folded into sts_dev_paths; --sts_dev_path is an "
                    "alias of --sts-dev",
}
# A tuple field whose items may contain commas (paths) is a repeated flag; other tuple fields are
# one comma-separated value.
REPEATED_SUFFIX = "_paths"
# Metavars where the type name says too little.
METAVARS = {"best_metric": "METRIC", "columns": "COLS", "matryoshka_dims": "DIMS",
            "label_names": "NAMES"}
# Help that adds to a field's comment (what the CLI alone can say).
EXTRA_HELP = {
    "best_metric": f"{' | '.join(BEST_METRICS)} | a retrieval metric of the first --ir-dev "
                   f"({', '.join(RETRIEVAL_BEST_METRICS)})",
    "output_dir": "default ./runs/siamese, or --output_model_path without .bin",
}


def field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (group, help)} from `cls`'s source: a field's trailing comment plus the `#   `
    continuation lines under it; the group is the last `# ---- name ----` banner above it.

    Empty when the source cannot be read (a frozen app): the flags then just have no help.
    """
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, tuple[str, str]] = {}
    group, last = "", None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("def ") or stripped.startswith("@"):
            last = None
            if stripped.startswith("def "):
                break
            continue
        banner = re.fullmatch(r"# -+ (.+?) -+", stripped)
        if banner:
            group, last = banner.group(1), None
            continue
        if last and stripped.startswith("#   "):
            g, text = out[last]
            out[last] = (g, f"{text} {stripped[1:].strip()}".strip())
            continue
        m = re.match(r"(\w+): [^#]+?(?:#(.*))?$", stripped)
        if m:
            last = m.group(1)
            out[last] = (group, (m.group(2) or "").strip())
        else:
            last = None
    return out


def _base(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), True
    return hint, False


def _comma_list(hint: Any, name: str) -> Callable[[str], Any]:
    """A comma-separated value of a tuple field, parsed as a config file's `key=a,b` is."""
    if name == "columns":  # names or field indices, never both: parse_columns says so
        def columns(s: str) -> Any:
            from sbert_flax.training.sources import parse_columns
            return parse_columns(s)
        return columns
    return lambda s: _coerce(s, hint) or None


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any, help_: str,
               extra_names: Sequence[str] = (), required: bool = True) -> None:
    base, _ = _base(hint)
    names = list(SPELLINGS.get(f.name, ()))
    # Unset flags stay out of the namespace: TrainConfig's own defaults apply, never a copy here.
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    if base is bool:
        names = names or [f"--no_{f.name}" if f.default else f"--{f.name}"]
        kw["action"] = "store_false" if f.default else "store_true"
        if f.default:  # the comment says what the field does on; the flag turns it off
            help_ = f"sets {f.name} off ({help_})" if help_ else f"sets {f.name} off"
    elif typing.get_origin(base) is tuple:
        if f.name.endswith(REPEATED_SUFFIX):
            kw.update(action="append", metavar="PATH")
            help_ = f"{help_} (repeatable)"
        else:
            kw["type"] = _comma_list(hint, f.name)
    elif base in (str, int, float):
        kw["type"] = base
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        # No usable default: a run cannot start without it (compile, which reads no data, passes
        # required=False).
        if required and base is str and f.default == "":
            kw["required"] = True
    else:
        raise TypeError(f"TrainConfig.{f.name}: no command-line rule for type {hint}; add one "
                        "to sbert_flax/cli/train.py or list the field in NO_FLAG")
    if f.name in METAVARS:
        kw["metavar"] = METAVARS[f.name]
    if f.name in EXTRA_HELP:
        help_ = f"{help_} -- {EXTRA_HELP[f.name]}" if help_ else EXTRA_HELP[f.name]
    if base is not bool and f.default not in (None, "", ()):
        help_ = f"{help_} (default: {f.default})".lstrip()
    kw["help"] = help_.replace("%", "%%") or None
    group.add_argument(*(names or [f"--{f.name}"]), *extra_names, **kw)


def add_config_flags(p: argparse.ArgumentParser, cls: type = TrainConfig, *,
                     extra_spellings: dict[str, tuple[str, ...]] | None = None,
                     required: bool = True) -> dict[str, argparse._ArgumentGroup]:
    """Adds a flag for every field of `cls` to `p` (the rule above); returns the groups by name.

    `sbert-flax compile` takes the same flags through this, so that no field of a run can be left
    out of what it compiles. `extra_spellings` adds option strings of its own (a field's flag
    keeps its usual ones); `required=False` asks for no field (compile needs no training file).
    """
    comments: dict[str, tuple[str, str]] = {}
    for c in reversed(cls.__mro__):  # a subclass's comments over its bases'
        if dataclasses.is_dataclass(c):
            comments.update(field_comments(c))
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if f.name in NO_FLAG:
            continue
        group, help_ = comments.get(f.name, ("", ""))
        if group not in groups:
            groups[group] = p.add_argument_group(group) if group else p
        _add_field(groups[group], f, hints[f.name], help_,
                   (extra_spellings or {}).get(f.name, ()), required)
    return groups


def _parser(cls: type = TrainConfig) -> argparse.ArgumentParser:
    """The training parser for `cls` (TrainConfig, or a dataclass extending it)."""
    p = argparse.ArgumentParser(prog="sbert-flax train",
                                description="Sentence-BERT fine-tuning: UER-py's siamese softmax recipe "
                                            "or contrastive losses (mnrl, cached-mnrl, cosent).")
    groups = add_config_flags(p, cls)
    out = groups.get("output, checkpoints", p)
    out.add_argument("--output_model_path",
                     help="UER's flag: a .bin path becomes the run directory without .bin")
    add_distributed_flags(p, underscore=True)
    return p


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """The config of a parsed command line: the flags given, the dataclass defaults else."""
    given = vars(args)
    values = {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}
    for name, v in values.items():
        if isinstance(v, list):  # a repeated flag
            values[name] = tuple(v)
    out = getattr(args, "output_model_path", None)
    if "output_dir" not in values and out:
        values["output_dir"] = out[:-4] if out.endswith(".bin") else out
    return cls(**values)


def _parse(argv: Sequence[str]) -> tuple[TrainConfig, argparse.Namespace]:
    if "--config" in argv:
        p = argparse.ArgumentParser(prog="sbert-flax train",
                                    description="Fine-tuning from a TrainConfig JSON file.")
        p.add_argument("--config", required=True, help="JSON object of TrainConfig fields")
        p.add_argument("overrides", nargs="*", help="key=value (values parsed as JSON if they can be)")
        add_distributed_flags(p, underscore=True)
        args = p.parse_args(argv)
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            p.error(f"overrides must be key=value, got {bad}")
        return TrainConfig.from_json(args.config, dict(o.split("=", 1) for o in args.overrides)), args
    p = _parser()
    args, rest = p.parse_known_args(argv)
    unknown = [r[2:].split("=")[0] for r in rest if r.startswith("--")]
    bad = [u for u in unknown if u not in UER_IGNORED_FLAGS]
    if bad:
        p.error(f"unrecognized arguments: {' '.join('--' + b for b in bad)}")
    if unknown:
        print(f"warning: ignoring UER-py flag(s) that do not apply here: {', '.join(unknown)}",
              file=sys.stderr)
    return config_from_args(args), args


def _report(e: Exception) -> int:
    """Bad input: one line, exit 2. Anything else: a bug, with its traceback, exit 1."""
    if not is_user_error(e):
        return report_bug("sbert-flax train", e)
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sbert-flax train ...` and train/run_classifier_siamese.py; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, args = _parse(argv)
    except Exception as e:  # noqa: BLE001 -- a message and an exit code, never a bare crash
        return _report(e)
    init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    libtpu.start_backends()  # quietly, after jax.distributed (see sbert_flax.aot.libtpu)

    from sbert_flax.training.trainer import TrainingDiverged, train_and_evaluate

    try:
        summary = train_and_evaluate(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- a message and an exit code, never a bare crash
        return _report(e)
    if summary.get("preempted"):
        print(f"preempted: checkpoint saved at step {summary['step']} in {cfg.output_dir}/checkpoints; "
              f"rerun with --resume to continue (exit code {EXIT_PREEMPTED}: requeue)", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
