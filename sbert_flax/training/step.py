"""The pure, jitted train and eval steps: one `jax.jit` each, explicit shardings, donated state.

`train_step(state, batch) -> (state, metrics)` runs any loss of `losses.py` (the step does not
know which). Dropout's key is `fold_in(key(seed), step)`, a function of the state, so a resumed
run draws exactly the masks an uninterrupted run would. The metrics stay on the device (the host
fetches them only when it logs or checks): "loss", "grad_norm", "finite" (loss, gradients and the
updated params are all finite; the loop stops on a False before anything is saved), plus the
loss's own (e.g. "accuracy").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sbert_flax.common import sharding
from sbert_flax.common.xla import compiler_options
from sbert_flax.training.losses import Loss
from sbert_flax.training.state import StateLayout, TrainState

Batch = dict[str, jax.Array]


class TraceCounter:
    """Counts traces (= compilations) of a jitted function; bumped inside the traced Python."""

    def __init__(self) -> None:
        self.count = 0


# XLA:TPU's options for `windowed_einsum=False` (libtpu's names; not options of other backends).
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def make_train_step(graphdef: nnx.GraphDef, loss: Loss, tx: optax.GradientTransformation,
                    layout: StateLayout, *, seed: int, prng_impl: str | None = None,
                    windowed_einsum: bool = True,
                    counter: TraceCounter | None = None) -> Callable[[TrainState, Batch], tuple]:
    """Builds the jitted train step.

    Args:
      graphdef: the model graph (from `loss.model_def(...)`).
      loss: the loss (`losses.make_loss`).
      tx: the optimizer.
      layout: state shardings.
      seed: dropout seed; step k uses `fold_in(key(seed), k)`.
      prng_impl: the dropout keys' implementation (`jax.random.key`'s `impl`): None is JAX's
        default (threefry, whose bits are the same under vmap as unbatched: what makes
        cached-mnrl equal mnrl); "unsafe_rbg" draws dropout masks with far fewer operations on
        GPU/TPU.
      windowed_einsum: False turns off XLA:TPU's windowed einsum (fsdp's weight all-gathers
        overlapped with the matmuls, which holds activations twice over: BERT-base width, 2
        layers, batch 1024 on v5e-8 with fsdp params: 2.7 vs 1.8 GB of temporaries a chip, as
        replicated). Only TPU programs have the option; elsewhere it changes nothing.
      counter: incremented once per trace.
    """
    base_key = jax.random.key(seed, impl=prng_impl)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if counter is not None:
            counter.count += 1
        dropout_key = jax.random.fold_in(base_key, state.step)
        # Traced under the mesh: the model's activations keep rows split over the batch axes
        # (sharding.constrain_rows) and, on TPU, packed rows take the splash kernel.
        with sharding.declared(layout.mesh):
            value, grads, extra = loss.value_and_grad(graphdef, state.params, batch, dropout_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        metrics = {**extra, "loss": value, "grad_norm": grad_norm, "finite": finite}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = sharding.batch_sharding(layout.mesh)
    rep = sharding.replicated(layout.mesh)
    # XLA's default CPU options here (not `xla.compiler_options`): with YNNPACK off the backward
    # pass got slower (m3e-small mnrl step, batch 64 x 64 tokens: 9.5 s vs 8.2 s), the forward
    # faster.
    tpu = layout.mesh.devices.flat[0].platform == "tpu"
    return jax.jit(train_step, in_shardings=(layout.shardings, batch_sh),
                   out_shardings=(layout.shardings, rep), donate_argnums=(0,),
                   compiler_options=None if windowed_einsum or not tpu else NO_WINDOWED_EINSUM)


def make_eval_step(graphdef: nnx.GraphDef, layout: StateLayout,
                   counter: TraceCounter | None = None) -> Callable[[Any, Batch], dict]:
    """Builds the jitted eval step of the softmax classifier: `(params, batch) -> {"logits",
    "index"}`, replicated so every process can read all rows (no dropout). The batch has the
    softmax loss's columns (`text_a_ids`, `text_a_mask`, `text_b_ids`, `text_b_mask`) and "index"."""

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        if counter is not None:
            counter.count += 1
        model = nnx.merge(graphdef, params)
        with sharding.declared(layout.mesh):  # as the train step: rows stay split
            logits = model(batch["text_a_ids"], batch["text_a_mask"], batch["text_b_ids"],
                           batch["text_b_mask"])
        return {"logits": logits, "index": batch["index"]}

    rep = sharding.replicated(layout.mesh)
    return jax.jit(eval_step, in_shardings=(layout.shardings.params, sharding.batch_sharding(layout.mesh)),
                   out_shardings=rep, compiler_options=compiler_options(layout.mesh.devices.flat))
