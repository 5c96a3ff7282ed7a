"""The jitted encode programs, shared process-wide by what determines them.

Two `SentenceEncoder`s of one architecture (a model loaded twice, a server beside an evaluator, a
trainer's exported best model) run the same XLA programs. Keyed by what fixes the program -- the
embedder's graph definition (architecture, pooling, compute dtype, attention implementation), the
output kind and the devices -- they share one `jax.jit`, so each packed shape is traced and compiled
once per process, not once per encoder. Params are arguments, never closed-over constants, so the
weights are not part of the key: two checkpoints of one architecture share programs too.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.common import sharding
from sbert_flax.common.xla import compiler_options
from sbert_flax.inference.packing import Packer

# Programs kept; past it the least recently used is dropped (its executables with it), so a
# process that loads many architectures in turn does not grow without bound.
MAX_PROGRAMS = 32


@dataclasses.dataclass(eq=False)
class EncodeProgram:
    """One jitted forward over packed batches; `traces` counts its compiled shapes."""

    fn: Callable
    mesh: Mesh
    traces: int = 0  # bumped at trace time: once per compiled shape, never per call


_PROGRAMS: collections.OrderedDict[tuple, EncodeProgram] = collections.OrderedDict()
_LOCK = threading.Lock()


def encode_program(graphdef: nnx.GraphDef, output: str, devices: Sequence[jax.Device]
                   ) -> EncodeProgram:
    """The shared program for `graphdef` (a `SentenceEmbedder`'s), `output` and `devices`.

    `output` is "sentence" (pooled embeddings at each packed slot, [rows, slots, D]) or "token"
    (per-token hidden states, [rows, length, D]). Inputs are data-parallel over `devices`, params
    replicated.
    """
    key = (graphdef, output, tuple(devices))
    with _LOCK:
        program = _PROGRAMS.get(key)
        if program is not None:
            _PROGRAMS.move_to_end(key)
            return program
        mesh = Mesh(np.array(devices), ("data",))
        program = EncodeProgram(fn=None, mesh=mesh)  # type: ignore[arg-type]

        def forward(params, ids, segments, positions):
            program.traces += 1
            m = nnx.merge(graphdef, params)
            # Traced under its mesh: on TPU, packed rows take the splash kernel (sbert_flax.models.splash_attention).
            with sharding.declared(mesh):
                if output == "token":
                    return m.tokens(ids, (segments > 0).astype(jnp.int32), segments=segments,
                                    positions=positions)
                return m.embed_packed(ids, segments, positions, Packer.slots(ids.shape[1]))

        data = NamedSharding(mesh, P("data"))
        program.fn = jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), data, data, data),
                             out_shardings=data, compiler_options=compiler_options(devices))
        _PROGRAMS[key] = program
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
        return program
