"""XLA:CPU settings that make the encoder fast on CPU hosts, applied only by entry points.

Library modules never touch XLA_FLAGS (it must be set before JAX initialises its backend, and
it is the user's to control); the CLI and the benchmarks call `apply_cpu_performance_flags()`
first thing. Flags the user already set win.
"""

from __future__ import annotations

import os

# Measured on a 2-core x86 CPU with bench/encode.py; see README "Performance".
CPU_FLAGS: tuple[str, ...] = ()


def apply_cpu_performance_flags() -> str:
    """Adds `CPU_FLAGS` to XLA_FLAGS (keeping any flag the user set). Returns the result."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in CPU_FLAGS if f.split("=")[0] not in names]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")
