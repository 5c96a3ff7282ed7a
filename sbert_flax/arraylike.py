"""Array-likes in (numpy, jax, torch on any device) -> numpy, for the corpus utilities."""

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
