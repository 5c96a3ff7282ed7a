"""sbert_flax.training.optim: decay mask, warmup-linear schedule, UER's AdamW, make_optimizer."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sbert_flax.models.bert import BertModel
from sbert_flax.models.config import BertConfig
from sbert_flax.training.optim import (
    decay_mask,
    make_optimizer,
    uer_adamw,
    warmup_linear_schedule,
)

CFG = BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=16, max_position_embeddings=32)


def tiny_params() -> dict:
    """Our BERT's param tree (random numpy values, no init compute) plus a classifier head named
    the way the training head names it."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: BertModel(CFG, rngs=nnx.Rngs(0))),
                                          nnx.Param))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract)
    params["classifier"] = {"kernel": rng.normal(size=(3 * 8, 3)).astype(np.float32),
                            "bias": np.zeros(3, np.float32)}
    return jax.tree_util.tree_map(jnp.asarray, params)


def flat(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------------------------
# decay_mask
# ----------------------------------------------------------------------------------------------


def test_decay_mask_excludes_biases_and_layer_norms():
    mask = flat(decay_mask(tiny_params()))
    no_decay = {k for k, v in mask.items() if not v}
    decay = {k for k, v in mask.items() if v}
    assert decay == {
        "embeddings/word_embeddings", "embeddings/position_embeddings",
        "embeddings/token_type_embeddings", "classifier/kernel",
        *(f"layers/{i}/{m}" for i in range(2) for m in (
            "attention/qkv_kernel", "attention/out_kernel", "mlp/wi_kernel", "mlp/wo_kernel")),
    }
    assert no_decay == {
        "embeddings/layer_norm/scale", "embeddings/layer_norm/bias", "classifier/bias",
        *(f"layers/{i}/{m}" for i in range(2) for m in (
            "attention/qkv_bias", "attention/out_bias", "mlp/wi_bias", "mlp/wo_bias",
            "attention_norm/scale", "attention_norm/bias", "output_norm/scale", "output_norm/bias")),
    }


def test_decay_mask_on_nnx_state_and_hf_style_names():
    model = nnx.eval_shape(lambda: BertModel(CFG, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    mask = decay_mask(state)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(state)
    assert flat(decay_mask(nnx.to_pure_dict(state))) == flat(nnx.to_pure_dict(mask))
    hf = {"encoder": {"LayerNorm": {"gamma": 1.0, "weight": 1.0}, "dense": {"weight": 1.0}},
          "x": {"beta": 1.0}}
    assert flat(decay_mask(hf)) == {"encoder/LayerNorm/gamma": False,
                                    "encoder/LayerNorm/weight": False,
                                    "encoder/dense/weight": True, "x/beta": False}


# ----------------------------------------------------------------------------------------------
# warmup_linear_schedule
# ----------------------------------------------------------------------------------------------


def linear_with_warmup(step: int, lr: float, total: int, warmup: float) -> float:
    """transformers' get_linear_schedule_with_warmup lambda (UER's copy is the same)."""
    if step < warmup:
        return lr * step / max(1.0, warmup)
    return lr * max(0.0, (total - step) / max(1.0, total - warmup))


@pytest.mark.parametrize("total,ratio", [(100, 0.1), (25, 0.1), (7, 0.0), (10, 1.0)])
def test_schedule_formula(total, ratio):
    s = warmup_linear_schedule(2e-5, total, ratio)
    warmup = total * ratio
    for step in [*range(0, total + 3)]:
        assert float(s(step)) == pytest.approx(linear_with_warmup(step, 2e-5, total, warmup),
                                               rel=1e-6, abs=1e-12)
    assert float(s(0)) == 0.0 or ratio == 0.0  # the first update uses lr(0)
    assert float(s(total)) == 0.0
    if ratio == 0.1 and total == 100:
        assert float(s(10)) == pytest.approx(2e-5) and float(s(5)) == pytest.approx(1e-5)
        assert float(s(55)) == pytest.approx(1e-5)


def test_schedule_matches_pytorch_step_order():
    """lr seen by each optimizer.step() in UER's loop (optimizer.step(); scheduler.step())."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    total, lr = 23, 5e-5
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, total * 0.1, total)  # UER: train_steps * warmup
    seen = []
    for _ in range(total + 2):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = warmup_linear_schedule(lr, total, 0.1)
    np.testing.assert_allclose([float(ours(i)) for i in range(total + 2)], seen, rtol=1e-6, atol=1e-12)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        warmup_linear_schedule(1e-3, 0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        warmup_linear_schedule(1e-3, 10, 1.5)


# ----------------------------------------------------------------------------------------------
# uer_adamw vs a numpy transcription of UER's AdamW(correct_bias=False)
# ----------------------------------------------------------------------------------------------


def uer_adamw_numpy(params, grads_seq, lr_fn, mask, b1=0.9, b2=0.999, eps=1e-6, wd=0.01):
    """UER-py uer/utils/optimizers.py AdamW.step, line by line, in float64."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq):
        lr = lr_fn(t)
        for k in p:
            g = np.asarray(grads[k], np.float64)
            m[k] = m[k] * b1 + (1.0 - b1) * g             # exp_avg.mul_(beta1).add_(grad, 1-beta1)
            v2[k] = v2[k] * b2 + (1.0 - b2) * g * g       # exp_avg_sq.mul_(beta2).addcmul_(...)
            denom = np.sqrt(v2[k]) + eps                  # exp_avg_sq.sqrt().add_(eps)
            p[k] = p[k] - lr * m[k] / denom               # addcdiv_(exp_avg, denom, -step_size)
            if mask[k] and wd > 0.0:
                p[k] = p[k] - lr * wd * p[k]              # p.data.add_(p.data, -lr * wd)
    return p


def random_problem(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
              "bias": rng.normal(size=(3,)).astype(np.float32),
              "scale": rng.normal(size=(5,)).astype(np.float32)}
    grads = [{k: (rng.normal(size=v.shape) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
              for k, v in params.items()} for _ in range(steps)]
    return params, grads


def run_optax(tx, params, grads_seq):
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    step = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = step(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return p


@pytest.mark.parametrize("lr_kind", ["constant", "schedule"])
def test_uer_adamw_matches_numpy_reference(lr_kind):
    steps = 12
    params, grads = random_problem(steps)
    mask = {"kernel": True, "bias": False, "scale": True}
    # Large rates so decay and the no-bias-correction step are both visible in float32.
    if lr_kind == "constant":
        lr, lr_fn = 0.05, (lambda t: 0.05)
    else:
        lr = warmup_linear_schedule(0.05, steps, 0.25)
        lr_fn = lambda t: linear_with_warmup(t, 0.05, steps, steps * 0.25)  # noqa: E731
    got = run_optax(uer_adamw(lr, weight_decay=0.1, mask=mask), params, grads)
    want = uer_adamw_numpy(params, grads, lr_fn, mask, wd=0.1)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-6, atol=2e-7, err_msg=k)
    # Sanity: the reference differs from bias-corrected AdamW, so the test can tell them apart.
    std = run_optax(optax.adamw(lr, eps=1e-6, weight_decay=0.1, mask=mask), params, grads)
    assert not np.allclose(np.asarray(std["kernel"]), want["kernel"], rtol=1e-4)


def test_uer_adamw_callable_mask_and_no_mask():
    params, grads = random_problem(3, seed=1)
    mask = {"kernel": True, "bias": False, "scale": False}
    a = run_optax(uer_adamw(0.01, mask=lambda p: mask), params, grads)
    b = uer_adamw_numpy(params, grads, lambda t: 0.01, mask)
    c = run_optax(uer_adamw(0.01), params, grads)
    d = uer_adamw_numpy(params, grads, lambda t: 0.01, dict.fromkeys(mask, True))
    for k in params:
        np.testing.assert_allclose(np.asarray(a[k]), b[k], rtol=2e-6, atol=2e-7)
        np.testing.assert_allclose(np.asarray(c[k]), d[k], rtol=2e-6, atol=2e-7)
    with pytest.raises(ValueError, match="needs params"):
        tx = uer_adamw(0.01)
        tx.update(params, tx.init(params))


# ----------------------------------------------------------------------------------------------
# make_optimizer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uer,precomputed_mask", [(False, False), (True, True)])
def test_make_optimizer_decays_only_weights(uer, precomputed_mask):
    params = tiny_params()
    tx = make_optimizer(1e-2, total_steps=10, warmup_ratio=0.1, weight_decay=0.5, uer_adamw=uer,
                        params_for_mask=params if precomputed_mask else None)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    # Step 0 runs at lr 0: nothing moves.
    u, state = step(zero, state, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(u))
    u, state = step(zero, state, params)  # lr(1) = 1e-2: pure decay on the masked-in leaves
    p1 = optax.apply_updates(params, u)
    f0, f1 = flat(params), flat(p1)
    for k in ("embeddings/layer_norm/scale", "layers/0/attention_norm/scale",
              "layers/1/output_norm/bias", "layers/0/attention/qkv_bias", "classifier/bias"):
        np.testing.assert_array_equal(np.asarray(f1[k]), np.asarray(f0[k]), err_msg=k)
    for k in ("classifier/kernel", "layers/1/mlp/wi_kernel", "embeddings/word_embeddings"):
        np.testing.assert_allclose(np.asarray(f1[k]), np.asarray(f0[k]) * (1 - 1e-2 * 0.5),
                                   rtol=1e-6, err_msg=k)


def test_make_optimizer_default_is_optax_adamw():
    params, grads = random_problem(6, seed=2)
    mask = {"kernel": True, "bias": False, "scale": True}
    # Our param names: only "bias" is excluded here ("scale" is not under a norm module).
    got = run_optax(make_optimizer(0.03, 6, warmup_ratio=0.5, weight_decay=0.1), params, grads)
    want = run_optax(optax.adamw(warmup_linear_schedule(0.03, 6, 0.5), b1=0.9, b2=0.999,
                                 eps=1e-6, weight_decay=0.1, mask=mask), params, grads)
    for k in params:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_make_optimizer_clips_when_asked():
    params, grads = random_problem(5, seed=3)
    grads = [jax.tree_util.tree_map(lambda g, i=i: g * 10.0 ** (i - 2), g) for i, g in enumerate(grads)]
    clip = optax.clip_by_global_norm(0.5)
    clipped = [clip.update(jax.tree_util.tree_map(jnp.asarray, g), clip.init(None))[0]
               for g in grads]
    kw = dict(warmup_ratio=0.2, weight_decay=0.1, uer_adamw=True)
    got = run_optax(make_optimizer(0.05, 5, max_grad_norm=0.5, **kw), params, grads)
    want = run_optax(make_optimizer(0.05, 5, **kw), params, clipped)
    plain = run_optax(make_optimizer(0.05, 5, **kw), params, grads)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7)
    # Gradients of varying norm: Adam is not scale-invariant across steps, so clipping shows.
    assert not np.allclose(np.asarray(got["kernel"]), np.asarray(plain["kernel"]), rtol=1e-4)


def test_make_optimizer_with_nnx_optimizer():
    """Works on nnx.State (Variables, not dicts), through nnx.Optimizer under nnx.jit."""
    cfg = dataclasses.replace(CFG, num_hidden_layers=1)
    # Abstract init + numpy values: eager random init would compile a kernel per param shape.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)), abstract))

    @nnx.jit
    def two_steps(model, opt):
        grads = jax.tree_util.tree_map(jnp.ones_like, nnx.state(model, nnx.Param))
        opt.update(model, grads)
        opt.update(model, grads)

    for uer in (False, True):
        opt = nnx.Optimizer(model, make_optimizer(1e-3, 10, uer_adamw=uer), wrt=nnx.Param)
        before = np.asarray(model.embeddings.word_embeddings[...])
        two_steps(model, opt)
        assert int(opt.step[...]) == 2
        assert not np.array_equal(np.asarray(model.embeddings.word_embeddings[...]), before)


def test_head_mask():
    """True on the encoder, False on the loss's head (what sentence-transformers' Trainer leaves
    out of its clipping norm)."""
    from sbert_flax.training.optim import head_mask

    params = tiny_params()
    mask = flat(head_mask({"embedder": {"backbone": params}, "classifier": params["classifier"]}))
    assert mask["classifier/kernel"] is False and mask["classifier/bias"] is False
    assert all(v for k, v in mask.items() if not k.startswith("classifier/"))
    assert sum(1 for v in mask.values() if v) == len(flat(params))  # the nested "classifier" too


def test_make_optimizer_matches_torch_adamw_with_encoder_clipping():
    """adam_eps=1e-8, clip_head=False: torch's AdamW (two decay groups) after
    clip_grad_norm_ over the encoder's params only, as sentence-transformers' Trainer steps."""
    import torch
    rng = np.random.default_rng(5)
    params = {"embedder": {"w": rng.normal(size=(4, 3)).astype(np.float32),
                           "bias": rng.normal(size=(3,)).astype(np.float32)},
              "classifier": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                             "bias": rng.normal(size=(2,)).astype(np.float32)}}
    steps, lr = 6, 0.03
    grads = [jax.tree_util.tree_map(
        lambda x, i=i: (rng.normal(size=x.shape) * 10.0 ** (i - 3)).astype(np.float32), params)
        for i in range(steps)]
    got = run_optax(make_optimizer(lr, steps, warmup_ratio=0.5, weight_decay=0.1, max_grad_norm=0.5,
                                   adam_eps=1e-8, clip_head=False, params_for_mask=params),
                    params, grads)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in flat(params).items()}
    encoder = [tp["embedder/w"], tp["embedder/bias"]]
    opt = torch.optim.AdamW([{"params": [tp["embedder/w"], tp["classifier/kernel"]], "weight_decay": 0.1},
                             {"params": [tp["embedder/bias"], tp["classifier/bias"]], "weight_decay": 0.0}],
                            lr=lr, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_with_warmup(s, 1.0, steps, 0.5 * steps))
    for g in grads:
        for k, v in flat(g).items():
            tp[k].grad = torch.tensor(v)
        torch.nn.utils.clip_grad_norm_(encoder, 0.5)
        opt.step()
        sched.step()
    for k, v in flat(got).items():
        np.testing.assert_allclose(np.asarray(v), tp[k].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=k)
