"""Host arrays: array-likes in (numpy, jax, torch on any device) -> numpy, and the row-wise L2
normalisation every host-side embedding goes through."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """numpy / jax / torch (any device, bf16 included) -> a numpy array, without copying numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; torch is not imported here
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_matrix(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D [n, dim], got shape {a.shape}")
    # Sub-float32 inputs are upcast, as sentence-transformers does: bf16 matmul outputs would
    # round nearby scores into spurious ties.
    return a if a.dtype == np.float32 else a.astype(np.float32)


def l2_normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by max(norm, eps) in float32: torch.nn.functional.normalize, which
    sentence-transformers' Normalize and `normalize_embeddings` use. (On device, in jitted code,
    `pooling.l2_normalize` is the gradient-safe form of the same.)"""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32, copy=False)
