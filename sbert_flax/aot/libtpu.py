"""libtpu on a host without a TPU: JAX's backend start, with libtpu's noise held back.

With libtpu installed (the `tpu` extra, which the `test` extra includes), a process that does not
set `JAX_PLATFORMS` probes for a TPU when JAX first looks for devices. On a host without one
libtpu logs a screenful to stderr ("could not determine TPU accelerator type", an INVALID_ARGUMENT
about worker hostnames) and JAX carries on with the GPU or CPU; no environment variable silences
it. The CLI starts the backends inside `start_quiet` (library code never does: starting backends
is process-wide and belongs to the program).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator


def installed() -> bool:
    """Whether the libtpu package is importable (JAX will probe for a TPU with it)."""
    return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def start_quiet() -> Iterator[None]:
    """Holds back what is written to stderr (fd 2) inside, unless it fails.

    If the body raises, the held-back text is written out after all, so nothing that explains a
    failure is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", "replace"))


def start_backends() -> None:
    """Starts JAX's backends now, quietly, when libtpu would probe for a TPU (`JAX_PLATFORMS`
    unset); otherwise does nothing (they start when first used)."""
    if os.environ.get("JAX_PLATFORMS") or not installed():
        return
    import jax

    with start_quiet():
        jax.devices()
