"""Optimizer for siamese fine-tuning: AdamW, linear warmup/decay, no decay on biases and LayerNorm.

Mirrors UER-py's `build_optimizer` for fine-tuning: two groups, weight decay 0.01 on weights and 0
on params whose name contains "bias", "gamma" or "beta" (UER's LayerNorm names); AdamW with
eps=1e-6 and `correct_bias=False`; `get_linear_schedule_with_warmup` stepped after every update.
`make_optimizer` defaults to optax's standard (bias-corrected) AdamW with the same settings;
`uer_adamw=True` reproduces UER's update rule exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Module names whose params are LayerNorm scale/bias in our NNX model (model.py); any name ending
# in "norm" (HF's "LayerNorm", a head's "norm") is treated the same.
NORM_MODULES = frozenset({"layer_norm", "attention_norm", "output_norm"})

# Pytree key-path entries that are containers, not names: an nnx.Variable's `.value`.
_CONTAINER_ATTRS = frozenset({"value", "raw_value"})

# UER's AdamW epsilon for BERT fine-tuning, the default of both optimizers. torch's AdamW and HF /
# sentence-transformers' Trainer use 1e-8 (`--adam_eps 1e-8`, see bench/siamese_divergence.py).
ADAM_EPS = 1e-6


def _path_names(path: tuple[Any, ...]) -> list[str]:
    """Names along a key path (dict keys, attribute names, list indices as strings)."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name not in _CONTAINER_ATTRS:
                names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return names


def is_decayed(names: list[str]) -> bool:
    """Whether a param at this name path gets weight decay.

    No decay for biases (`bias`, `*_bias`) and for anything inside a LayerNorm module (its scale
    and bias); embeddings and kernels decay. As in UER/HF, only biases and LayerNorm gamma/beta
    are excluded.
    """
    if not names:
        return True
    leaf = names[-1]
    if leaf == "bias" or leaf.endswith("_bias"):
        return False
    for module in names[:-1]:
        m = module.lower()
        if module in NORM_MODULES or m.endswith("norm"):
            return False
    # HF/UER-style LayerNorm leaf names, should a converted tree keep them.
    return leaf not in ("gamma", "beta")


def decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True where weight decay applies.

    Works on nested dicts (`nnx.to_pure_dict`) and on `nnx.State` (its Variables keep their
    structure, holding bools), so it can be given to `optax.adamw(mask=...)` either way.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(_path_names(p)), params)


