"""`sbert-flax compile`: the real train step and encode programs, compiled for a v5e:2x2 slice on
this CPU host (libtpu's compile-only devices), in-process beside the 8 CPU devices of the tests.

Kept cheap: a 2-layer hidden-32 model. XLA refuses the plain-mnrl batch of 8192 pairs x 512 tokens
early (its temporaries alone are ~31 GiB a chip), and the same batch under cached-mnrl compiles in
seconds; the models of the big batch have no dropout, which otherwise multiplies the compile time.
(4096 pairs, the batch this test used before the splash attention kernel, now fit: 14.7 GiB a chip
instead of ~25, the kernel keeps no [B, H, L, L] scores.)
"""

from __future__ import annotations

import json
import os

import jax
import pytest

from sbert_flax import cli
from sbert_flax.config import BertConfig
from sbert_flax.packing import Packer

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


def test_train_step_and_encode_fit(capsys, tiny_bert):
    model = tiny_bert()  # a model folder (HF, mean pooling), as users pass it
    rc, out, err = run(capsys, "compile", "--topology", TOPOLOGY, "--model", model, "--loss", "mnrl",
                       "--batch_size", "16", "--seq_length", "32", "--bf16", "--encode",
                       "--max_batch_tokens", "256", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert KEYS <= set(rep)
    assert rep["topology"] == TOPOLOGY and rep["chips"] == 4 and rep["fits"] is True
    assert rep["hbm_bytes_per_chip"] == V5E_HBM
    b = rep["bytes_per_chip"]
    assert set(b) >= {"arguments", "output", "temp", "total"}
    assert 0 < b["total"] <= V5E_HBM
    assert b["total"] == b["arguments"] + b["output"] - b["alias"] + b["temp"]
    # The donated state: the new params and moments reuse the old ones' buffers.
    assert b["alias"] > 0
    assert rep["flops_per_step"] > 0 and rep["compile_seconds"] > 0
    # Every packed shape the encoder can produce on 4 chips at this budget, each compiled.
    shapes = Packer(256, 32, 4).shapes()
    assert [tuple(e["shape"]) for e in rep["encode"]] == shapes
    assert all(e["fits"] and e["bytes_per_chip"]["total"] > 0 and e["flops"] > 0
               for e in rep["encode"])
    # 32-token rows: too short for the splash kernel (128-token tiles), so XLA's attention.
    assert rep["splash_attention"] is False
    assert not any(e["splash_attention"] for e in rep["encode"])
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
                       "--batch_size", "16", "--seq_length", "32", "--hbm-gib", "0.0001")
    assert rc == 3
    assert "DOES NOT FIT" in out  # the text report
    assert "does not fit on v5e:2x2 (needs" in err and "GiB per chip" in err


@pytest.mark.parametrize("argv, needle", [
    (["--topology", "v5e-8"], "v5e:2x4"),  # the marketing name: the message names the form
    (["--topology", "v5e:2x2", "--batch_size", "6"], "multiple of the 4 chips"),
    (["--topology", "v5e:2x2", "--seq_length", "4096"], "max_position_embeddings"),
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
