"""Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) for packed rows.

Packed rows hold several sentences, each attending only to itself: a block-diagonal mask given by
segment ids ([B, L], 1..k per sentence, 0 padding). The XLA path materialises that [B, 1, L, L]
mask and the [B, H, L, L] logits; the splash kernel streams key blocks through VMEM with an online
softmax and compares segment ids per tile instead, so neither exists in HBM.

Our layout is [B, L, H, Dh]; the kernel works on one example ([H, L, Dh]), so it is vmapped over
B (as MaxText does), which Pallas turns into one more grid axis. Logits and softmax are float32
inside the kernel; the kernel applies no scale, so q is scaled by head_dim**-0.5 first (in
float32, then cast back: exact for head_dim 64, whose scale is a power of two).

Padding tokens (segment 0) attend to each other: every query then sees at least one key, so no
row of the softmax is empty and nothing is NaN. Real tokens never see padding (their ids differ),
so what padding computes reaches no sentence's output, as on the XLA path, where padding queries
see nothing at all.

Where the shapes allow (`supports`): the kernel tiles keys in blocks of 128 lanes (its
`block_kv_compute` must be a multiple of 128), so the row length must be a multiple of 128.
Shorter or odd lengths (the packer's 64-token rows) stay on the XLA path, where a 64x64 mask is
cheap anyway. Any head dim is taken as is: its blocks span the whole head dim, which Mosaic
accepts (compiled for v5e with head dims 8, 32 and 64; no padding needed).

Attention dropout is not something the kernel does: training with attention dropout keeps the
model's einsum path (see `model.SelfAttention`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

Array = jax.Array

# The kernel's key tile is a multiple of the TPU's 128 lanes; rows must split into such tiles.
LANES = 128
# Largest tile tried: 512x512 float32 logits are 1 MiB of VMEM, well inside every chip's.
_MAX_BLOCK = 512


def supports(seq_len: int) -> bool:
    """Whether packed rows of `seq_len` tokens run on the splash kernel (else the XLA path)."""
    return seq_len >= LANES and seq_len % LANES == 0


# Rows at least this long take the kernel by default on TPU. Compiled for v5e (BERT-base, bf16), it
# saves memory from 256 tokens (encode 16x256: 28 vs 32 MiB of temporaries; train step at 512:
# 6.0 vs 7.8 GiB a chip) but costs some at 128 (train step b64: 1.52 vs 1.12 GiB), and its
# backward recomputes the forward; "splash" asks for it at 128 too. No TPU timing yet.
DEFAULT_MIN_LENGTH = 256

# `attention_impl` values that ask for the kernel; "splash-interpret" runs it in Pallas's
# interpreter on any backend (tests, debugging: slow).
IMPLS = ("splash", "splash-interpret")


def use_splash(impl: str | None, seq_len: int, packed: bool) -> bool:
    """Whether attention of this call runs on the kernel.

    Asked for ("splash" / "splash-interpret"): packed rows whose length the kernel takes.
    Default (None): the same for rows of at least DEFAULT_MIN_LENGTH tokens, only when the
    context mesh (`jax.sharding.use_abstract_mesh`, set by
    the caller that knows the mesh) is a TPU one; anything else keeps the XLA path unchanged.
    """
    if not packed or not supports(seq_len):
        return False
    if impl in IMPLS:
        return True
    if impl is not None or seq_len < DEFAULT_MIN_LENGTH:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device is not None and device.platform == "tpu"


def block_size(seq_len: int) -> int:
    """The largest of 512, 256, 128 that divides `seq_len` (one tile size for every kernel)."""
    for b in (_MAX_BLOCK, 256, LANES):
        if seq_len % b == 0:
            return b
    raise ValueError(f"splash attention needs a row length that is a multiple of {LANES}, "
                     f"got {seq_len}")


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, seq_len: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for one example's [H, L, Dh]; cached because building it walks the mask."""
    b = block_size(seq_len)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                               block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                               block_kv_dq=b)
    # Non-causal: within its segment every token sees every other; segment ids do the rest.
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((seq_len, seq_len))] * heads)
    # Its mask tables are concrete arrays even when first built inside a trace, so the cached
    # kernel never holds a tracer of some earlier jit.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def _by_rows(fn, outputs: int):
    """`fn(*rows)` split over rows by `shard_map` on the context mesh, if one is declared.

    Mosaic kernels cannot be partitioned automatically: under a sharded jit XLA refuses them
    ("Mosaic kernels cannot be automatically partitioned. Please wrap the call in a shard_map").
    The model does not know the mesh, so the caller that does declares it while tracing
    (`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`; the abstract mesh only: under a concrete
    mesh of compile-only devices the kernel's small constant tables cannot be placed) and the
    kernel runs under `shard_map` over all the mesh's axes: attention is per row,
    so each device attends its own rows and nothing is gathered. Rows are padded to a multiple
    of the devices (segment 0 everywhere: padding attends to padding) and cut back after.
    (`custom_partitioning` would need no context, but XLA:TPU does not run its callbacks:
    "Custom emitter for CustomSPMDPartitioning not found", jax-ml/jax#38196.)
    """

    def run(*rows: Array):
        mesh = jax.sharding.get_abstract_mesh()
        devices = math.prod(mesh.axis_sizes) if not mesh.empty else 1
        if devices == 1:
            return fn(*rows)
        n = rows[0].shape[0]
        extra = -n % devices
        if extra:
            rows = tuple(jnp.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1)) for a in rows)
        spec = P(tuple(mesh.axis_names))
        out = jax.shard_map(fn, in_specs=(spec,) * len(rows),
                            out_specs=spec if outputs == 1 else (spec,) * outputs,
                            check_vma=False)(*rows)
        return jax.tree.map(lambda o: o[:n], out) if extra else out

    return run


