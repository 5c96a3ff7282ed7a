"""The jitted programs over packed batches (sentence embeddings, token states, cross-encoder
scores), shared process-wide by what determines them.

Two `SentenceEncoder`s (or `CrossEncoder`s) of one architecture -- a model loaded twice, a server
beside an evaluator, a trainer's exported best model -- run the same XLA programs. Keyed by what
fixes the program -- the module's graph definition (architecture, pooling or label count, compute
dtype, attention implementation), the output kind and the devices -- they share one `jax.jit`, so
each packed shape is traced and compiled once per process, not once per encoder. Params are
arguments, never closed-over constants, so the weights are not part of the key: two checkpoints of
one architecture share programs too.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.common import sharding
from sbert_flax.common.xla import compiler_options
from sbert_flax.inference.packing import Packer

B = TypeVar("B")

# Programs kept; past it the least recently used is dropped (its executables with it), so a
# process that loads many architectures in turn does not grow without bound.
MAX_PROGRAMS = 32


@dataclasses.dataclass(eq=False)
class PackedProgram:
    """One jitted forward over packed batches: `fn(params, *row_inputs)`; `traces` counts its
    compiled shapes."""

    fn: Callable
    mesh: Mesh
    traces: int = 0  # bumped at trace time: once per compiled shape, never per call


EncodeProgram = PackedProgram  # the sentence / token programs' name
ScoreProgram = PackedProgram  # the cross-encoder's

_PROGRAMS: collections.OrderedDict[tuple, PackedProgram] = collections.OrderedDict()
_LOCK = threading.Lock()


def shared_program(key: tuple, devices: Sequence[jax.Device], num_inputs: int,
                   forward_of: Callable[[PackedProgram, Mesh], Callable]) -> PackedProgram:
    """The process-wide program for `key`, built on first use.

    Args:
      key: what fixes the program (a graph definition, the output kind, ...); `devices` are added.
      devices: the row inputs are split over them ("data"), the params replicated.
      num_inputs: row inputs after the params.
      forward_of: `(program, mesh) -> forward(params, *inputs)`; the forward bumps
        `program.traces` when traced.
    """
    key = (*key, tuple(devices))
    with _LOCK:
        program = _PROGRAMS.get(key)
        if program is not None:
            _PROGRAMS.move_to_end(key)
            return program
        mesh = Mesh(np.array(devices), ("data",))
        program = PackedProgram(fn=None, mesh=mesh)  # type: ignore[arg-type]
        data = NamedSharding(mesh, P("data"))
        program.fn = jax.jit(forward_of(program, mesh),
                             in_shardings=(NamedSharding(mesh, P()),) + (data,) * num_inputs,
                             out_shardings=data, compiler_options=compiler_options(devices))
        _PROGRAMS[key] = program
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
        return program


def encode_program(graphdef: nnx.GraphDef, output: str, devices: Sequence[jax.Device]
                   ) -> PackedProgram:
    """The shared program for `graphdef` (a `SentenceEmbedder`'s), `output` and `devices`.

    `output` is "sentence" (pooled embeddings at each packed slot, [rows, slots, D]) or "token"
    (per-token hidden states, [rows, length, D]). `fn(params, ids, segments, positions)`.
    """
    def forward_of(program: PackedProgram, mesh: Mesh) -> Callable:
        def forward(params, ids, segments, positions):
            program.traces += 1
            m = nnx.merge(graphdef, params)
            # Traced under its mesh: on TPU, packed rows take the splash kernel
            # (sbert_flax.models.splash_attention).
            with sharding.declared(mesh):
                if output == "token":
                    return m.tokens(ids, (segments > 0).astype(jnp.int32), segments=segments,
                                    positions=positions)
                return m.embed_packed(ids, segments, positions, Packer.slots(ids.shape[1]))
        return forward

    return shared_program(("embed", graphdef, output), devices, 3, forward_of)


def score_program(graphdef: nnx.GraphDef, devices: Sequence[jax.Device]) -> PackedProgram:
    """The shared program for a `SequenceClassifier` graph on `devices`:
    `fn(params, ids, token_types, segments, positions) -> logits [rows, slots, num_labels]`.
    Slots per row are `Packer.slots(length)`, as the packer fills them."""
    def forward_of(program: PackedProgram, mesh: Mesh) -> Callable:
        def forward(params, ids, token_types, segments, positions):
            program.traces += 1
            model = nnx.merge(graphdef, params)
            with sharding.declared(mesh):  # on TPU packed rows take the splash kernel
                return model.score_packed(ids, token_types, segments, positions,
                                          Packer.slots(ids.shape[1]))
        return forward

    return shared_program(("score", graphdef), devices, 4, forward_of)


def run_in_flight(batches: Iterable[B], dispatch: Callable[[B], Any], in_flight: int
                  ) -> Iterator[tuple[B, np.ndarray]]:
    """Runs `dispatch(batch)` (an asynchronous device call) with at most `in_flight` batches on
    the devices; yields (batch, host result) in order. `batches` is advanced (tokenizing,
    packing) while earlier batches compute."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append((batch, dispatch(batch)))
        if len(queue) >= in_flight:
            b, out = queue.popleft()
            yield b, np.asarray(out)
    while queue:
        b, out = queue.popleft()
        yield b, np.asarray(out)
