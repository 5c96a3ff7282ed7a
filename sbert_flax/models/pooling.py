"""Pooling token states into sentence vectors: pure functions, jit-friendly, float32 out.

These reproduce sentence-transformers' `Pooling` and `Normalize` modules bit for bit in float32:
mean pooling clamps the token count at 1e-9, max pooling fills padding with -1e9, and
normalisation divides by max(||x||, 1e-12) like `torch.nn.functional.normalize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cls_pool(hidden: Array, mask: Array) -> Array:
    """First token ([CLS]); UER-py's "first" pooling."""
    del mask
    return hidden[:, 0].astype(jnp.float32)


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Mask-aware mean; the count is clamped so an all-padding row gives 0, not NaN."""
    m = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    count = jnp.clip(jnp.sum(m, axis=1), 1e-9, None)
    return summed / count


def max_pool(hidden: Array, mask: Array) -> Array:
    """Mask-aware max over tokens (padding set to -1e9 as sentence-transformers does)."""
    h = hidden.astype(jnp.float32)
    return jnp.max(jnp.where(mask[..., None] > 0, h, -1e9), axis=1)


POOLERS = {"cls": cls_pool, "mean": mean_pool, "max": max_pool}


def pool(hidden: Array, mask: Array, mode: str) -> Array:
    """Dispatches on `mode` ("cls" | "mean" | "max"); `mode` is static under jit."""
    try:
        return POOLERS[mode](hidden, mask)
    except KeyError:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {tuple(POOLERS)}") from None


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps), as torch's F.normalize, with a finite gradient at x = 0.

    `x / max(sqrt(sum x^2), eps)` has a NaN gradient at 0 (sqrt'(0) = inf, times 0), and a padding
    row whose mask is all zero pools to exactly 0; clamping the squared norm before the root keeps
    the value and makes that gradient 0.
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cosine_similarity(a: Array, b: Array) -> Array:
    """[n, d] x [m, d] -> [n, m] cosine matrix."""
    return l2_normalize(a) @ l2_normalize(b).T
