"""One device mesh ("data", "fsdp"), logical-axis rules, and batch placement (MaxText style).

Parameters carry logical axis names (`("embed", "mlp")`, see `model.py`); a rules table maps each
logical name to a mesh axis. Two tables:

- `REPLICATED_RULES`: every parameter on every device (pure data parallelism).
- `FSDP_RULES`: the big matrices split over the "fsdp" axis (ZeRO-3 style); XLA all-gathers them
  for the forward pass and reduce-scatters the gradients.

The batch is always split over both axes together, so with (data=4, fsdp=2) each of the 8
devices gets 1/8 of the rows. A dimension is sharded only if the mesh axis size divides it
(e.g. an intermediate size of 37 stays whole); the first dimension claiming an axis gets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # rows are split over every device

Rules = tuple[tuple[str, str | None], ...]

REPLICATED_RULES: Rules = ()
# Logical name -> mesh axis, tried in order per dimension. "vocab" first so the word embedding
# [vocab, embed] splits its long axis; every other matrix splits its "embed" (or "mlp") axis.
FSDP_RULES: Rules = (
    ("vocab", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", None),
    ("kv", None),
    ("norm", None),
)
PARAM_SHARDINGS = {"replicated": REPLICATED_RULES, "fsdp": FSDP_RULES}


def rules_for(param_sharding: str) -> Rules:
    """The rules table for `--param-sharding replicated|fsdp`."""
    try:
        return PARAM_SHARDINGS[param_sharding]
    except KeyError:
        raise ValueError(f"param sharding {param_sharding!r}; expected one of "
                         f"{tuple(PARAM_SHARDINGS)}") from None


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

    Args:
      data: size of the data axis; -1 means all devices not used by `fsdp`.
      fsdp: size of the fsdp axis.
      devices: the devices, default `jax.devices()`.

    Raises:
      ValueError: the sizes do not multiply to the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices")
    # jax.devices() lists each process's devices together, so every process owns a contiguous
    # block of batch rows -- what `put_batch` (make_array_from_process_local_data) expects.
    return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def logical_to_mesh_spec(names: Sequence[str | None] | None, shape: Sequence[int], rules: Rules,
                         mesh: Mesh) -> P:
    """Maps one parameter's logical axis names to a mesh PartitionSpec.

    A dimension takes the first rule for its name whose mesh axis is unused by earlier dimensions
    and divides the dimension's size; otherwise it is replicated.
    """
    if not names:
        return P()
    table: dict[str, list[str | None]] = {}
    for logical, axis in rules:
        table.setdefault(logical, []).append(axis)
    used: set[str] = set()
    out: list[str | None] = []
    for name, size in zip(names, shape, strict=True):
        chosen = None
        for axis in table.get(name, []) if name is not None else []:
            if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
                continue
            chosen = axis
            break
        if chosen is not None:
            used.add(chosen)
        out.append(chosen)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def param_shardings(logical_specs: Any, abstract_params: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for a param tree, from its logical PartitionSpecs and abstract shapes.

    Args:
      logical_specs: tree of PartitionSpecs of logical names (`nnx.get_partition_spec`), with the
        same structure as `abstract_params` (pure dicts).
      abstract_params: tree of arrays / ShapeDtypeStructs.
      rules: the rules table.
      mesh: the mesh.
    """
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), x.shape, rules, mesh)),
        logical_specs, abstract_params, is_leaf=_is_spec)


def tree_shardings_like(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds copies of the param tree (optimizer moments).

    A leaf whose key path ends with a parameter's full key path and has that parameter's shape
    gets the parameter's sharding; anything else (counts, scalars) is replicated.
    """
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings),
                            strict=True):
        by_path[jax.tree_util.keystr(path)] = (tuple(p.shape), s)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        for suffix_len in range(len(path)):
            hit = by_path.get(jax.tree_util.keystr(path[suffix_len:]))
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


# ---- activations -------------------------------------------------------------------------------
# Parameters say how they are split; activations do not, and left to itself XLA:TPU's partitioner
# may follow the parameters' fsdp split into the activations and gather the batch instead: a
# 2-layer BERT-base-width model, mnrl at global batch 1024 on v5e-16, kept every chip's
# [2048, 128, 3072] MLP activations, 15.9 GB of temporaries a chip where replicated params need
# 0.9 GB (BERT-base itself was refused). So, while the caller that knows the
# mesh declares it (`declared`), the model pins its activations to rows split over the batch axes
# and every other dimension whole (`constrain_rows`), and the row-wise vmaps of the train step name
# the batch axes (`rows_axis_name`). Without a declared mesh both are no-ops (the model itself
# never knows the mesh).

def declared(mesh: Mesh):
    """Context for tracing under `mesh`: activation constraints, and the splash kernel's
    `shard_map` on TPU (`sbert_flax.models.splash_attention`). The abstract mesh only: under a concrete mesh of
    compile-only devices the kernel's constant tables cannot be placed."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _batch_devices() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def rows_axis_name() -> tuple[str, ...] | None:
    """`spmd_axis_name` for a `jax.vmap` over batch rows: the batch axes under a declared mesh of
    several devices, else None."""
    return BATCH_AXES if _batch_devices() > 1 else None


def constrain_rows(x: jax.Array) -> jax.Array:
    """`x` [rows, ...] split by rows over the batch axes, every other dimension whole, under the
    declared mesh (unchanged without one). Rows that do not split evenly are left to XLA; a single
    row (the model under the train step's vmap over rows, whose `rows_axis_name` splits them) is
    whole."""
    n = _batch_devices()
    if n == 1:
        return x
    rows = x.shape[0]
    first = None if rows == 1 else (BATCH_AXES if rows % n == 0 else P.UNCONSTRAINED)
    mesh = jax.sharding.get_abstract_mesh()
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(first, *([None] * (x.ndim - 1)))))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over every device (both mesh axes), other dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(local: dict[str, np.ndarray], mesh: Mesh, process_count: int | None = None
              ) -> dict[str, jax.Array]:
    """Assembles global batch arrays from this process's contiguous slice of rows.

    Each process passes only its rows (what the training pipeline builds for its
    `PipelineConfig.process_index`); the global array has `rows * process_count` rows. With one process this is a plain sharded device_put.
    """
    sharding = batch_sharding(mesh)
    n = jax.process_count() if process_count is None else process_count
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * n, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def host_tree(tree: Any, mesh: Mesh) -> Any:
    """A (possibly cross-process sharded) tree gathered to host numpy arrays on every process."""
    rep = replicated(mesh)
    gathered = jax.jit(lambda t: t, out_shardings=jax.tree.map(lambda _: rep, tree))(tree)
    return jax.tree.map(np.asarray, gathered)