def warmup_linear_schedule(learning_rate: float, total_steps: int,
                           warmup_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `total_steps`.

    UER-py / transformers' `get_linear_schedule_with_warmup` with
    num_warmup_steps = total_steps * warmup_ratio (UER passes `train_steps * warmup`, a float, so
    the warmup is not rounded here either):
    lr(s) = lr * s / warmup for s < warmup, else lr * max(0, (total - s) / (total - warmup)).

    Step numbering matches PyTorch: UER calls `scheduler.step()` after `optimizer.step()`, so the
    first update uses lr(0) = 0, the second lr(1). optax evaluates a schedule at its update count
    before incrementing it, which starts at 0 -- the same numbering, no offset needed.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    warmup = float(total_steps) * float(warmup_ratio)
    total = float(total_steps)

    def schedule(step: jax.Array | int) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        # transformers guards both denominators with max(1, .); so do we (warmup 0 => no warmup).
        up = s / max(1.0, warmup)
        down = jnp.maximum(0.0, (total - s) / max(1.0, total - warmup))
        return learning_rate * jnp.where(s < warmup, up, down)

    return schedule


class UerAdamWState(NamedTuple):
    """State of `uer_adamw`: update count and the first/second moments."""

    count: jax.Array  # int32 scalar, updates done
    mu: optax.Updates
    nu: optax.Updates


def uer_adamw(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = ADAM_EPS, weight_decay: float = 0.01,
              mask: Any | Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """UER-py's AdamW (`uer/utils/optimizers.py`) with `correct_bias=False`, as UER fine-tunes.

    Per param, with lr = schedule(count):
      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
      p' = p - lr * m / (sqrt(v) + eps)          # no bias correction
      p'' = p' - lr * wd * p'                    # decoupled decay, after the Adam step, if masked in
    Note the decay uses the already-updated p' (UER decays `p.data` after `addcdiv_`), unlike
    optax.adamw, which decays the pre-update params.

    Args:
      learning_rate: a float or an optax schedule of the update count.
      b1, b2: moment decay rates.
      eps: added to sqrt(v).
      weight_decay: decoupled decay rate.
      mask: pytree of bools like the params (or a function params -> such a pytree): True where
        to decay. None decays everything.

    Returns:
      An optax transformation; its `update` requires `params`.
    """
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params: optax.Params) -> UerAdamWState:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return UerAdamWState(count=jnp.zeros([], jnp.int32), mu=zeros,
                             nu=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(updates: optax.Updates, state: UerAdamWState, params: optax.Params | None = None):
        if params is None:
            raise ValueError("uer_adamw needs params (its weight decay uses them): "
                             "call tx.update(grads, state, params)")
        lr = lr_fn(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
        if mask is None:
            decay = jax.tree_util.tree_map(lambda _: True, params)
        else:
            decay = mask(params) if callable(mask) else mask

        def one(m, v, p, d):
            step = -lr * m / (jnp.sqrt(v) + eps)
            if weight_decay == 0.0 or (isinstance(d, (bool, np.bool_)) and not d):
                return step.astype(p.dtype)
            decayed = step - lr * weight_decay * (p + step)
            if not isinstance(d, (bool, np.bool_)):  # a mask of arrays (e.g. passed through jit)
                decayed = jnp.where(d, decayed, step)
            return decayed.astype(p.dtype)

        new_updates = jax.tree_util.tree_map(one, mu, nu, params, decay)
        count = optax.safe_int32_increment(state.count)
        return new_updates, UerAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


# `make_optimizer`'s flag of the same name shadows the function inside it.
_uer_adamw = uer_adamw


def head_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True outside a loss's head (`classifier`), i.e. on the
    sentence encoder that sentence-transformers' Trainer clips (`model.parameters()`)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "classifier" not in _path_names(p)[:1], params)


def make_optimizer(learning_rate: float, total_steps: int, *, warmup_ratio: float = 0.1,
                   weight_decay: float = 0.01, uer_adamw: bool = False,
                   params_for_mask: Any | None = None,
                   max_grad_norm: float | None = None, adam_eps: float = ADAM_EPS,
                   clip_head: bool = True) -> optax.GradientTransformation:
    """The fine-tuning optimizer: AdamW on a warmup-linear schedule, no decay on bias/LayerNorm.

    Args:
      learning_rate: peak learning rate (UER's default for BERT fine-tuning: 2e-5).
      total_steps: updates in the whole run (the schedule reaches 0 there).
      warmup_ratio: fraction of total_steps spent warming up (UER's --warmup, 0.1).
      weight_decay: decoupled decay on weights (UER: 0.01).
      uer_adamw: use UER's exact AdamW (no bias correction, decay after the step); default is
        optax.adamw (bias-corrected), both with b1=0.9, b2=0.999, eps=1e-6.
      params_for_mask: params (or an abstract tree of the same structure) to compute the decay
        mask once; None computes it from the params at each update.
      max_grad_norm: clip gradients to this global norm first; None (UER's default) does not clip.
      adam_eps: added to sqrt(v): UER's 1e-6 (the default), or torch / HF Trainer's 1e-8.
      clip_head: with `max_grad_norm`, the norm and the clipping cover the classifier head too
        (old sentence-transformers `fit`: `loss_model.parameters()`); False clips only the
        encoder, as sentence-transformers' Trainer does (`model.parameters()`: the SoftmaxLoss
        head lives in the loss, outside the norm, and is never scaled).

    Returns:
      An optax transformation; `update` needs params.
    """
    schedule = warmup_linear_schedule(learning_rate, total_steps, warmup_ratio)
    mask = decay_mask(params_for_mask) if params_for_mask is not None else decay_mask
    if uer_adamw:
        tx = _uer_adamw(schedule, eps=adam_eps, weight_decay=weight_decay, mask=mask)
    else:
        tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=adam_eps, weight_decay=weight_decay,
                         mask=mask)
    if max_grad_norm is not None:
        clip = optax.clip_by_global_norm(max_grad_norm)
        if not clip_head:  # masked: the norm is over the masked-in leaves only
            clip = optax.masked(clip, head_mask(params_for_mask) if params_for_mask is not None
                                else head_mask)
        tx = optax.chain(clip, tx)
    return tx
