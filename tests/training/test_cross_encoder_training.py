"""Cross-encoder training through the trainer (`--loss ce-bce | ce-softmax | ce-listwise`).

- The three losses equal sentence-transformers' cross-encoder losses (BinaryCrossEntropyLoss,
  CrossEntropyLoss, MultipleNegativesRankingLoss's softmax over [positive, negatives]) on the
  same logits and labels, gradients included; pad rows change nothing.
- Pair batches are the tokens sentence-transformers' CrossEncoder feeds its model.
- Each loss trains a tiny model on a learnable toy task through `sbert-flax train` / the Trainer
  (the loss goes down); the ce-bce run's dev accuracy and STS Spearman, measured on the mesh,
  are what sentence-transformers measures on the exported `best_model`, which it loads.
- A preempted ce-listwise run (mined n-tuples, as `sbert-flax mine-negatives` writes them)
  resumed from its checkpoint ends with exactly the params of an uninterrupted run.
- The train step sharded over 8 devices (rows over all 8, params fsdp over 2) equals the
  1-device step.
"""

from __future__ import annotations

import json
import os

import helpers
import jax
import numpy as np
import optax
import pytest
import train_hooks
from test_contrastive_step import _assert_trees_close
from test_trainer import _flat, _records

from sbert_flax.cli import train as cli
from sbert_flax.common import sharding
from sbert_flax.models.config import BertConfig
from sbert_flax.retrieval.mining import write_tsv
from sbert_flax.training import cross_encoder_losses as ce
from sbert_flax.training.state import create_train_state, state_layout
from sbert_flax.training.step import TraceCounter, make_train_step
from sbert_flax.training.train_config import TrainConfig
from sbert_flax.training.trainer import Trainer, train_and_evaluate

torch = pytest.importorskip("torch")
st_ce = pytest.importorskip("sentence_transformers.cross_encoder")


def _sets(k: int = 3) -> list[list[str]]:
    chars = list(dict.fromkeys(helpers.random_zh_sentences(1, 400, 400, seed=0)[0]))
    return [chars[16 * i:16 * (i + 1)] for i in range(k)]


def _sentence(rng, chars, lo=2, hi=10) -> str:
    return "".join(rng.choice(chars, rng.integers(lo, hi + 1)))


def write_pairs(path, n, seed, classes=2):
    """(text_a, text_b, label): label is the character set text_b is drawn from (text_a from any
    set): learnable in a few steps, nothing to memorise."""
    sets, rng = _sets(classes), np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text_a\ttext_b\tlabel\n")
        for _ in range(n):
            k = int(rng.integers(classes))
            f.write(f"{_sentence(rng, sets[int(rng.integers(classes))])}\t"
                    f"{_sentence(rng, sets[k])}\t{k}\n")
    return str(path)


def write_sts(path, n, seed):
    """Header-less STS pairs of the same task: score 5 when text_b is from set 1, else 0."""
    sets, rng = _sets(2), np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            k = int(rng.integers(2))
            f.write(f"{_sentence(rng, sets[0])}\t{_sentence(rng, sets[k])}\t{5 * k}\n")
    return str(path)


def write_mined(path, n, seed, negatives=2):
    """anchor, positive, negative_1..n as `mine-negatives --output-format n-tuple` writes them
    (`mining.write_tsv`): the positive from set 0, the negatives from set 1."""
    sets, rng = _sets(2), np.random.default_rng(seed)
    cols = {"anchor": [_sentence(rng, sets[int(rng.integers(2))]) for _ in range(n)],
            "positive": [_sentence(rng, sets[0]) for _ in range(n)]}
    for i in range(1, negatives + 1):
        cols[f"negative_{i}"] = [_sentence(rng, sets[1]) for _ in range(n)]
    write_tsv(str(path), cols)
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_bert):
    return tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64)


@pytest.fixture(scope="module")
def st_model(model):
    """A sentence-transformers CrossEncoder (one logit) whose forward the loss tests replace."""
    return st_ce.CrossEncoder(model, num_labels=1, device="cpu")


# ---- the losses equal sentence-transformers' on the same logits --------------------------------

