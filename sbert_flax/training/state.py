"""The train state pytree and its creation on the mesh (MaxText style).

State shardings come from `jax.eval_shape` plus the logical-axis rules; the state is then built
under `jax.jit(init, out_shardings=...)`, so no device ever holds more than its shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sbert_flax.common import sharding
from sbert_flax.training.siamese import ModelDef


@flax.struct.dataclass
class TrainState:
    """Everything the train step changes: a plain pytree (jit and orbax handle it as is).

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: float32 master weights, `{"embedder": {"backbone": ...}}` plus the softmax loss's
        `"classifier"` (see `losses.py`).
      opt_state: the optax state (float32 moments).
    """

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where every leaf of the state lives, and its abstract shapes (for restore targets)."""

    mesh: Mesh
    shardings: TrainState  # of NamedSharding
    abstract: TrainState  # of ShapeDtypeStruct, with .sharding set


def state_layout(mdef: ModelDef, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding.Rules) -> StateLayout:
    """Shardings of the state from the rules table, without allocating anything."""
    p_sh = sharding.param_shardings(mdef.logical_specs, mdef.abstract_params, rules, mesh)
    abstract = jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        mdef.abstract_params)
    shardings = TrainState(
        step=sharding.replicated(mesh),
        params=p_sh,
        opt_state=sharding.tree_shardings_like(abstract.opt_state, mdef.abstract_params, p_sh, mesh),
    )
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return StateLayout(mesh, shardings, abstract)


def put_params(host_params: Any, shardings: Any) -> Any:
    """Host numpy params -> global arrays; every process holds the full host copy and keeps
    only its shards (works across processes, unlike a device_put of a non-addressable sharding)."""
    def put(x, s):
        x = np.asarray(x, np.float32)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, host_params, shardings)


def create_train_state(host_params: Any, tx: optax.GradientTransformation,
                       layout: StateLayout) -> TrainState:
    """The initial state (step 0, fresh optimizer moments) on the mesh."""
    params = put_params(host_params, layout.shardings.params)
    init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                   in_shardings=(layout.shardings.params,), out_shardings=layout.shardings)
    return init(params)
