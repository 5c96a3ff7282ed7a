"""The activations `CrossEncoder.predict` applies to logits on the host, as sentence-transformers'.

sentence-transformers applies a torch module (saved by its class path: Sigmoid for one label,
Identity otherwise) to the float32 logits, then optionally a softmax over the labels; these are
the same functions in numpy float32, so the scores match its to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sbert_flax.checkpoints.cross_encoder_folder import activation_from_path


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) -> inf for x < -88 gives exactly 0, as torch
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": _sigmoid,
    "identity": lambda x: x,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, np.float32(0)),
}


def resolve_activation(spec: Any) -> tuple[str | None, Callable[[np.ndarray], np.ndarray]]:
    """(name or None, host function) for an `activation_fn` argument.

    Accepts a name of `ACTIVATIONS`, a torch class path as sentence-transformers saves it, a
    `torch.nn` module (Sigmoid, Identity, Tanh, ReLU are reproduced in numpy; any other runs
    through torch), or any callable on a float32 numpy array (saved as no activation).
    """
    if isinstance(spec, str):
        name = spec.lower() if spec.lower() in ACTIVATIONS else activation_from_path(
            spec, "activation_fn")
        return name, ACTIVATIONS[name]
    if not callable(spec):
        raise TypeError(f"activation_fn={spec!r} is neither a name, a torch class path nor callable")
    cls = type(spec)
    if cls.__module__.startswith("torch.nn") and cls.__name__.lower() in ACTIVATIONS:
        return cls.__name__.lower(), ACTIVATIONS[cls.__name__.lower()]
    if cls.__module__.startswith("torch."):
        import torch

        def through_torch(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return spec(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()

        return None, through_torch
    return None, lambda x: np.asarray(spec(x), np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 1, shifted by the row max as torch's is."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
