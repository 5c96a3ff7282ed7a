"""The jitted train step: sharded over 8 fake CPU devices == the same step on 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbert_flax.common import sharding
from sbert_flax.models.bert import BertModel
from sbert_flax.models.config import BertConfig
from sbert_flax.models.pooling import pool
from sbert_flax.training import losses, optim
from sbert_flax.training.siamese import model_def, weighted_cross_entropy
from sbert_flax.training.state import create_train_state, state_layout
from sbert_flax.training.step import TraceCounter, make_eval_step, make_train_step

# One layer keeps the 7 compilations of the equality test affordable on 2 CPU cores.
CFG = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
NUM_LABELS = 3
ROWS, LEN = 16, 12
LOSS = losses.make_loss("softmax", num_labels=NUM_LABELS)


def _host_params(seed=0):
    """Random numpy params of the classifier's shapes: every tensor random (zero biases / unit
    LayerNorm scales would hide mistakes), built without eager JAX ops (slow on 2 cores)."""
    rng = np.random.default_rng(seed)
    abstract = model_def(CFG, NUM_LABELS, "cls").abstract_params
    return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
                        + (1.0 if x.ndim == 1 else 0.0), abstract)


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    lens_a, lens_b = rng.integers(2, LEN + 1, ROWS), rng.integers(2, LEN + 1, ROWS)
    ids_a = rng.integers(1, CFG.vocab_size, (ROWS, LEN)).astype(np.int32)
    ids_b = rng.integers(1, CFG.vocab_size, (ROWS, LEN)).astype(np.int32)
    mask_a = (np.arange(LEN)[None] < lens_a[:, None]).astype(np.int32)
    mask_b = (np.arange(LEN)[None] < lens_b[:, None]).astype(np.int32)
    weights = np.ones(ROWS, np.float32)
    weights[-3:] = 0.0  # zero-weight pad rows, as the last partial batch has
    return {"text_a_ids": ids_a * mask_a, "text_a_mask": mask_a, "text_b_ids": ids_b * mask_b,
            "text_b_mask": mask_b,
            "labels": rng.integers(0, NUM_LABELS, ROWS).astype(np.int32), "weights": weights}


def _one_step(mesh, rules, host_params, batch, uer=False):
    mdef = model_def(CFG, NUM_LABELS, "cls")
    tx = optim.make_optimizer(1e-3, 10, warmup_ratio=0.0, uer_adamw=uer,
                              params_for_mask=mdef.abstract_params)
    layout = state_layout(mdef, tx, mesh, rules)
    state = create_train_state(host_params, tx, layout)
    counter = TraceCounter()
    step = make_train_step(mdef.graphdef, LOSS, tx, layout, seed=7, counter=counter)
    state, metrics = step(state, sharding.put_batch(batch, mesh))
    for leaf, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(layout.shardings.params),
                        strict=True):
        assert leaf.sharding == sh
    params = sharding.host_tree(state.params, mesh)  # after exactly one step
    # A second step reuses the compiled step (no retrace) and sees the updated params.
    state, metrics2 = step(state, sharding.put_batch(batch, mesh))
    assert counter.count == 1
    return float(metrics["loss"]), float(metrics2["loss"]), bool(metrics2["finite"]), params


@pytest.fixture(scope="module")
def reference():
    host, batch = _host_params(), _batch()
    mesh1 = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    return host, batch, _one_step(mesh1, sharding.REPLICATED_RULES, host, batch)


@pytest.mark.parametrize("param_sharding", ["replicated", "fsdp"])
@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
def test_sharded_step_equals_single_device(reference, shape, param_sharding):
    host, batch, (loss1, loss2, finite, params) = reference
    mesh = sharding.make_mesh(*shape)
    got = _one_step(mesh, sharding.rules_for(param_sharding), host, batch)
    assert finite and got[2]
    np.testing.assert_allclose(got[0], loss1, rtol=1e-5)
    np.testing.assert_allclose(got[1], loss2, rtol=1e-5)
    # Relative error per tensor (max |a - b| / max |b|). Elementwise rtol is not meaningful:
    # where the update cancels a parameter to ~1e-5, a 1e-9 reduction-order difference reads as
    # "4e-5 relative"; and Adam's g / (|g| + 1e-6) magnifies reduction-order noise in tiny
    # gradients (sparse embedding rows) far above float32 epsilon.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[3]), jax.tree.leaves(params),
                            strict=True):
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= 1e-5, (jax.tree_util.keystr(path), err)
    # The params moved (the comparison is not vacuous).
    assert not np.allclose(params["embedder"]["backbone"]["layers"][0]["mlp"]["wi_kernel"],
                           host["embedder"]["backbone"]["layers"][0]["mlp"]["wi_kernel"])


def test_loss_ignores_zero_weight_rows():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, -9.0, 3.0]])
    labels = jnp.array([0, 1, 1])
    full = weighted_cross_entropy(logits[:2], labels[:2], jnp.ones(2))
    padded = weighted_cross_entropy(logits, labels, jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(padded, full, rtol=1e-6)


def test_softmax_loss_is_the_uer_recipe():
    """The softmax loss (SiameseClassifier around SentenceEmbedder) computes what the step
    computed before the embedder existed: BertModel on [a; b], pooling, [u, v, |u-v|, u*v],
    linear head, weighted cross-entropy -- same dropout masks, same loss and gradient."""
    host, b = _host_params(), _batch()
    key = jax.random.key(5)
    graphdef = model_def(CFG, NUM_LABELS, "cls").graphdef
    backbone_def, _ = nnx.split(nnx.eval_shape(lambda: BertModel(CFG, rngs=nnx.Rngs(0))))

    def reference(params):
        backbone = nnx.merge(backbone_def, params["embedder"]["backbone"])
        emb = pool(backbone(jnp.concatenate([b["text_a_ids"], b["text_b_ids"]]),
                            jnp.concatenate([b["text_a_mask"], b["text_b_mask"]]), dropout_key=key),
                   jnp.concatenate([b["text_a_mask"], b["text_b_mask"]]), "cls")
        u, v = emb[:ROWS], emb[ROWS:]
        head = params["classifier"]
        logits = jnp.concatenate([u, v, jnp.abs(u - v), u * v], -1) @ head["kernel"] + head["bias"]
        return weighted_cross_entropy(logits, b["labels"], b["weights"])

    want, want_g = jax.jit(jax.value_and_grad(reference))(host)
    got, got_g, metrics = jax.jit(lambda p: LOSS.value_and_grad(graphdef, p, b, key))(host)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g),
                            strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_dropout_only_in_training_and_keyed_by_step():
    mdef = model_def(CFG, NUM_LABELS, "cls")
    model = nnx.merge(mdef.graphdef, _host_params())
    b = _batch()
    args = (b["text_a_ids"], b["text_a_mask"], b["text_b_ids"], b["text_b_mask"])
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, key: nnx.merge(graphdef, p)(*args, dropout_key=key))
    eval_fwd = jax.jit(lambda p: nnx.merge(graphdef, p)(*args))
    eval1, eval2 = eval_fwd(params), eval_fwd(params)
    np.testing.assert_array_equal(eval1, eval2)
    k = jax.random.key(7)
    t0 = fwd(params, jax.random.fold_in(k, 0))
    t0b = fwd(params, jax.random.fold_in(k, 0))
    t1 = fwd(params, jax.random.fold_in(k, 1))
    np.testing.assert_array_equal(t0, t0b)
    assert not np.allclose(t0, eval1) and not np.allclose(t0, t1)


def test_finite_flag_and_eval_step():
    mesh = sharding.make_mesh(1, 2, devices=jax.devices()[:2])
    mdef = model_def(CFG, NUM_LABELS, "cls")
    tx = optim.make_optimizer(1e-3, 10, params_for_mask=mdef.abstract_params)
    layout = state_layout(mdef, tx, mesh, sharding.FSDP_RULES)
    step = make_train_step(mdef.graphdef, LOSS, tx, layout, seed=7)
    batch = sharding.put_batch(_batch(), mesh)
    state, m1 = step(create_train_state(_host_params(), tx, layout), batch)
    assert bool(m1["finite"]) and np.isfinite(float(m1["loss"]))
    # One NaN weight (what a diverged update leaves) makes the loss NaN: the step says so.
    host = jax.tree.map(np.array, _host_params())
    first = jax.tree.leaves(host)[0]
    first.flat[0] = np.nan
    _, m2 = step(create_train_state(host, tx, layout), batch)
    assert not bool(m2["finite"]) and np.isnan(float(m2["loss"]))
    ev = make_eval_step(mdef.graphdef, layout)
    eb = dict(_batch(), index=np.arange(ROWS, dtype=np.int32))
    out = ev(create_train_state(_host_params(), tx, layout).params, sharding.put_batch(eb, mesh))
    assert out["logits"].shape == (ROWS, NUM_LABELS)
    np.testing.assert_array_equal(np.asarray(out["index"]), np.arange(ROWS))


def test_bf16_compute_keeps_float32_master_state():
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    host, batch = _host_params(), _batch()
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        mdef = model_def(CFG, NUM_LABELS, "cls", dtype)
        tx = optim.make_optimizer(1e-3, 10, params_for_mask=mdef.abstract_params)
        layout = state_layout(mdef, tx, mesh, sharding.REPLICATED_RULES)
        state, m = make_train_step(mdef.graphdef, LOSS, tx, layout, seed=7)(
            create_train_state(host, tx, layout), sharding.put_batch(batch, mesh))
        assert bool(m["finite"])
        assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
                if x.ndim} == {jnp.dtype(jnp.float32)}
        losses[jnp.dtype(dtype).name] = float(m["loss"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_softmax_packed_equals_padded():
    """The softmax loss on a packed batch (both columns' texts in shared rows, u and v gathered
    per pair) == on the padded [a; b] batch: loss, accuracy and every gradient, no dropout."""
    from sbert_flax.inference.packing import TrainPacking

    mdef = model_def(CFG, NUM_LABELS, "mean")
    params = jax.tree.map(jnp.asarray, _host_params())
    batch = _batch()
    texts = [[batch[f"{c}_ids"][r, : batch[f"{c}_mask"][r].sum()] for r in range(ROWS)]
             for c in ("text_a", "text_b")]
    p = TrainPacking(2 * LEN, 1, 1).pack(texts)
    packed = {f"packed_{k}": p[k] for k in ("ids", "segments", "positions")}
    for k, c in enumerate(("text_a", "text_b")):
        packed[f"{c}_row"], packed[f"{c}_slot"] = p["row"][k], p["slot"][k]
    packed["labels"], packed["weights"] = batch["labels"], batch["weights"]
    assert packed["packed_ids"].shape[0] < 2 * ROWS  # several texts share a row

    run = jax.jit(lambda prm, b: LOSS.value_and_grad(mdef.graphdef, prm, b, None))
    loss_pad, grads_pad, m_pad = run(params, batch)
    loss_pack, grads_pack, m_pack = run(params, packed)
    np.testing.assert_allclose(float(loss_pack), float(loss_pad), rtol=1e-5)
    assert float(m_pack["accuracy"]) == float(m_pad["accuracy"])
    for a, b in zip(jax.tree.leaves(grads_pack), jax.tree.leaves(grads_pad), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(scale, 1e-12)
