"""`sbert-flax compile`: the real train step and encode programs, compiled for a v5e:2x2 slice on
this CPU host (libtpu's compile-only devices), in-process beside the 8 CPU devices of the tests.

Kept cheap: a 2-layer hidden-32 model. XLA refuses the plain-mnrl batch of 8192 pairs x 512 tokens
early (its temporaries alone are ~31 GiB a chip), and the same batch under cached-mnrl compiles in
seconds; the models of the big batch have no dropout, which otherwise multiplies the compile time.
(4096 pairs, the batch this test used before the splash attention kernel, now fit: 14.7 GiB a chip
instead of ~25, the kernel keeps no [B, H, L, L] scores.)

That what is compiled is what `sbert-flax train` runs is shown on CPU, without compiling: the
programs compile lowers from a command line have the same StableHLO text as the Trainer's from
the same flags, and every TrainConfig field that changes the graph changes compile's programs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import pytest

from sbert_flax.aot import libtpu, run_model
from sbert_flax.aot.compile_targets import (
    NOT_COMPILED,
    bytes_per_chip,
    evaluate_lowerings,
    largest_batch,
    run_lowerings,
    run_parts,
)
from sbert_flax.aot.measure import DEFAULT_HBM_HEADROOM, CompileReport, ProgramReport
from sbert_flax.aot.topology import Topology, compile_only_topology
from sbert_flax.cli import compile as command
from sbert_flax.cli import main as cli
from sbert_flax.cli import train as train_cli
from sbert_flax.inference.packing import Packer
from sbert_flax.models.config import BertConfig
from sbert_flax.training.train_config import TrainConfig
from sbert_flax.training.trainer import Trainer

TOPOLOGY = "v5e:2x2"
V5E_HBM = 16 * 1024**3
KEYS = {"topology", "chips", "hbm_bytes_per_chip", "bytes_per_chip", "fits", "flops_per_step",
        "compile_seconds"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """A config.json only (the command compiles an architecture; no weights needed)."""
    path = tmp_path_factory.mktemp("aot") / "config.json"
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(cfg.to_hf_dict()))
    return str(path)


def test_train_step_evaluate_and_encode_fit(capsys, tiny_bert):
    model = tiny_bert()  # a model folder (HF, mean pooling, max_seq_length 128), as users pass it
    flags = ["--model", model, "--loss", "mnrl", "--batch_size", "16", "--seq_length", "32",
             "--bf16", "--sts-dev", "dev.tsv", "--eval_batch_size", "8"]
    rc, out, err = run(capsys, "compile", "--topology", TOPOLOGY, *flags, "--encode",
                       "--max_batch_tokens", "256", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert KEYS <= set(rep)
    assert rep["topology"] == TOPOLOGY and rep["chips"] == 4 and rep["fits"] is True
    assert rep["hbm_bytes_per_chip"] == V5E_HBM
    assert rep["hbm_headroom"] == DEFAULT_HBM_HEADROOM
    assert rep["usable_hbm_bytes_per_chip"] == int(V5E_HBM * (1 - DEFAULT_HBM_HEADROOM))
    b = rep["bytes_per_chip"]
    assert b["total"] == b["arguments"] + b["output"] - b["alias"] + b["temp"]
    # The arguments are this run's state and batch, per chip (replicated state, the batch's rows
    # split over the 4 chips), plus XLA:TPU's padding of small arrays to whole (8, 128) tiles
    # (6.6% for this 32-wide model; nothing near it for a real one).
    cfg = command.train_config(cli.build_parser().parse_args(["compile", "--topology", TOPOLOGY,
                                                              *flags]))
    m = run_model.resolve(cfg)
    parts = run_parts(cfg, m.config, m.pooling, jax.devices()[:4])
    batch = largest_batch(cfg, parts.loss, 4, pad_id=m.config.pad_token_id)
    state = bytes_per_chip(parts.layout.abstract)
    run_bytes = state + sum(v.nbytes for v in batch.values()) // 4
    assert run_bytes <= b["arguments"] <= 1.1 * run_bytes, (b, run_bytes)
    # The donated state: the new params and moments reuse the old ones' buffers.
    assert state <= b["alias"] <= 1.1 * state, (b, state)
    assert rep["flops_per_step"] > 0 and rep["compile_seconds"] > 0
    # The evaluator's packed program (Evaluator.packer at 8 rows x 32 tokens: the most rows of
    # the one row length), beside the optimizer state: AdamW's two float32 moments per param.
    params = sum(x.size for x in jax.tree.leaves(parts.mdef.abstract_params))
    [ev] = rep["evaluate"]
    assert ev["name"] == "evaluate sts 8x32" and ev["fits"]
    e = ev["bytes_per_chip"]
    assert 2 * 4 * params <= e["resident"] <= 2 * 4 * params + 64
    assert e["total"] == e["arguments"] + e["output"] - e["alias"] + e["temp"] + e["resident"]
    # Every packed shape the encoder can produce on 4 chips at this budget, at the model's
    # max_seq_length (128: what `encode` and `serve` run at), not the training --seq_length.
    assert rep["settings"]["encode_seq_length"] == 128
    shapes = Packer(256, 128, 4).shapes()
    assert [tuple(e["shape"]) for e in rep["encode"]] == shapes
    assert all(e["fits"] and e["bytes_per_chip"]["total"] > 0 and e["flops"] > 0
               for e in rep["encode"])
    # 32-token rows: too short for the splash kernel (128-token tiles), so XLA's attention.
    assert rep["splash_attention"] is False
    # The process's own backend is untouched.
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8


def test_does_not_fit_then_cached_mnrl_fits(capsys, tiny_config):
    big = ["compile", "--topology", TOPOLOGY, "--model", tiny_config, "--batch_size", "8192",
           "--seq_length", "512", "--bf16", "--json"]
    rc, out, err = run(capsys, *big, "--loss", "mnrl")
    assert rc == 3
    rep = json.loads(out)
    assert rep["fits"] is False and rep["bytes_per_chip"]["total"] is None
    assert "RESOURCE_EXHAUSTED" in rep["error"]  # XLA itself refused: caught, not a crash
    assert "does not fit" in err and "Traceback" not in err
    for fix in ("--remat", "--loss cached-mnrl --mini_batch_size", "--param-sharding fsdp",
                "smaller --batch_size"):
        assert fix in err, fix

    rc, out, err = run(capsys, *big, "--loss", "cached-mnrl", "--mini_batch_size", "16")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["fits"] is True and 0 < rep["bytes_per_chip"]["total"] <= V5E_HBM
    # Packed 512-token rows and no attention dropout: the Pallas splash kernel (a Mosaic custom
    # call in the compiled HLO), split over the 4 chips under the train step's vmap and GradCache.
    assert rep["splash_attention"] is True


def test_over_the_given_hbm_exits_3_with_the_size(capsys, tiny_config):
    rc, out, err = run(capsys, "compile", "--topology", TOPOLOGY, "--model", tiny_config,
                       "--batch_size", "16", "--seq_length", "32", "--hbm-gib", "0.0001",
                       "--encode", "--max_batch_tokens", "256", "--max-seq-length", "64")
    assert rc == 3
    assert "DOES NOT FIT" in out  # the text report
    assert "does not fit on v5e:2x2 (needs" in err and "GiB per chip" in err
    # --max-seq-length sets the encode shapes' length (else the model's own, 512 here).
    assert [line.split(":")[0].strip() for line in out.splitlines() if "encode" in line] == [
        f"encode {r}x{n}" for r, n in Packer(256, 64, 4).shapes()]


@pytest.mark.parametrize("argv, needle", [
    (["--topology", "v5e-8"], "v5e:2x4"),  # the marketing name: the message names the form
    (["--topology", "v5e:2x2", "--batch_size", "6"], "multiple of the 4 chips"),
    (["--topology", "v5e:2x2", "--seq_length", "4096"], "max_position_embeddings"),
    (["--topology", "v5e:2x2", "--hbm-headroom", "1"], "--hbm-headroom 1.0 must be in [0, 1)"),
    (["--topology", "v5e:2x2", "--encode", "--max-seq-length", "1024"],
     "--max-seq-length 1024 must be in [2, the model's max_position_embeddings (512)]"),
])
def test_bad_input_is_one_line(capsys, tiny_config, argv, needle):
    rc, out, err = run(capsys, "compile", "--model", tiny_config, *argv)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_missing_model(capsys, tmp_path):
    rc, _, err = run(capsys, "compile", "--topology", TOPOLOGY, "--model",
                     os.path.join(tmp_path, "absent"))
    assert rc == 2 and "Traceback" not in err


def test_advice_puts_fsdp_first_when_the_state_outweighs_activations():
    from sbert_flax.aot.measure import ProgramReport, advice

    settings = {"loss": "mnrl", "batch_size": 64, "param_sharding": "replicated"}
    state_heavy = ProgramReport("train_step", None, arguments=10, output=1, alias=1, temp=5,
                                flops=None, compile_seconds=1.0)
    act_heavy = ProgramReport("train_step", None, arguments=5, output=1, alias=1, temp=10,
                              flops=None, compile_seconds=1.0)
    assert advice(settings, False, state_heavy)[0].startswith("--param-sharding fsdp")
    first = advice(settings, False, act_heavy)
    assert first[0].startswith("--remat") and "--loss cached-mnrl --mini_batch_size 8" in first[1]
    # Already remat and fsdp: neither is offered again.
    done = advice({**settings, "remat": True, "param_sharding": "fsdp"}, False, act_heavy)
    assert not any(a.startswith(("--remat", "--param-sharding")) for a in done)


def test_without_libtpu_says_how_to_install(capsys, tiny_config, monkeypatch):
    from sbert_flax.aot import topology

    real = topology.importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    rc, _, err = run(capsys, "compile", "--topology", TOPOLOGY, "--model", tiny_config)
    assert rc == 2 and 'pip install "sbert-flax[tpu]"' in err and "Traceback" not in err


def test_fsdp_keeps_the_batch_split(capsys, tmp_path, monkeypatch):
    """With fsdp params the model's activations stay split by rows over all 16 chips of a v5e-16
    (`sharding.constrain_rows`): no chip holds a whole global-batch MLP activation. Left to
    itself XLA:TPU followed the params' split into the activations and gathered the batch: 115 MiB
    of temporaries a chip here against 7.7 MiB (BERT-base at batch 1024: 15.9 GB against 1.3)."""
    path = tmp_path / "config.json"
    # What it takes to show: the real vocabulary (the word embedding is split over its vocab axis;
    # with 128 words XLA kept the batch split by itself, dropout on or off) and dropout on (the
    # model under the train step's vmap over rows, as training runs it).
    cfg = BertConfig(vocab_size=21128, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=512, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(cfg.to_hf_dict()))
    pairs, length = 256, 128
    argv = ("compile", "--topology", "v5e:4x4", "--model", str(path), "--loss", "mnrl",
            "--batch_size", str(pairs), "--seq_length", str(length), "--bf16",
            "--param-sharding", "fsdp", "--json")
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    temp = json.loads(out)["bytes_per_chip"]["temp"]
    whole_mlp_activation = 2 * pairs * length * cfg.intermediate_size * 2  # [2 x pairs, L, mlp] bf16
    assert 0 < temp < whole_mlp_activation / 4, temp


def test_fsdp_advice_names_no_windowed_einsum():
    """An fsdp step that does not fit is told about --no_windowed_einsum (XLA:TPU's overlap of
    the weight all-gathers with the matmuls holds more activations; on this test's fsdp case the
    flag took the temporaries from 7.6 to 6.5 MiB, BERT-base batch 1024 on v5e-8 from 12.3 to 8.6
    GiB, measured by hand: a second compile here would cost CI ~25 s)."""
    from sbert_flax.aot.measure import advice

    fsdp = {"loss": "mnrl", "batch_size": 64, "param_sharding": "fsdp", "windowed_einsum": True}
    assert any("--no_windowed_einsum" in a for a in advice(fsdp, False))
    assert not any("--no_windowed_einsum" in a for a in advice({**fsdp, "windowed_einsum": False}, False))
    assert not any("--no_windowed_einsum" in a
                   for a in advice({**fsdp, "param_sharding": "replicated"}, False))


def test_fits_leaves_the_runtime_its_headroom():
    """A program that needs 98% of the nominal HBM does not fit: the runtime keeps some (XLA:TPU
    itself offers 15.75 of a v5e's 16 GiB). `--hbm-headroom 0` is the nominal HBM again."""
    v5e = Topology(TOPOLOGY, (), "TPU v5 lite", V5E_HBM)
    need = int(0.98 * V5E_HBM)
    step = ProgramReport("train_step", None, arguments=need, output=0, alias=0, temp=0,
                         flops=None, compile_seconds=1.0)
    assert CompileReport(v5e, step).fits is False
    assert CompileReport(v5e, step, hbm_headroom=0.0).fits is True
    # The optimizer state resident beside the evaluator counts in its total.
    ev = dataclasses.replace(step, name="evaluate sts 8x32", arguments=need // 2,
                             resident=need // 2 + 1)
    ok = dataclasses.replace(step, arguments=1)
    assert CompileReport(v5e, ok, evaluate=(ev,), hbm_headroom=0.0).fits is True
    assert CompileReport(v5e, ok, evaluate=(ev,), hbm_headroom=0.02).fits is False
    rep = CompileReport(v5e, step).to_json()
    assert rep["fits"] is False and rep["train_step_fits"] is False
    assert rep["usable_hbm_bytes_per_chip"] == int(V5E_HBM * (1 - DEFAULT_HBM_HEADROOM))


# ---- what is compiled is what `sbert-flax train` runs (lowered on CPU, compared as text) -------

def _program_text(lowered) -> str:
    # XLA:TPU's compiler options (windowed_einsum) are not in the module's text.
    return f"{lowered.as_text()}\n{lowered._lowering._compiler_options_kvs}"


def _compile_side(flags: list[str], devices) -> list:
    """The programs `sbert-flax compile ... FLAGS` compiles, lowered for `devices`."""
    args = cli.build_parser().parse_args(["compile", "--topology", TOPOLOGY, *flags])
    cfg = command.train_config(args)
    m = run_model.resolve(cfg)
    return run_lowerings(cfg, m.config, m.pooling, devices, negatives=args.negatives)


def _write(path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("loss", ["mnrl", "softmax"])
def test_compiles_the_trainers_programs(tmp_path, tiny_bert, loss):
    """The same flags to `train` and to `compile`: the train step and the evaluator's programs
    compile lowers are the Trainer's, as StableHLO text (symmetric, matryoshka_dims,
    max_grad_norm, adam_eps, clip_head, ... were once dropped by compile)."""
    model = tiny_bert()  # the folder the other tests compile (making one costs seconds)
    sts = _write(tmp_path / "sts.tsv", "s1\ts2\tscore", ["你好\t您好\t4.0"] * 4)
    if loss == "mnrl":
        data = _write(tmp_path / "train.tsv", "anchor\tpositive\tnegative", ["你好\t您好\t再见"] * 32)
        flags = ["--loss", "mnrl", "--symmetric", "--matryoshka_dims", "16,8", "--scale", "10",
                 "--max_grad_norm", "0.5", "--adam_eps", "1e-8", "--learning_rate", "1e-4",
                 "--warmup", "0.2", "--weight_decay", "0.05", "--seed", "3", "--bf16",
                 "--param-sharding", "fsdp", "--remat", "--batch_size", "16"]
        extra = ["--negatives", "1"]
    else:
        data = _write(tmp_path / "train.tsv", "text_a\ttext_b\tlabel",
                      [f"你好\t您好\t{i % 3}" for i in range(32)])
        flags = ["--loss", "softmax", "--labels_num", "3", "--dev_path", data, "--max_grad_norm",
                 "1.0", "--no_clip_head", "--uer_adamw", "--no_pack", "--scan_layers",
                 "--batch_size", "8"]
        extra = []
    flags += ["--seq_length", "32", "--eval_batch_size", "8", "--max_steps", "3", "--sts-dev", sts]
    devices = jax.devices()[:4]
    compiled = _compile_side(["--model", model, *flags, *extra], devices)

    cfg, _ = train_cli._parse(["--pretrained_model_path", model, "--train_path", data,
                               "--output_dir", str(tmp_path / "run"), *flags])
    trainer = Trainer(cfg, devices=devices)
    assert trainer.total_steps == 3  # the schedule compile spans (--max_steps)
    step = compiled[0]
    batch = step.lowered.args_info[0][1]  # the run's largest batch, as compile lays it out
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    real = trainer.pipeline.builder(0)  # the run's first batch: the same arrays, smaller or equal
    assert {k: (v.dtype, v.ndim) for k, v in real.items()} == {
        k: (v.dtype, len(v.shape)) for k, v in batch.items()}
    assert _program_text(step.lowered) == _program_text(
        trainer.train_step.lower(trainer.layout.abstract, batch))

    params = trainer.layout.abstract.params
    evaluate = {lw.name: lw for lw in compiled[1:]}
    rows, length = max(trainer.evaluator.packer.shapes())  # one row length here: the most rows
    assert _program_text(evaluate.pop(f"evaluate sts {rows}x{length}").lowered) == _program_text(
        trainer.evaluator.lower_embed(params, rows, length))
    if loss == "softmax":
        [(name, lw)] = evaluate.items()
        assert name == "evaluate classify 8x32"
        ev_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                    for k, v in lw.lowered.args_info[0][1].items()}
        assert _program_text(lw.lowered) == _program_text(
            trainer.evaluator.lower_classify(params, ev_batch))
    else:
        assert not evaluate


@pytest.fixture(scope="module")
def v5e():
    with libtpu.start_quiet():
        return compile_only_topology(TOPOLOGY)


# Each TrainConfig field that changes what is compiled: (flags of the run it is changed in, the
# flags that change it). The run is `BASE` plus those; train's defaults else (the softmax loss).
MNRL = ("--loss", "mnrl")
BASE = ("--batch_size", "8", "--seq_length", "16")
CHANGED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pretrained_model_path": ((), ("--model", "{other_model}")),
    "config_path": ((), ("--config_path", "{uer_config}")),  # its pooling: mean, not cls
    "pooling": ((), ("--pooling", "max")),
    "loss": ((), ("--loss", "cosent")),
    "scale": (MNRL, ("--scale", "5")),
    "symmetric": (MNRL, ("--symmetric",)),
    "mini_batch_size": (("--loss", "cached-mnrl", "--mini_batch_size", "4"),
                        ("--mini_batch_size", "2")),
    "matryoshka_dims": (MNRL, ("--matryoshka_dims", "8")),
    "dev_path": ((), ("--dev_path", "dev.tsv")),  # the classifier's eval step
    "test_path": ((), ("--test_path", "test.tsv")),
    "sts_dev_paths": ((), ("--sts-dev", "sts.tsv")),  # the packed embed program
    "labels_num": ((), ("--labels_num", "5")),
    "pack": (MNRL, ("--no_pack",)),
    "learning_rate": ((), ("--learning_rate", "1e-3")),
    "max_steps": ((), ("--max_steps", "7")),
    "batch_size": ((), ("--batch_size", "4")),
    "seq_length": ((), ("--seq_length", "32")),
    "warmup": ((), ("--warmup", "0.5")),
    "weight_decay": ((), ("--weight_decay", "0.5")),
    "uer_adamw": ((), ("--uer_adamw",)),
    "max_grad_norm": ((), ("--max_grad_norm", "1.0")),
    "adam_eps": ((), ("--adam_eps", "1e-8")),
    "clip_head": (("--max_grad_norm", "1.0"), ("--no_clip_head",)),
    "seed": ((), ("--seed", "8")),
    "eval_batch_size": (("--sts-dev", "sts.tsv"), ("--eval_batch_size", "4")),
    "param_sharding": ((), ("--param-sharding", "fsdp")),
    "mesh_fsdp": (("--param-sharding", "fsdp"), ("--mesh_fsdp", "1")),
    "bf16": ((), ("--bf16",)),
    "remat": ((), ("--remat",)),
    "scan_layers": (("--model", "{two_layers}"), ("--scan_layers",)),  # one layer: no loop
    "windowed_einsum": (("--param-sharding", "fsdp"), ("--no_windowed_einsum",)),  # XLA:TPU's
}
TPU_ONLY = {"windowed_einsum"}  # a compiler option of XLA:TPU: no change on CPU
# Lowering a train step costs ~1 s, so fields with a narrower reach lower only what they reach:
# the evaluator's programs, or the optimizer's update (the step applies `run_parts`' optimizer, as
# the Trainer's does: test_compiles_the_trainers_programs compares them with these set).
EVALUATOR_ONLY = {"dev_path", "test_path", "sts_dev_paths", "eval_batch_size"}
OPTIMIZER_ONLY = {"learning_rate", "max_steps", "warmup", "weight_decay", "uer_adamw",
                  "max_grad_norm", "adam_eps", "clip_head"}


def test_every_field_that_changes_the_graph_reaches_compile(tmp_path, v5e):
    """Every TrainConfig field is either listed as not compiled (with why) or, set on compile's
    command line, changes the lowered programs: a field added to TrainConfig fails here until
    compile reads it or says why it need not (compile once dropped symmetric, matryoshka_dims,
    max_grad_norm, adam_eps, clip_head, the evaluator's fields)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(train_cli.NO_FLAG)
    assert not set(CHANGED) & set(NOT_COMPILED)
    assert set(CHANGED) | set(NOT_COMPILED) == fields, "classify each new TrainConfig field"

    def arch(path, hidden: int = 16, layers: int = 1) -> str:
        cfg = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=2, intermediate_size=16, max_position_embeddings=64)
        path.write_text(json.dumps(cfg.to_hf_dict()))
        return str(path)

    (tmp_path / "uer.json").write_text(json.dumps({"pooling": "mean"}))
    paths = {"other_model": arch(tmp_path / "other.json", hidden=8),
             "two_layers": arch(tmp_path / "two.json", layers=2),
             "uer_config": str(tmp_path / "uer.json")}
    model = ("--model", arch(tmp_path / "config.json"))
    seen: dict[tuple, str] = {}

    def text(flags: tuple[str, ...], name: str) -> str:
        devices = v5e.devices if name in TPU_ONLY else jax.devices()[:2]
        key = (flags, name in TPU_ONLY, name in EVALUATOR_ONLY, name in OPTIMIZER_ONLY)
        if key not in seen:
            args = cli.build_parser().parse_args(
                ["compile", "--topology", TOPOLOGY,
                 *(a.format(**paths) for a in (*model, *BASE, *flags))])
            cfg = command.train_config(args)
            m = run_model.resolve(cfg)
            if name in EVALUATOR_ONLY:
                lowered = evaluate_lowerings(run_parts(cfg, m.config, m.pooling, devices))
            elif name in OPTIMIZER_ONLY:
                parts = run_parts(cfg, m.config, m.pooling, devices)
                state = parts.layout.abstract
                lowered = [jax.jit(parts.tx.update).lower(state.params, state.opt_state,
                                                          state.params)]
            else:
                lowered = run_lowerings(cfg, m.config, m.pooling, devices)
            seen[key] = "\n".join(_program_text(getattr(lw, "lowered", lw)) for lw in lowered)
        return seen[key]

    unchanged = [name for name, (run, change) in CHANGED.items()
                 if text(run, name) == text((*run, *change), name)]
    assert not unchanged, f"compile drops {unchanged}"


def test_config_file_then_flags_is_trains_config(tmp_path):
    """`compile --config run.json --flag ...` is the TrainConfig of `train --config run.json
    key=value`: the file's fields, then what the command line says."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"pretrained_model_path": "m", "train_path": "t.tsv",
                                "loss": "mnrl", "symmetric": True, "batch_size": 32,
                                "sts_dev_paths": ["a.tsv"]}))
    args = cli.build_parser().parse_args(["compile", "--topology", TOPOLOGY, "--config",
                                          str(path), "--batch_size", "16", "--remat"])
    want, _ = train_cli._parse(["--config", str(path), "batch_size=16", "remat=true"])
    assert command.train_config(args) == want


@pytest.mark.parametrize("loss", ["ce-bce", "ce-softmax", "ce-listwise"])
def test_cross_encoder_runs_are_refused_by_name(loss, tmp_path):
    """compile does not build cross-encoder batches yet: it says so, naming the loss, rather than
    failing on the classifier's weights."""
    data = tmp_path / "pairs.tsv"
    data.write_text("text_a\ttext_b\tlabel\n那个人很开心\t天气很好\t0\n", encoding="utf-8")
    cfg = TrainConfig(pretrained_model_path=str(tmp_path / "any"), train_path=str(data), loss=loss)
    with pytest.raises(ValueError, match=f"does not check cross-encoder runs yet \\(--loss {loss}\\)"):
        run_model.resolve(cfg)
