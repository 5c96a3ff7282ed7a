"""Embedding a batch's text columns for the embedding losses: in one pass, or GradCache-style.

Dropout is keyed per row: row `r` of text column `c` draws its masks from
`fold_in(fold_in(step_key, c), r)`. The masks of a sentence then do not depend on how the batch is
cut (mini-batches, devices, padding rows after it), so `cached-mnrl` reproduces `mnrl` exactly,
dropout included, for any `mini_batch_size`. The embedder runs under `vmap` over rows: its
matmuls still see every row at once (a vmapped `x @ W` is one GEMM). This needs threefry keys
(JAX's default), which draw the same bits under vmap as unbatched; with `jax_default_prng_impl`
"rbg" the masks depend on the batch layout and cached-mnrl is then only statistically mnrl.

Packed batches (`packing.TrainPacking`: the texts of all columns share rows, block-diagonal
attention) take the same two routes, `packed_value_and_grad` and `packed_cached_value_and_grad`.
Their dropout is keyed per packed row (`fold_in(fold_in(step_key, 0), row)`): a text's masks then
depend on the packing, which the host fixes for the batch (with the mini-batches as its groups),
so the same batch gives the same masks on any mesh and with or without GradCache.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"), as sentence-transformers' `CachedMultipleNegativesRankingLoss` does it:
  1. embed every mini-batch without gradients (`lax.map`: only the [m, D] outputs are kept);
  2. the loss and its gradient w.r.t. the embeddings, on the whole global batch;
  3. re-embed each mini-batch with gradients (same keys, so the same embeddings) and accumulate
     `vjp(d loss / d embeddings)` into the parameter gradient (`lax.scan`: one mini-batch's
     activations live at a time, so memory is flat in the global batch size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sbert_flax.common import sharding
from sbert_flax.inference.packing import Packer

Array = jax.Array
# embeddings [C, B, D] -> (loss, metrics)
Objective = Callable[[Array], tuple[Array, dict[str, Array]]]


def column_arrays(batch: dict[str, Array], columns: tuple[str, ...]) -> list[tuple[Array, Array]]:
    """(ids, mask) [B, L_c] of each text column. Each column keeps its own padded length L_c: a
    batch's positives are usually much shorter than its anchors, and padding them to the anchors'
    length would spend a third more tokens on nothing."""
    return [(batch[f"{c}_ids"], batch[f"{c}_mask"]) for c in columns]


def row_keys(key: Array, columns: int, rows: int) -> Array:
    """Dropout keys [C, B]: `fold_in(fold_in(key, c), r)`."""
    return jax.vmap(lambda c: jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, c), r))(
        jnp.arange(rows)))(jnp.arange(columns))


def embed_rows(graphdef: nnx.GraphDef, params: Any, ids: Array, mask: Array,
               keys: Array | None) -> Array:
    """Sentence embeddings [..., D] float32 of ids/mask [..., L]; one dropout key per row
    (`keys` [...]), or no dropout when `keys` is None."""
    embedder = nnx.merge(graphdef, params).embedder
    lead, length = ids.shape[:-1], ids.shape[-1]
    if keys is None:
        out = embedder(ids.reshape(-1, length), mask.reshape(-1, length))
        return out.reshape(*lead, out.shape[-1])

    def one(i: Array, m: Array, k: Array) -> Array:
        return embedder(i[None], m[None], dropout_key=k)[0]

    fn = jax.vmap(one, spmd_axis_name=sharding.rows_axis_name())  # the rows (the last lead dim)
    for _ in lead[1:]:
        fn = jax.vmap(fn)
    return fn(ids, mask, keys)


def value_and_grad(objective: Objective, graphdef: nnx.GraphDef, params: Any,
                   columns: list[tuple[Array, Array]], keys: Array | None
                   ) -> tuple[Array, Any, dict[str, Array]]:
    """One pass: embed every column (ids, mask [B, L_c]) with gradients, `(loss, grads, metrics)`.

    `keys` [C, B] are the rows' dropout keys (None: no dropout)."""

    def loss_fn(p):
        embs = [embed_rows(graphdef, p, i, m, None if keys is None else keys[c])
                for c, (i, m) in enumerate(columns)]
        return objective(jnp.stack(embs))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, metrics


def _chunk(x: Array, mini: int) -> Array:
    """[B, ...] -> [n, m, ...]: mini-batch k holds rows {i * n + k}.

    With the rows split in contiguous blocks over devices, this keeps each mini-batch split over
    all devices (when m is a multiple of the device count) and moves no data: a reshape and a
    transpose of unsharded axes.
    """
    n = x.shape[0] // mini
    return jnp.swapaxes(x.reshape(mini, n, *x.shape[1:]), 0, 1)


def _unchunk(y: Array) -> Array:
    """Inverse of `_chunk`: [n, m, ...] -> [B, ...]."""
    n, mini = y.shape[:2]
    return jnp.swapaxes(y, 0, 1).reshape(mini * n, *y.shape[2:])


# One mini-batch's embeddings [m, C_part, D] from (params, that mini-batch's inputs).
PartEmbed = Callable[[Any, Any], Array]


