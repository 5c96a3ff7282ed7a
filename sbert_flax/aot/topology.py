"""Compile-only TPU devices for a topology, on a host that has no TPU.

libtpu (the `tpu` extra) describes any TPU slice by name: `get_topology_desc("v5e:2x4",
platform="tpu")` returns devices that XLA compiles for exactly as on the real slice, but that
cannot run anything. The process's own backend stays what it was (CPU here): nothing is
initialised globally, so this works after JAX already started with CPU devices.

Names are libtpu's `<generation>:<chips per dimension>`: "v5e:2x4" (a v5e-8: 8 chips),
"v5e:4x4" (v5e-16), "v5p:2x2x1" (a v5p-8: 4 chips of 2 TensorCores), "v4:2x2x1" (v4-8: 4
chips), "v6e:2x2". v4 and v5p chips are compiled as one megacore device per chip (as they run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

GiB = 1024**3

# HBM per chip by the device kind libtpu reports. The device description of a compile-only
# device exposes no memory size (memory_stats() needs an attached device), hence a table.
HBM_BYTES: dict[str, int] = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}
# Generations whose two TensorCores form one device (megacore), as a real slice runs them.
_MEGACORE = ("v4", "v5p", "v5")
_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice to compile for.

    Attributes:
      name: libtpu's topology name, e.g. "v5e:2x4".
      devices: compile-only devices, one per chip.
      device_kind: e.g. "TPU v5 lite".
      hbm_bytes_per_chip: from `HBM_BYTES` or `hbm_bytes` given by the caller.
    """

    name: str
    devices: tuple[jax.Device, ...]
    device_kind: str
    hbm_bytes_per_chip: int

    @property
    def chips(self) -> int:
        return len(self.devices)


def require_libtpu() -> None:
    """Raises ImportError (with the install command) when libtpu is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        raise ImportError('compiling for a TPU topology needs libtpu: pip install "sbert-flax[tpu]" '
                          '(or pip install -e ".[tpu]" in a checkout)')


def compile_only_topology(name: str, hbm_bytes: int | None = None) -> Topology:
    """The compile-only devices of the TPU slice `name` (see the module docstring).

    Args:
      name: libtpu topology name, "<generation>:<AxB[xC]>".
      hbm_bytes: HBM per chip; None takes it from `HBM_BYTES` by device kind.

    Raises:
      ValueError: a malformed or unknown name, or a chip whose HBM is not known (pass hbm_bytes).
      ImportError: libtpu is not installed.
    """
    m = _NAME.match(name.strip())
    if not m:
        raise ValueError(f"topology {name!r}: expected <generation>:<chips per dimension>, e.g. "
                         "v5e:2x4 (v5e-8), v5e:4x4 (v5e-16), v5p:2x2x1 (v5p-8), v4:2x2x1 (v4-8)")
    require_libtpu()
    # libtpu takes /tmp/libtpu_lockfile for the life of the process unless told that several
    # processes may load it: a second `sbert-flax compile` (or a test beside a benchmark) would
    # fail with "ABORTED: ... libtpu multi-process lockfile". Compile-only devices never touch a
    # chip, so sharing is safe; read once, when libtpu loads (a value already set wins).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if m.group(1) in _MEGACORE else {}
    try:
        desc = topologies.get_topology_desc(topology_name=name.strip(), platform="tpu", **kwargs)
    except Exception as e:  # libtpu's own words on a name it does not know
        raise ValueError(f"topology {name!r}: libtpu refused it ({e})") from None
    devices = tuple(desc.devices)
    kind = devices[0].device_kind
    hbm = hbm_bytes if hbm_bytes is not None else HBM_BYTES.get(kind)
    if hbm is None:
        raise ValueError(f"topology {name!r}: HBM per chip of {kind!r} is not known; pass it "
                         f"(--hbm-gib); known: {', '.join(sorted(HBM_BYTES))}")
    return Topology(name.strip(), devices, kind, int(hbm))