def _rows_merged(fn):
    """`fn` under vmap: the mapped axis folds into the rows (the model runs under vmap over rows
    in training), so there is still one kernel call over all rows, split over the devices
    (vmapping a shard_map instead would leave the mapped axis whole on every device)."""

    @custom_batching.custom_vmap
    def call(*args):
        return fn(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        rows = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                for a, batched in zip(args, in_batched, strict=True)]
        n = rows[0].shape[1]
        out = call(*(a.reshape(axis_size * n, *a.shape[2:]) for a in rows))
        out = jax.tree.map(lambda o: o.reshape(axis_size, n, *o.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return call


@functools.lru_cache(maxsize=64)
def _attention(heads: int, seq_len: int, interpret: bool):
    """Differentiable splash attention over [B, L, H, Dh] rows (q scaled)."""
    kernel = _kernel(heads, seq_len, interpret)

    def local(q: Array, k: Array, v: Array, s: Array) -> Array:
        """The kernel on the rows one device holds, one example at a time."""
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [b, H, L, Dh]

        def one(qi: Array, ki: Array, vi: Array, si: Array) -> Array:
            return kernel(qi, ki, vi, segment_ids=splash.SegmentIds(q=si, kv=si))

        return jnp.swapaxes(jax.vmap(one)(q, k, v, s), 1, 2)

    def local_vjp(q: Array, k: Array, v: Array, s: Array, g: Array):
        """d(q, k, v) for the cotangent `g` (the kernel's own backward kernels)."""
        _, vjp = jax.vjp(lambda a, b, c: local(a, b, c, s), q, k, v)
        return vjp(g)

    fwd = _rows_merged(_by_rows(local, 1))
    bwd = _rows_merged(_by_rows(local_vjp, 3))

    # The kernel's own custom_vjp cannot reach through custom_vmap (which has a JVP rule but no
    # transpose), so the backward is a second op: it runs the forward again inside, one
    # more attention forward per step (small beside the layer's matmuls), and keeps only q, k, v.
    @jax.custom_vjp
    def attend(q: Array, k: Array, v: Array, s: Array) -> Array:
        return fwd(q, k, v, s)

    def attend_fwd(q, k, v, s):
        return fwd(q, k, v, s), (q, k, v, s)

    def attend_bwd(res, g):
        q, k, v, s = res
        return (*bwd(q, k, v, s, g), None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                     interpret: bool = False) -> Array:
    """Block-diagonal attention of packed rows on the splash kernel.

    Differentiable, vmappable, and split over the rows of the declared mesh (see `_by_rows`).

    Args:
      q, k, v: [B, L, H, Dh] in the compute dtype (unscaled q).
      segment_ids: [B, L] int, 1..k per packed sentence, 0 padding.
      interpret: run the kernel in Pallas's interpreter (any backend; for tests).

    Returns:
      [B, L, H, Dh] in q's dtype.

    Raises:
      ValueError: a row length the kernel does not take (check `supports` first).
    """
    seq_len, head_dim = q.shape[1], q.shape[3]
    if not supports(seq_len):
        raise ValueError(f"splash attention needs a row length that is a multiple of {LANES}, "
                         f"got {seq_len}")
    dtype = q.dtype
    q = (q.astype(jnp.float32) * (head_dim ** -0.5)).astype(dtype)
    return _attention(q.shape[2], seq_len, interpret)(q, k, v, segment_ids.astype(jnp.int32))