def _grad_cache(objective: Objective, params: Any, parts: list[tuple[PartEmbed, Any]],
                mini_batch_size: int) -> tuple[Array, Any, dict[str, Array]]:
    """GradCache's three passes over `parts`: each is (embed, its inputs chunked [n, ...] by
    `_chunk`) and gives some of the text columns; their columns, in order, are the objective's."""
    frozen = jax.lax.stop_gradient(params)
    # [C, B, D]; lax.map keeps no residuals, only each mini-batch's [m, C_part, D] output.
    outs = [jnp.swapaxes(_unchunk(jax.lax.map(functools.partial(embed, frozen), xs)), 0, 1)
            for embed, xs in parts]
    (loss, metrics), g_emb = jax.value_and_grad(objective, has_aux=True)(jnp.concatenate(outs))
    grads = jax.tree.map(jnp.zeros_like, params)
    first = 0
    for (embed, xs), out in zip(parts, outs, strict=True):
        g = _chunk(jnp.swapaxes(g_emb[first: first + out.shape[0]], 0, 1), mini_batch_size)
        first += out.shape[0]

        def accumulate(acc, step, embed=embed):
            inputs, g_mini = step
            _, vjp = jax.vjp(lambda p: embed(p, inputs), params)
            (grad,) = vjp(g_mini)
            return jax.tree.map(jnp.add, acc, grad), None

        grads, _ = jax.lax.scan(accumulate, grads, (xs, g))
    return loss, grads, metrics


def _check_mini_batch(rows: int, mini_batch_size: int) -> None:
    if rows % mini_batch_size:
        raise ValueError(f"mini_batch_size={mini_batch_size} must divide the global batch size "
                         f"({rows} rows)")


def cached_value_and_grad(objective: Objective, graphdef: nnx.GraphDef, params: Any,
                          columns: list[tuple[Array, Array]], keys: Array | None, mini_batch_size: int
                          ) -> tuple[Array, Any, dict[str, Array]]:
    """GradCache: the loss and gradient of `value_and_grad`, embedding `mini_batch_size` sentences
    at a time (one column after the other: each keeps its own padded length).

    Raises:
      ValueError: the batch's rows are not a multiple of `mini_batch_size`.
    """
    _check_mini_batch(columns[0][0].shape[0], mini_batch_size)

    def embed(p, xs):  # one column's mini-batch: [m, 1, D]
        return embed_rows(graphdef, p, *xs)[:, None]

    parts = [(embed, (_chunk(i, mini_batch_size), _chunk(m, mini_batch_size),
                      None if keys is None else _chunk(keys[c], mini_batch_size)))
             for c, (i, m) in enumerate(columns)]
    return _grad_cache(objective, params, parts, mini_batch_size)


# ---- packed batches ----------------------------------------------------------------------------

def packed_arrays(batch: dict[str, Array], columns: tuple[str, ...]
                  ) -> tuple[Array, Array, Array, Array, Array]:
    """(ids, segments, positions [R, L], row [C, B], slot [C, B]) of a packed batch."""
    return (batch["packed_ids"], batch["packed_segments"], batch["packed_positions"],
            jnp.stack([batch[f"{c}_row"] for c in columns]),
            jnp.stack([batch[f"{c}_slot"] for c in columns]))


def embed_packed_rows(graphdef: nnx.GraphDef, params: Any, ids: Array, segments: Array,
                      positions: Array, keys: Array | None) -> Array:
    """Pooled float32 [R, slots, D] of packed rows [R, L]; one dropout key per row (`keys` [R]),
    or no dropout when `keys` is None."""
    embedder = nnx.merge(graphdef, params).embedder
    slots = Packer.slots(ids.shape[-1])
    if keys is None:
        return embedder.embed_packed(ids, segments, positions, slots)

    def one(i: Array, s: Array, p: Array, k: Array) -> Array:
        return embedder.embed_packed(i[None], s[None], p[None], slots, dropout_key=k)[0]

    return jax.vmap(one, spmd_axis_name=sharding.rows_axis_name())(ids, segments, positions, keys)


def packed_value_and_grad(objective: Objective, graphdef: nnx.GraphDef, params: Any,
                          packed: tuple[Array, ...], keys: Array | None
                          ) -> tuple[Array, Any, dict[str, Array]]:
    """`value_and_grad` of a packed batch (`packed_arrays`); `keys` [R] per packed row."""
    ids, segments, positions, row, slot = packed

    def loss_fn(p):
        return objective(embed_packed_rows(graphdef, p, ids, segments, positions, keys)[row, slot])

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, metrics


def packed_cached_value_and_grad(objective: Objective, graphdef: nnx.GraphDef, params: Any,
                                 packed: tuple[Array, ...], keys: Array | None,
                                 mini_batch_size: int) -> tuple[Array, Any, dict[str, Array]]:
    """GradCache over a batch packed in `B / mini_batch_size` groups: mini-batch k embeds group
    k's rows (global rows r * groups + k, which `_chunk` hands it) and gathers its texts.

    Raises:
      ValueError: `mini_batch_size` does not divide the batch, or the packed rows do not split
        into the groups.
    """
    ids, segments, positions, row, slot = packed
    texts, rows = row.shape[1], ids.shape[0]
    _check_mini_batch(texts, mini_batch_size)
    groups = texts // mini_batch_size
    if rows % groups:
        raise ValueError(f"{rows} packed rows do not split into {groups} mini-batch groups: pack the "
                         f"batch with groups={groups}")
    per_group = rows // groups

    def embed(p, xs):  # one mini-batch of texts, all columns: [m, C, D]
        i, s, pos, k, r, sl = xs
        return embed_packed_rows(graphdef, p, i, s, pos, k)[r, sl]

    chunked = (_chunk(ids, per_group), _chunk(segments, per_group), _chunk(positions, per_group),
               None if keys is None else _chunk(keys, per_group),
               _chunk(row.T // groups, mini_batch_size), _chunk(slot.T, mini_batch_size))
    return _grad_cache(objective, params, [(embed, chunked)], mini_batch_size)
