"""The training command line, generated from TrainConfig: every spelling the hand-written parser
took (tests/train_cli_v1.py, frozen) parses to the same TrainConfig, and every field has a flag."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import train_cli_v1

from sbert_flax.cli import train as cli
from sbert_flax.training.train_config import CHOICES, TrainConfig

BASE = ["--pretrained_model_path", "m", "--train_path", "t.tsv"]
# Values for the old string flags, with what else the command line needs for them to be valid.
SAMPLES: dict[str, list[tuple[list[str], list[str]]]] = {
    "matryoshka_dims": [(["16,8"], [])],
    "label_names": [(["entailment,neutral,contradiction"], [])],
    "columns": [(["sentence1,sentence2,label"], []), (["1,2,3"], ["--no_header"])],
    "best_metric": [(["sts_spearman"], ["--sts-dev", "s.tsv"]),
                    (["accuracy"], ["--dev_path", "d.tsv"]),
                    (["ndcg@10"], ["--ir-dev", "beir"])],
    "output_model_path": [(["models/out.bin"], []), (["models/out"], [])],
}
DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")


def _old(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    args, rest = train_cli_v1._parser().parse_known_args(argv)
    assert not rest, rest
    return train_cli_v1.config_from_args(args), args


def _old_command_lines() -> list[list[str]]:
    """One command line per option string of the old parser and value of it."""
    out = []
    for action in train_cli_v1._parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.nargs == 0:
            values = [([], [])]
        elif action.choices:
            values = [([c], []) for c in action.choices]
        elif action.dest in SAMPLES:
            values = SAMPLES[action.dest]
        else:
            v = {int: "3", float: "0.5"}.get(action.type, "x/y")
            values = [([v], [])]
        for opt in action.option_strings:
            if opt in ("--pretrained_model_path", "--train_path"):
                continue
            for value, context in values:
                out.append([*BASE, *context, opt, *value])
    return out


OLD_LINES = _old_command_lines()


def test_old_spellings_enumerated():
    # The frozen parser's flags: a guard that the enumeration above covers them all.
    opts = {o for a in train_cli_v1._parser()._actions for o in a.option_strings}
    assert {"--sts_dev_path", "--report_steps", "--uer-adamw", "--skip-bad-lines",
            "--param-sharding", "--ir_dev", "--no_header", "--output_model_path"} <= opts
    seen = {tok for line in OLD_LINES for tok in line[len(BASE):] if tok in opts}
    assert seen == opts - {"-h", "--help", "--pretrained_model_path", "--train_path"}


@pytest.mark.parametrize("argv", OLD_LINES, ids=lambda a: " ".join(a[len(BASE):]))
def test_every_old_spelling_parses_to_the_same_config(argv):
    old_cfg, old_args = _old(argv)
    new_cfg, new_args = cli._parse(argv)
    assert new_cfg == old_cfg
    for name in DISTRIBUTED:
        assert getattr(new_args, name) == getattr(old_args, name)


def test_a_long_old_command_line_parses_to_the_same_config():
    argv = [*BASE, "--loss", "cosent", "--sts-dev", "a.tsv", "--sts_dev", "b.tsv",
            "--sts_dev_path", "c.tsv", "--ir-dev", "f1", "--ir_dev", "f2", "--best_metric", "map@100",
            "--no_header", "--columns", "1,2,3", "--skip-bad-lines", "--no_pack", "--uer_adamw",
            "--param_sharding", "fsdp", "--mesh_fsdp", "2", "--report_steps", "5", "--no_export",
            "--no_progress_bar", "--output_model_path", "o.bin", "--max_grad_norm", "1",
            "--score_scale", "5", "--bf16", "--remat", "--matryoshka_dims", "32,16",
            "--num-processes", "2", "--process_id", "1", "--coordinator-address", "h:1"]
    old_cfg, old_args = _old(argv)
    new_cfg, new_args = cli._parse(argv)
    assert new_cfg == old_cfg
    assert new_cfg.sts_dev_paths == ("a.tsv", "b.tsv", "c.tsv") and new_cfg.output_dir == "o"
    assert [getattr(new_args, n) for n in DISTRIBUTED] == ["h:1", 2, 1]


def test_defaults_are_the_dataclass_defaults():
    cfg, _ = cli._parse(BASE)
    assert cfg == TrainConfig(pretrained_model_path="m", train_path="t.tsv")
    assert cfg == _old(BASE)[0]


def test_every_field_has_a_flag_with_help():
    actions = {a.dest: a for a in cli._parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name in cli.NO_FLAG:
            assert f.name not in actions and cli.NO_FLAG[f.name]
            continue
        assert f.name in actions, f"TrainConfig.{f.name} has no flag"
        # The help is the field's comment in train_config.py: a field without one says nothing.
        assert actions[f.name].help and len(actions[f.name].help) > 10, f.name
        if f.name in CHOICES:
            assert tuple(actions[f.name].choices) == CHOICES[f.name]


@dataclasses.dataclass(frozen=True)
class _Extended(TrainConfig):
    # ---- new ----
    warmup_steps: int | None = None  # warmup length in steps (overrides warmup)
    #   a second line of help
    tags: tuple[str, ...] = ()  # labels for the run's logs
    extra_dev_paths: tuple[str, ...] = ()  # more dev files
    trust: bool = True  # trust the inputs


def test_a_new_field_becomes_a_flag_with_no_edit():
    p = cli._parser(_Extended)
    actions = {a.dest: a for a in p._actions}
    assert actions["warmup_steps"].option_strings == ["--warmup_steps"]
    assert actions["warmup_steps"].help == ("warmup length in steps (overrides warmup) a second "
                                            "line of help")
    assert actions["trust"].option_strings == ["--no_trust"]
    args = p.parse_args([*BASE, "--warmup_steps", "40", "--tags", "a,b", "--extra_dev_paths",
                         "x,1.tsv", "--extra_dev_paths", "y.tsv", "--no_trust"])
    cfg = cli.config_from_args(args, _Extended)
    assert (cfg.warmup_steps, cfg.tags, cfg.extra_dev_paths, cfg.trust) == (
        40, ("a", "b"), ("x,1.tsv", "y.tsv"), False)
    assert cli.config_from_args(p.parse_args(BASE), _Extended) == _Extended(
        pretrained_model_path="m", train_path="t.tsv")


def test_choices_refused_alike_by_flag_and_config_file(capsys):
    with pytest.raises(SystemExit):
        cli._parse([*BASE, "--pooling", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pooling='bogus'; expected one of first | cls"):
        TrainConfig(pooling="bogus")


def test_uer_ignored_flags_still_warn(capsys):
    cfg, _ = cli._parse([*BASE, "--encoder", "transformer", "--fp16"])
    assert cfg == _old(BASE)[0]
    assert "ignoring UER-py flag(s) that do not apply here: encoder, fp16" in capsys.readouterr().err
