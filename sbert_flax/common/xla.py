"""XLA:CPU compile options for our jitted functions: per function, never process-wide.

jax 0.10's XLA:CPU hands every dot (and the elementwise work fused around it) to YNNPACK. For
BERT's f32 GEMMs on x86 that path is the slow one: in one process, alternating, on the 2-core
AVX-512 dev host (`python bench/encode.py`, README "Performance"):

  GEMM 4096x768x3072     YNNPACK 116 GFLOP/s   XLA's own dot path 189   PyTorch (oneDNN) 203
  BERT-base forward, one packed batch of 64x64 tokens: 4.8 s -> 4.0 s (PyTorch 3.8 s)

so our forward-only functions (encode, evaluation, search) compile with YNNPACK fusion off when
every device they run on is a CPU. The train step keeps XLA's defaults: its backward pass was
slower with YNNPACK off (see `training/step.py`). The options go to `jax.jit(..., compiler_options=...)`, which touches no global JAX state (unlike
XLA_FLAGS, which must be set before JAX starts and belongs to the user). A flag the user sets in
XLA_FLAGS wins: its option is left out here. If a later jaxlib drops an option, it is left out too
(checked once by compiling a tiny function), so an upgrade costs speed, never a crash.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _supported_cpu_options() -> tuple[tuple[str, Any], ...]:
    user = {f.split("=")[0].lstrip("-") for f in os.environ.get("XLA_FLAGS", "").split()}
    probe = jax.device_put(np.float32(1), jax.devices("cpu")[0])  # compiled for the CPU backend
    out = []
    for name, value in CPU_COMPILER_OPTIONS.items():
        if name in user:
            continue
        try:
            jax.jit(lambda x: x + 1).lower(probe).compile(compiler_options={name: value})
        except Exception:  # the option is gone in this jaxlib: keep its default
            continue
        out.append((name, value))
    return tuple(out)


def compiler_options(devices: Iterable[jax.Device]) -> dict[str, Any] | None:
    """Compile options for a function that runs on `devices` (None: XLA's defaults)."""
    devices = list(devices)
    if not devices or any(d.platform != "cpu" for d in devices):
        return None
    return dict(_supported_cpu_options()) or None
