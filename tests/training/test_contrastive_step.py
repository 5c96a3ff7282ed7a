"""The embedding losses in the train step: exact on a mesh, GradCache exact, padding inert.

- mnrl on 8 devices (data=8, and data=4 x fsdp=2) == 1 device with the same global batch: the
  in-batch negatives of every anchor come from the whole global batch.
- cached-mnrl == mnrl (loss and gradient, dropout on, Matryoshka too), also on the mesh.
- zero-weight padding rows change neither loss nor gradient.
- packed batches (the texts of all columns in shared rows, the pipeline's default for these
  losses): the same loss and gradient as padded ones without dropout, and all of the above with it.
Every text column of the padded test batches has its own length, as the pipeline pads them.
Tolerances as in test_train_step.py (loss rtol 1e-5; per-tensor max |a - b| / max |b| <= 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbert_flax.common import sharding
from sbert_flax.inference.packing import TrainPacking
from sbert_flax.models.config import BertConfig
from sbert_flax.training import losses
from sbert_flax.training.state import create_train_state, state_layout
from sbert_flax.training.step import TraceCounter, make_train_step

# One layer keeps the compilations affordable on 2 CPU cores; dropout stays on (0.1).
CFG = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
ROWS = 16
WIDTHS = (12, 8, 10)  # each text column its own padded length, as the pipeline pads them
PAD = (5, 13, 14, 15)  # zero-weight rows, one inside the batch (a padded local batch of a process)


def _host_params(loss, seed=0):
    rng = np.random.default_rng(seed)
    abstract = loss.model_def(CFG, "mean").abstract_params
    return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
                        + (1.0 if x.ndim == 1 else 0.0), abstract)


def _batch(columns, rows=ROWS, pad=PAD, seed=1):
    rng = np.random.default_rng(seed)
    out = {}
    for c, width in zip(columns, WIDTHS, strict=False):
        lens = rng.integers(2, width + 1, rows)
        mask = (np.arange(width)[None] < lens[:, None]).astype(np.int32)
        out[f"{c}_ids"] = rng.integers(1, CFG.vocab_size, (rows, width)).astype(np.int32) * mask
        out[f"{c}_mask"] = mask
    out["weights"] = np.ones(rows, np.float32)
    out["weights"][list(pad)] = 0.0
    out["scores"] = rng.random(rows).astype(np.float32)
    return out


def _packed(batch, columns, groups=1, row_multiple=1, length=16):
    """The padded test batch's texts packed as the pipeline packs them (`TrainPacking`)."""
    texts = [[batch[f"{c}_ids"][r, : batch[f"{c}_mask"][r].sum()] for r in range(len(batch["weights"]))]
             for c in columns]
    p = TrainPacking(length, groups, row_multiple).pack(texts)
    out = {f"packed_{k}": p[k] for k in ("ids", "segments", "positions")}
    for k, c in enumerate(columns):
        out[f"{c}_row"], out[f"{c}_slot"] = p["row"][k], p["slot"][k]
    return {**out, "weights": batch["weights"], "scores": batch["scores"]}


def _rel_err(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))


def _assert_trees_close(got, want, tol=1e-5):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        err = _rel_err(a, b)
        assert err <= tol, (jax.tree_util.keystr(path), err)


def _train(loss, mesh, rules, host, batch, steps=3):
    """(loss and grad norm of each step, host params after the last step).

    Plain SGD: Adam's first update g / (|g| + eps) turns float32 reduction-order noise of a
    near-zero gradient element into a visible parameter difference (seen here: a 1.5e-6 gradient
    element that sums terms of 5e-2 differs by 1e-8 between meshes, its Adam update by 1e-6), the
    effect test_train_step.py describes. SGD keeps the comparison about the loss and its gradient,
    over several steps.
    """
    mdef = loss.model_def(CFG, "mean")
    tx = optax.sgd(0.5)
    layout = state_layout(mdef, tx, mesh, rules)
    state = create_train_state(host, tx, layout)
    counter = TraceCounter()
    step = make_train_step(mdef.graphdef, loss, tx, layout, seed=7, counter=counter)
    seen = []
    for _ in range(steps):
        state, m = step(state, sharding.put_batch(batch, mesh))
        assert bool(m["finite"]) and {"loss", "grad_norm", "finite", "accuracy"} <= set(m)
        seen.append((float(m["loss"]), float(m["grad_norm"])))
    assert counter.count == 1
    for leaf, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(layout.shardings.params),
                        strict=True):
        assert leaf.sharding == sh
    return seen, sharding.host_tree(state.params, mesh)


COLUMNS = ("anchor", "positive", "negative")


@pytest.fixture(scope="module", params=["padded", "packed"])
def reference(request):
    """One-device mnrl run. Packed: 2 groups (the cached-mnrl runs' mini-batches of 8) of rows
    in multiples of 8 (the devices)."""
    loss = losses.make_loss("mnrl")
    host, batch = _host_params(loss), _batch(COLUMNS)
    if request.param == "packed":
        batch = _packed(batch, COLUMNS, groups=2, row_multiple=8)
    mesh1 = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    return host, batch, _train(loss, mesh1, sharding.REPLICATED_RULES, host, batch)


