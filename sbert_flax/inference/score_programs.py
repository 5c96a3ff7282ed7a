"""The jitted cross-encoder scoring program, shared process-wide by what determines it.

As `encode_programs` does for sentence embeddings: keyed by the `SequenceClassifier`'s graph
definition (architecture, label count, compute dtype, attention implementation) and the devices,
so each packed shape compiles once per process whatever the number of `CrossEncoder`s; params are
arguments, never constants, so two checkpoints of one architecture share the program too.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.common import sharding
from sbert_flax.common.xla import compiler_options
from sbert_flax.inference.packing import Packer

MAX_PROGRAMS = 16  # least recently used dropped past this (their executables with them)


@dataclasses.dataclass(eq=False)
class ScoreProgram:
    """`fn(params, ids, token_types, segments, positions) -> logits [rows, slots, num_labels]`
    over packed pair batches; `traces` counts its compiled shapes."""

    fn: Callable
    mesh: Mesh
    traces: int = 0  # bumped at trace time: once per compiled shape, never per call


_PROGRAMS: collections.OrderedDict[tuple, ScoreProgram] = collections.OrderedDict()
_LOCK = threading.Lock()


def score_program(graphdef: nnx.GraphDef, devices: Sequence[jax.Device]) -> ScoreProgram:
    """The shared program for a `SequenceClassifier` graph on `devices` (rows data-parallel,
    params replicated). Slots per row are `Packer.slots(length)`, as the packer fills them."""
    key = (graphdef, tuple(devices))
    with _LOCK:
        program = _PROGRAMS.get(key)
        if program is not None:
            _PROGRAMS.move_to_end(key)
            return program
        mesh = Mesh(np.array(devices), ("data",))
        program = ScoreProgram(fn=None, mesh=mesh)  # type: ignore[arg-type]

        def forward(params, ids, token_types, segments, positions):
            program.traces += 1
            model = nnx.merge(graphdef, params)
            with sharding.declared(mesh):  # on TPU packed rows take the splash kernel
                return model.score_packed(ids, token_types, segments, positions,
                                          Packer.slots(ids.shape[1]))

        data = NamedSharding(mesh, P("data"))
        program.fn = jax.jit(forward, in_shardings=(NamedSharding(mesh, P()),) + (data,) * 4,
                             out_shardings=data, compiler_options=compiler_options(devices))
        _PROGRAMS[key] = program
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
        return program
