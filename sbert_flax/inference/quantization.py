"""`quantize_embeddings`: float32 / int8 / uint8 / binary / ubinary, bit for bit what
`sentence_transformers.quantization.quantize_embeddings` returns (numpy, line for line)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from sbert_flax.common.arraylike import to_numpy

logger = logging.getLogger(__name__)

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")


def _quantization_ranges(embeddings: np.ndarray, precision: str,
                         calibration_embeddings: np.ndarray | None) -> np.ndarray:
    if calibration_embeddings is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(f"Cannot compute {precision} quantization ranges from a single "
                             "embedding; pass `ranges` or `calibration_embeddings` from a "
                             "representative set of embeddings")
        if embeddings.shape[0] < 100:
            logger.warning("Computing %s quantization buckets from only %d embeddings; pass "
                           "`ranges` or `calibration_embeddings` for stabler buckets",
                           precision, len(embeddings))
        calibration_embeddings = embeddings
    cal = to_numpy(calibration_embeddings)
    return np.vstack((np.min(cal, axis=0), np.max(cal, axis=0)))


def quantize_embeddings(embeddings: Any, precision: Precision, ranges: np.ndarray | None = None,
                        calibration_embeddings: np.ndarray | None = None
                        ) -> np.ndarray | list[np.ndarray]:
    """Quantizes float embeddings, with the results of sentence-transformers' function.

    Args:
      embeddings: float [n, D] (numpy, jax or torch), or a list of [tokens, D] matrices
        (multi-vector; quantized with shared ranges).
      precision: "float32"; "int8" / "uint8" (256 buckets per dimension between the ranges);
        "binary" (packed sign bits, offset by -128 into int8) / "ubinary" (packed, uint8).
      ranges: [2, D] per-dimension (min, max) for int8 / uint8.
      calibration_embeddings: embeddings to take the ranges from when `ranges` is None
        (default: `embeddings` themselves, which needs more than one row).

    Returns:
      The quantized array ([n, ceil(D / 8)] for the binary precisions), or a list of them.

    Raises:
      ValueError: an unknown precision, or int8/uint8 ranges from a single embedding.
      TypeError: integer input.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Precision {precision!r} is not supported; expected one of {PRECISIONS}")
    if isinstance(embeddings, list):
        if not embeddings:
            return []
        embeddings = [to_numpy(e) for e in embeddings]
        if isinstance(embeddings[0], np.ndarray) and embeddings[0].ndim == 2:
            # Calibrate once so every document uses the same buckets.
            if precision.endswith("int8") and ranges is None:
                data = (np.concatenate(embeddings, axis=0) if calibration_embeddings is None
                        else calibration_embeddings)
                if len(data):
                    ranges = _quantization_ranges(data, precision, calibration_embeddings)
            return [quantize_embeddings(m, precision=precision, ranges=ranges,
                                        calibration_embeddings=calibration_embeddings)
                    for m in embeddings]
        embeddings = np.array(embeddings)
    else:
        embeddings = to_numpy(embeddings)
    if embeddings.dtype in (np.uint8, np.int8):
        raise TypeError("Embeddings to quantize must be float rather than int8 or uint8.")

    if embeddings.ndim == 2 and embeddings.shape[0] == 0:
        dim = embeddings.shape[1]
        if precision.endswith("int8"):
            return np.zeros((0, dim), dtype=np.int8 if precision == "int8" else np.uint8)
        if precision.endswith("binary"):
            return np.zeros((0, (dim + 7) // 8), dtype=np.int8 if precision == "binary" else np.uint8)

    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("int8"):
        if ranges is None:
            ranges = _quantization_ranges(embeddings, precision, calibration_embeddings)
        ranges = to_numpy(ranges).astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value in bucket 0
        q = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    return np.packbits(embeddings > 0, axis=-1)  # ubinary