@pytest.mark.parametrize("name,shape,param_sharding", [
    ("mnrl", (8, 1), "replicated"),
    ("mnrl", (4, 2), "fsdp"),
    ("cached-mnrl", (4, 2), "fsdp"),
])
def test_sharded_equals_single_device(reference, name, shape, param_sharding):
    host, batch, (want_metrics, want_params) = reference
    loss = losses.make_loss(name, mini_batch_size=8 if name == "cached-mnrl" else None)
    got_metrics, got_params = _train(loss, sharding.make_mesh(*shape),
                                     sharding.rules_for(param_sharding), host, batch)
    np.testing.assert_allclose(got_metrics, want_metrics, rtol=1e-5)
    _assert_trees_close(got_params, want_params)
    # The params moved (the comparison is not vacuous).
    w = "['embedder']['backbone']['layers'][0]['mlp']['wi_kernel']"
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want_params)}
    flat_host = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(host)}
    assert not np.allclose(flat[w], flat_host[w])


_JITTED: dict = {}
# Threefry keys (JAX's default, and the train step's): under vmap they draw what they draw
# unbatched, which is what makes a row's dropout masks independent of the batch layout; rbg
# keys do not (cached-mnrl then differs from mnrl by a few percent).
KEY = jax.random.key(7)


def _value_and_grad(loss, params, batch, key):
    if loss not in _JITTED:  # one jitted function per loss: a new key or new values reuse it
        graphdef = loss.model_def(CFG, "mean").graphdef
        _JITTED[loss] = jax.jit(lambda p, b, k: loss.value_and_grad(graphdef, p, b, k))
    value, grads, metrics = _JITTED[loss](params, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    return float(value), jax.tree.map(np.asarray, grads), metrics


@pytest.mark.parametrize("packed", [False, True])
def test_cached_mnrl_equals_mnrl(packed):
    """Hard negatives, symmetric and Matryoshka together, dropout on, 4 mini-batches of 4 (a
    packed batch: packed in those 4 groups, as the pipeline packs it for cached-mnrl)."""
    options = {"symmetric": True, "matryoshka_dims": (32, 16, 8)}
    plain = losses.make_loss("mnrl", **options)
    cached = losses.make_loss("cached-mnrl", mini_batch_size=4, **options)
    host, batch = _host_params(plain), _batch(COLUMNS)
    if packed:
        batch = _packed(batch, COLUMNS, groups=4)
    v1, g1, m1 = _value_and_grad(plain, host, batch, KEY)
    v2, g2, m2 = _value_and_grad(cached, host, batch, KEY)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    np.testing.assert_allclose(float(m2["accuracy"]), float(m1["accuracy"]))
    _assert_trees_close(g2, g1)
    # Dropout was on: another key gives another loss.
    v0, _, _ = _value_and_grad(plain, host, batch, jax.random.key(8))
    assert abs(v0 - v1) > 1e-4


def test_padding_rows_change_nothing():
    """Whatever the zero-weight rows hold (other text, or nothing: an all-zero mask pools to a
    zero vector), loss and gradient are the same, and finite. (cosent; mnrl's padding rows are in
    every batch of the tests above, and test_losses.py checks both losses on zero vectors.)"""
    loss = losses.make_loss("cosent")
    names = loss.text_columns(False)
    host, batch = _host_params(loss), _batch(names)
    other = _batch(names, seed=9)
    changed = {k: v.copy() for k, v in batch.items()}
    for k in changed:
        changed[k][list(PAD)] = other[k][list(PAD)]
    empty = {k: v.copy() for k, v in batch.items()}
    for c in names:
        empty[f"{c}_ids"][list(PAD)] = 0
        empty[f"{c}_mask"][list(PAD)] = 0
    assert not np.array_equal(changed[f"{names[0]}_ids"], batch[f"{names[0]}_ids"])
    v1, g1, _ = _value_and_grad(loss, host, batch, KEY)
    assert np.isfinite(v1) and v1 > 0
    for b in (changed, empty):
        v2, g2, _ = _value_and_grad(loss, host, b, KEY)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g2))
        np.testing.assert_allclose(v2, v1, rtol=1e-6)
        _assert_trees_close(g2, g1, tol=1e-6)


def test_mini_batch_must_divide_the_batch():
    loss = losses.make_loss("cached-mnrl", mini_batch_size=5)
    with pytest.raises(ValueError, match="must divide"):
        _value_and_grad(loss, _host_params(loss), _batch(("anchor", "positive")), KEY)


@pytest.mark.parametrize("name", ["mnrl", "cosent"])
def test_packed_equals_padded_without_dropout(name):
    """Packing changes where a text sits, not what it embeds to: block-diagonal attention and
    positions restarting per text give each text its padded embedding, so loss and gradient match."""
    loss = losses.make_loss(name)
    names = COLUMNS if name == "mnrl" else loss.text_columns(False)
    host, batch = _host_params(loss), _batch(names)
    packed = _packed(batch, names)
    assert packed["packed_ids"].shape[0] < ROWS * len(names)  # several texts share a row
    v1, g1, m1 = _value_and_grad(loss, host, batch, None)
    v2, g2, m2 = _value_and_grad(loss, host, packed, None)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    assert m2.keys() == m1.keys()
    _assert_trees_close(g2, g1)


def test_packed_groups_must_match_the_mini_batches():
    loss = losses.make_loss("cached-mnrl", mini_batch_size=4)
    batch = _packed(_batch(("anchor", "positive")), ("anchor", "positive"), groups=1)  # 8 rows, 4 groups wanted
    batch = {k: v[:6] if k.startswith("packed_") else v for k, v in batch.items()}
    with pytest.raises(ValueError, match="do not split into 4 mini-batch groups"):
        _value_and_grad(loss, _host_params(loss), batch, KEY)