def _stub(st_model, table: dict, logits: torch.Tensor):
    """`st_model` answering each pair with its row of `logits` (`table`: pair -> row)."""
    st_model.preprocess = lambda pairs, **kw: {"row": torch.tensor([table[tuple(p)] for p in pairs])}
    st_model.forward = lambda inputs: {"scores": logits[inputs["row"]]}
    return st_model


def _jax_value_and_grad(fn, logits, *args):
    (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(logits, *args)
    return float(loss), np.asarray(g), metrics


def test_losses_equal_sentence_transformers(st_model):
    rng = np.random.default_rng(0)
    b, real = 12, 9  # rows 9..11 pad a batch (weight 0): the reference never sees them
    w = np.r_[np.ones(real), np.zeros(b - real)].astype(np.float32)
    queries = [f"q{i}" for i in range(b)]

    # ce-bce: BinaryCrossEntropyLoss (BCEWithLogitsLoss), large logits included.
    x = (4 * rng.standard_normal(b)).astype(np.float32)
    x[0] = 40.0
    y = rng.integers(0, 2, b).astype(np.int32)
    docs = [f"d{i}" for i in range(real)]
    logits = torch.tensor(x[:real, None], requires_grad=True)
    model = _stub(st_model, {(q, d): i for i, (q, d) in enumerate(zip(queries[:real], docs, strict=True))}, logits)
    want = st_ce.losses.BinaryCrossEntropyLoss(model)([queries[:real], docs],
                                                       torch.tensor(y[:real]))
    want.backward()
    got, grad, m = _jax_value_and_grad(ce.binary_cross_entropy, x, y, w)
    np.testing.assert_allclose(got, want.item(), rtol=1e-6)
    np.testing.assert_allclose(grad[:real], logits.grad.numpy()[:, 0], rtol=1e-5, atol=1e-8)
    assert np.all(grad[real:] == 0)
    assert float(m["accuracy"]) == pytest.approx(np.mean((x[:real] > 0) == (y[:real] == 1)))

    # ce-softmax: CrossEntropyLoss over 3 classes.
    x3 = rng.standard_normal((b, 3)).astype(np.float32)
    y3 = rng.integers(0, 3, b).astype(np.int32)
    logits = torch.tensor(x3[:real], requires_grad=True)
    model = _stub(st_model, {(q, d): i for i, (q, d) in enumerate(zip(queries[:real], docs, strict=True))}, logits)
    want = st_ce.losses.CrossEntropyLoss(model)([queries[:real], docs],
                                                torch.tensor(y3[:real], dtype=torch.long))
    want.backward()
    got, grad, m = _jax_value_and_grad(ce.softmax_cross_entropy, x3, y3, w)
    np.testing.assert_allclose(got, want.item(), rtol=1e-6)
    np.testing.assert_allclose(grad[:real], logits.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert np.all(grad[real:] == 0)

    # ce-listwise: MultipleNegativesRankingLoss's cross-entropy over [positive, hard negatives]
    # (`calculate_loss` on the per-column logits, activation_fn=None, scale=1).
    xl = rng.standard_normal((b, 4)).astype(np.float32)
    cols = [torch.tensor(xl[:real, c], requires_grad=True) for c in range(4)]
    loss = st_ce.losses.MultipleNegativesRankingLoss(st_model, activation_fn=None, scale=1.0)
    want = loss.calculate_loss(cols, real)
    want.backward()
    got, grad, m = _jax_value_and_grad(ce.listwise_cross_entropy, xl, w)
    np.testing.assert_allclose(got, want.item(), rtol=1e-6)
    np.testing.assert_allclose(grad[:real], np.stack([c.grad.numpy() for c in cols], 1),
                               rtol=1e-5, atol=1e-8)
    assert np.all(grad[real:] == 0)
    assert float(m["accuracy"]) == pytest.approx(np.mean(np.argmax(xl[:real], 1) == 0))


def test_losses_refuse_what_they_cannot_train():
    with pytest.raises(ValueError, match="ce-bce loss takes labels 0 and 1"):
        ce.make_cross_encoder_loss("ce-bce", 3)
    with pytest.raises(ValueError, match="needs a negative column"):
        ce.make_cross_encoder_loss("ce-listwise").text_columns(())
    with pytest.raises(ValueError, match="ir-dev"):
        TrainConfig(loss="ce-bce", ir_dev_paths=("beir",))
    with pytest.raises(ValueError, match="embedding losses"):
        TrainConfig(loss="ce-listwise", matryoshka_dims=(16,))
    with pytest.raises(ValueError, match="ce-softmax head gives several"):
        TrainConfig(loss="ce-softmax", sts_dev_paths=("sts.tsv",))


# ---- pair batches ---------------------------------------------------------------------------------

def test_pair_batches_are_what_sentence_transformers_tokenizes(tmp_path, model, st_model):
    """Each row is the HF tokenizer's pair encoding (longest-first truncation to seq_length, as
    sentence-transformers' CrossEncoder calls it), padded; pad rows are weight-0 empty pairs."""
    from sbert_flax.checkpoints.cross_encoder_loading import load_cross_encoder
    from sbert_flax.training.cross_encoder_batches import PairBatchBuilder
    from sbert_flax.training.data import open_source, schema_for
    from sbert_flax.training.pipeline import BatchPlan, PipelineConfig

    path = write_mined(tmp_path / "mined.tsv", 5, seed=1, negatives=2)
    with open(path, encoding="utf-8") as f:  # one long anchor: truncation takes from it first
        lines = f.read().splitlines()
    first = lines[1].split("\t")
    lines[1] = "\t".join(["长" * 40, *first[1:]])
    open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    src = open_source(path, schema_for("ce-listwise"))
    tok = load_cross_encoder(model, new_head=True).tokenizer
    cfg = PipelineConfig(global_batch=8, seq_length=24, shuffle=False)
    batch = PairBatchBuilder(src, tok, cfg, BatchPlan(len(src), cfg))(0)
    assert set(batch) == {"weights", *(f"{c}_{k}" for c in ("positive", "negative_1", "negative_2")
                                       for k in ("ids", "mask", "types"))}
    hf = st_model.tokenizer
    texts = src.texts(range(5))
    for c in ("positive", "negative_1", "negative_2"):
        want = hf(list(zip(texts["anchor"], texts[c], strict=True)), truncation="longest_first", max_length=24)
        for r in range(5):
            n = int(batch[f"{c}_mask"][r].sum())
            assert batch[f"{c}_ids"][r, :n].tolist() == want["input_ids"][r], (c, r)
            assert batch[f"{c}_types"][r, :n].tolist() == want["token_type_ids"][r], (c, r)
        assert batch[f"{c}_ids"].shape[1] == 24  # the bucket of seq_length 24
        for r in range(5, 8):  # pad rows: [CLS] [SEP] [SEP]
            assert batch[f"{c}_mask"][r].sum() == 3 and batch["weights"][r] == 0
    assert batch["positive_mask"][0].sum() == 24  # the long anchor was cut to fit


# ---- training ---------------------------------------------------------------------------------------

def _train_losses(out) -> list[float]:
    return [r["loss"] for r in _records(out) if r["kind"] == "train"]


def _went_down(losses: list[float]) -> bool:
    return np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_ce_bce_cli_trains_evaluates_and_exports(tmp_path, model, capsys):
    """`sbert-flax train --loss ce-bce`: the loss goes down; dev accuracy and STS Spearman on
    the mesh are sentence-transformers' on the exported best_model, which it loads."""
    from scipy.stats import spearmanr

    from sbert_flax.retrieval.sts import read_sts

    train = write_pairs(tmp_path / "train.tsv", 192, seed=1)
    dev = write_pairs(tmp_path / "dev.tsv", 40, seed=2)
    sts = write_sts(tmp_path / "sts.tsv", 40, seed=3)
    out = str(tmp_path / "run")
    rc = cli.main(["--loss", "ce-bce", "--pretrained_model_path", model, "--train_path", train,
                   "--dev_path", dev, "--sts-dev", sts, "--batch_size", "16", "--seq_length", "32",
                   "--learning_rate", "1e-2", "--epochs_num", "2", "--log_every_steps", "1",
                   "--best_metric", "accuracy", "--no_progress_bar", "--output_dir", out])
    assert rc == 0, capsys.readouterr().err[-3000:]
    losses = _train_losses(out)
    assert len(losses) == 24 and _went_down(losses), losses
    res = json.load(open(os.path.join(out, "results.json")))
    best = next(h for h in res["history"] if h["step"] == res["best"]["step"])
    assert best["accuracy"] >= 0.9, res["history"]

    st = st_ce.CrossEncoder(os.path.join(out, "best_model"), device="cpu")
    assert st.num_labels == 1 and st.max_length == 32
    with open(dev, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    p = st.predict([(a, b) for a, b, _ in rows])  # sigmoid scores
    gold = np.array([int(y) for _, _, y in rows])
    assert best["accuracy"] == pytest.approx(np.mean((p > 0.5) == (gold == 1)), abs=1e-9)
    s1, s2, scores = read_sts(sts)
    rho = spearmanr(st.predict(list(zip(s1, s2, strict=True))), scores).correlation
    assert best["sts_spearman"] == pytest.approx(rho, abs=1e-6)
    assert best["sts_spearman"] > 0.8


def test_ce_softmax_trains_nli_style_pairs(tmp_path, model, one_device):
    """UER's run_classifier recipe: (text_a, text_b, label) with 3 labels, softmax over a 3-logit
    head; --label_names are the exported folder's id2label."""
    names = ("entailment", "neutral", "contradiction")
    train = write_pairs(tmp_path / "train.tsv", 192, seed=4, classes=3)
    cfg = TrainConfig(pretrained_model_path=model, train_path=train, loss="ce-softmax",
                      batch_size=16, seq_length=32, epochs_num=2, learning_rate=1e-2,
                      label_names=names, log_every_steps=1, progress_bar=False,
                      output_dir=str(tmp_path / "run"))
    # Raw label names in the file, as the CNLI files have them.
    with open(train, encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = [line.rsplit("\t", 1) for line in lines[1:]]
    open(train, "w", encoding="utf-8").write(
        "\n".join([lines[0], *(f"{t}\t{names[int(y)]}" for t, y in rows)]) + "\n")
    summary = train_and_evaluate(cfg, devices=one_device)
    losses = _train_losses(cfg.output_dir)
    assert summary["step"] == 24 and _went_down(losses), losses
    saved = json.load(open(os.path.join(cfg.output_dir, "best_model", "config.json")))
    assert saved["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    assert saved["architectures"] == ["BertForSequenceClassification"]


def _listwise_cfg(tmp_path, model, out, **kw) -> TrainConfig:
    train = write_mined(tmp_path / "mined.tsv", 128, seed=5)
    return TrainConfig(pretrained_model_path=model, train_path=train, loss="ce-listwise",
                       batch_size=16, seq_length=32, epochs_num=2, learning_rate=2e-2,
                       save_every_steps=3, log_every_steps=1, export=False, progress_bar=False,
                       output_dir=str(tmp_path / out), **kw)


def test_ce_listwise_trains_and_resumes_exactly(tmp_path, model, one_device):
    """Mined n-tuples train the listwise loss; a run preempted after step 4 (checkpoint at its
    SIGTERM) and resumed ends with exactly the params of the uninterrupted run."""
    import orbax.checkpoint as ocp

    full = _listwise_cfg(tmp_path, model, "full")
    trainer = Trainer(full, devices=one_device)
    assert trainer.train_src.columns == ("anchor", "positive", "negative_1", "negative_2")
    summary = trainer.run()
    losses = _train_losses(full.output_dir)
    assert summary["step"] == 16 and _went_down(losses), losses

    cut = _listwise_cfg(tmp_path, model, "cut")
    with train_hooks.installed(sigterm_after_step=4):
        assert train_and_evaluate(cut, devices=one_device)["preempted"]
    resumed = train_and_evaluate(TrainConfig(**{**cut.to_dict(), "resume": True}),
                                 devices=one_device)
    assert resumed["step"] == 16
    assert [r["step"] for r in _records(cut.output_dir) if r["kind"] == "train"] == \
        list(range(1, 17))
    with ocp.StandardCheckpointer() as ck:
        want = _flat(ck.restore(os.path.join(full.output_dir, "checkpoints", "16", "state"))
                     ["params"])
        got = _flat(ck.restore(os.path.join(cut.output_dir, "checkpoints", "16", "state"))
                    ["params"])
    assert sorted(got) == sorted(want) and any("classifier" in k for k in want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert _train_losses(cut.output_dir) == losses


# ---- sharding ---------------------------------------------------------------------------------------

CFG = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)


def _listwise_batch(rows=16, negatives=2, length=12, pad=(5, 14, 15), seed=1):
    rng = np.random.default_rng(seed)
    out = {"weights": np.ones(rows, np.float32)}
    out["weights"][list(pad)] = 0.0
    for c in ("positive", *(f"negative_{i}" for i in range(1, negatives + 1))):
        lens = rng.integers(4, length + 1, rows)
        mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
        a = rng.integers(2, lens - 1)  # [CLS] a [SEP] b [SEP]: types 1 from b on
        out[f"{c}_ids"] = rng.integers(1, CFG.vocab_size, (rows, length)).astype(np.int32) * mask
        out[f"{c}_mask"] = mask
        out[f"{c}_types"] = ((np.arange(length)[None] > a[:, None]) * mask).astype(np.int32)
    return out


def _sharded_run(mesh, rules, host, batch, loss, steps=3):
    """(loss and grad norm per step, host params after the last), plain SGD as
    test_contrastive_step's `_train` (Adam's first update would magnify reduction-order noise)."""
    mdef = loss.model_def(CFG)
    tx = optax.sgd(0.5)
    layout = state_layout(mdef, tx, mesh, rules)
    state = create_train_state(host, tx, layout)
    counter = TraceCounter()
    step = make_train_step(mdef.graphdef, loss, tx, layout, seed=7, counter=counter)
    seen = []
    for _ in range(steps):
        state, m = step(state, sharding.put_batch(batch, mesh))
        assert bool(m["finite"])
        seen.append((float(m["loss"]), float(m["grad_norm"]), float(m["accuracy"])))
    assert counter.count == 1
    return seen, sharding.host_tree(state.params, mesh)


def test_sharded_step_equals_single_device():
    """ce-listwise (every candidate column through one backbone call, dropout on) on 8 devices
    (4 x 2, fsdp params) equals one device, step for step."""
    from sbert_flax.models.cross_encoder import init_head_params

    loss = ce.make_cross_encoder_loss("ce-listwise")
    rng = np.random.default_rng(0)
    abstract = loss.model_def(CFG).abstract_params
    host = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
                        + (1.0 if x.ndim == 1 else 0.0), abstract)
    host = {**host, **init_head_params(CFG, 1, seed=3)}
    batch = _listwise_batch()
    want_m, want_p = _sharded_run(sharding.make_mesh(1, 1, devices=jax.devices()[:1]),
                                  sharding.REPLICATED_RULES, host, batch, loss)
    assert want_m[0][0] > want_m[-1][0]  # it learns: the comparison is not of constants
    # Rows split over all 8 devices (both mesh axes), params fsdp-sharded over 2 of them.
    got_m, got_p = _sharded_run(sharding.make_mesh(4, 2), sharding.rules_for("fsdp"), host,
                                batch, loss)
    np.testing.assert_allclose(got_m, want_m, rtol=1e-5)
    # A softmax over one row's candidates does not see a shift shared by all of them: the
    # classifier bias has a zero gradient (float noise only) and stays at its zero init.
    # Compared absolutely; every other tensor relatively.
    for p in (got_p, want_p):
        assert np.max(np.abs(p["classifier"]["bias"])) < 1e-6
    _assert_trees_close({**got_p, "classifier": got_p["classifier"]["kernel"]},
                        {**want_p, "classifier": want_p["classifier"]["kernel"]})
