"""The pure, jitted train and eval steps: one `jax.jit` each, explicit shardings, donated state.

`train_step(state, batch) -> (state, metrics)`. Dropout's key is `fold_in(key(seed), step)`, a
function of the state, so a resumed run draws exactly the masks an uninterrupted run would.
The metrics include `finite`: loss, gradients and the updated params are all finite; the loop
stops on a False before anything is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sbert_flax import sharding
from sbert_flax.training.siamese import weighted_cross_entropy
from sbert_flax.training.state import StateLayout, TrainState

Batch = dict[str, jax.Array]
TRAIN_KEYS = ("a_ids", "a_mask", "b_ids", "b_mask", "labels", "weights")


class TraceCounter:
    """Counts traces (= compilations) of a jitted function; bumped inside the traced Python."""

    def __init__(self) -> None:
        self.count = 0


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, layout: StateLayout,
                    *, seed: int, debug_nan_at_step: int | None = None,
                    counter: TraceCounter | None = None) -> Callable[[TrainState, Batch], tuple]:
    """Builds the jitted train step.

    Args:
      graphdef: the `SiameseClassifier` graph (from `siamese.model_def`).
      tx: the optimizer.
      layout: state shardings.
      seed: dropout seed; step k uses `fold_in(key(seed), k)`.
      debug_nan_at_step: TEST HOOK: poison the loss of this (1-based) step with NaN.
      counter: incremented once per trace.
    """
    base_key = jax.random.key(seed)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if counter is not None:
            counter.count += 1
        dropout_key = jax.random.fold_in(base_key, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["a_ids"], batch["a_mask"], batch["b_ids"], batch["b_mask"],
                           dropout_key=dropout_key)
            loss = weighted_cross_entropy(logits, batch["labels"], batch["weights"])
            if debug_nan_at_step is not None:
                loss = jnp.where(state.step + 1 == debug_nan_at_step, jnp.nan, loss)
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        w = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "accuracy": jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1e-9),
            "finite": finite,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = sharding.batch_sharding(layout.mesh)
    rep = sharding.replicated(layout.mesh)
    return jax.jit(train_step, in_shardings=(layout.shardings, batch_sh),
                   out_shardings=(layout.shardings, rep), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, layout: StateLayout,
                   counter: TraceCounter | None = None) -> Callable[[Any, Batch], dict]:
    """Builds the jitted eval step: `(params, batch) -> {"logits", "index"}`, replicated so every
    process can read all rows (no dropout)."""

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        if counter is not None:
            counter.count += 1
        model = nnx.merge(graphdef, params)
        logits = model(batch["a_ids"], batch["a_mask"], batch["b_ids"], batch["b_mask"])
        return {"logits": logits, "index": batch["index"]}

    rep = sharding.replicated(layout.mesh)
    return jax.jit(eval_step, in_shardings=(layout.shardings.params, sharding.batch_sharding(layout.mesh)),
                   out_shardings=rep)


def make_embed_step(graphdef: nnx.GraphDef, layout: StateLayout) -> Callable[[Any, jax.Array, jax.Array],
                                                                            jax.Array]:
    """Jitted `(params, ids, mask) -> pooled embeddings`, replicated (for STS dev evaluation)."""

    def embed(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).embed(ids, mask)

    bsh = sharding.batch_sharding(layout.mesh)
    return jax.jit(embed, in_shardings=(layout.shardings.params, bsh, bsh),
                   out_shardings=sharding.replicated(layout.mesh))
