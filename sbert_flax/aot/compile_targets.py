"""The programs `sbert-flax compile` checks, built by the very code that runs them.

- The train step: `training.step.make_train_step` over the model, loss, mesh, optimizer and state
  layout that `Trainer` builds from the same `TrainConfig` (`run_parts`), lowered for the run's
  largest batch: every text of the global batch at `seq_length`, laid out by the training
  pipeline's own `BatchBuilder` (packed rows, or padded columns for the softmax classifier).
- The evaluator's programs, when the run evaluates (STS files; the softmax classifier's dev / test
  sets): `training.evaluator.Evaluator`'s own jitted functions on the training mesh, for its
  largest batches. They run while the train state is on the chips, so the optimizer state's
  bytes are counted beside them (`Lowering.resident`).
- The encode programs: `programs.encode_program` (what `SentenceEncoder` runs), one lowering per
  packed shape its `Packer` can produce.

Nothing is allocated: the state, params and batch are abstract (`ShapeDtypeStruct`), so a
BERT-base step for a v5e-16 lowers on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.inference.encode_programs import encode_program
from sbert_flax.inference.packing import ROW_LENGTHS, Packer
from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.models.embedder import abstract_embedder
from sbert_flax.training import build
from sbert_flax.training.data import PipelineConfig, schema_for
from sbert_flax.training.dev_eval import Evaluator
from sbert_flax.training.losses import Loss
from sbert_flax.training.pipeline import BatchBuilder, eval_batches
from sbert_flax.training.siamese import ModelDef
from sbert_flax.training.sources import Schema
from sbert_flax.training.state import StateLayout
from sbert_flax.training.step import make_train_step
from sbert_flax.training.train_config import TrainConfig

# Steps of the learning-rate schedule baked into the program when --max_steps does not say (the
# run's own count needs its data): a constant, not a shape.
_SCHEDULE_STEPS = 1000
# Classes of the softmax head when the run does not say (NLI's three; the run counts its data's).
DEFAULT_NUM_LABELS = 3

_HOW_FILES_ARE_READ = "how the data files are read, not what the batch holds"
# TrainConfig fields that change none of the programs compiled here, with why. Every other field
# is read where `Trainer` reads it: tests/aot/test_aot_compile.py walks them all (each must change the
# lowered programs), so a new field fails there until it is read here or listed here.
NOT_COMPILED: dict[str, str] = {
    "vocab_path": "the tokenizer: which ids, not how many (passed to the loader, which a UER "
                  ".bin needs)",
    "train_path": "compile reads no data: --negatives names the file's hard-negative columns and "
                  "every text is at --seq_length",
    "ir_dev_paths": "retrieval evaluation encodes with a one-device SentenceEncoder over a host "
                    "copy of the params: not compiled here yet",
    "ir_dev_split": "which qrels of the BEIR folders are scored",
    "data_format": _HOW_FILES_ARE_READ,
    "label_names": _HOW_FILES_ARE_READ,
    "columns": _HOW_FILES_ARE_READ,
    "has_header": _HOW_FILES_ARE_READ,
    "skip_bad_lines": _HOW_FILES_ARE_READ,
    "score_scale": "cosent's gold scores are divided on the host",
    "group_by_length": "which records share a batch; the largest batch is the same",
    "no_duplicates": "which records share a batch",
    "data_threads": "host threads",
    "epochs_num": "with the data's size, the schedule's length: a constant of the step, never a "
                  "shape or a byte (compile spans --max_steps, else 1000 steps)",
    "eval_steps": "when the evaluator runs, not what it runs",
    "peak_flops": "MFU in the logs",
    "output_dir": "where the run writes",
    "save_every_steps": "checkpoint cadence (host)",
    "max_to_keep": "checkpoints kept on disk",
    "best_metric": "which dev metric picks the best model",
    "resume": "where the run starts, not what it runs",
    "force": "where the run starts, not what it runs",
    "export": "writes the best model at the end (host)",
    "log_every_steps": "logging cadence",
    "nan_check_every": "how often the host reads the loss",
    "progress_bar": "the terminal",
}


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One program ready to compile: a name for the report and its `jax.stages.Lowered`.

    `resident`: bytes per chip that other buffers hold while it runs (the evaluator runs beside
    the optimizer state), counted in its total.
    """

    name: str
    lowered: Any
    shape: tuple[int, ...] | None = None  # encode / evaluate: (rows, length)
    resident: int = 0


# ---- the largest batch -----------------------------------------------------------------------

class _FullLengthSource:
    """Stands in for a `TextSource`: `n` records whose every text is as long as allowed."""

    def __init__(self, columns: Sequence[str], target: str | None, n: int):
        self.columns = tuple(columns)
        self.schema = Schema(self.columns, target=target)  # BatchBuilder reads its target
        dtype = np.int32 if target == "label" else np.float32
        self.targets = None if target is None else np.zeros((n,), dtype)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def texts(self, indices: Sequence[int]) -> dict[str, list[str]]:
        return {c: ["x"] * len(indices) for c in self.columns}


class _FullLengthTokenizer:
    """Every non-empty text becomes `max_length` tokens; "" becomes [CLS] [SEP], as the real
    tokenizer makes the pipeline's padding sentence. Token values do not change a shape."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def encode(self, texts: Sequence[str], max_length: int | None) -> list[np.ndarray]:
        return [np.ones((max_length if t else 2,), np.int32) for t in texts]


def text_columns(loss: Loss, negatives: int) -> tuple[str, ...]:
    """The batch's text columns for a file with `negatives` hard-negative columns."""
    if negatives < 0:
        raise ValueError(f"negatives={negatives} must be >= 0")
    if negatives == 0:
        return loss.text_columns(False)
    if negatives == 1:
        return loss.text_columns(True)
    return loss.text_columns(tuple(f"negative_{i}" for i in range(1, negatives + 1)))


def largest_batch(cfg: TrainConfig, loss: Loss, num_devices: int, *, negatives: int = 0,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
    """The global batch of `cfg` with every text at `cfg.seq_length` tokens, as the training
    pipeline lays it out (the most rows a packed batch can have, the longest padded bucket)."""
    columns = text_columns(loss, negatives)
    pipe = PipelineConfig(
        global_batch=cfg.batch_size, seq_length=cfg.seq_length, joint_length=loss.joint_length,
        pack=cfg.pack, row_multiple=num_devices,
        pack_groups=cfg.batch_size // cfg.mini_batch_size if cfg.mini_batch_size else 1)
    source = _FullLengthSource(columns, schema_for(cfg.loss).target, cfg.batch_size)
    builder = BatchBuilder(source, _FullLengthTokenizer(pad_id), pipe)  # type: ignore[arg-type]
    return builder.build(np.arange(cfg.batch_size))


# ---- the run: what Trainer builds from its config --------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunParts:
    """What `Trainer` builds from a `TrainConfig` before its first step, built the same way."""

    cfg: TrainConfig
    model: BertConfig  # with the run's remat / scan_layers
    loss: Loss
    mdef: ModelDef
    tx: Any  # optax.GradientTransformation
    layout: StateLayout

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.batch_size


def run_parts(cfg: TrainConfig, model: BertConfig, pooling: PoolingConfig,
              devices: Sequence[jax.Device]) -> RunParts:
    """The model, loss, mesh, optimizer and state layout of `cfg` on `devices`, as `Trainer`
    builds them (remat / scan_layers on the model config; softmax's unnormalised pooling and
    head; the ("data", "fsdp") mesh; every optimizer field; the rules table's layout).

    `model` and `pooling` are the run's (`aot.run_model.resolve`). The schedule spans
    `cfg.max_steps` (else 1000 steps): the run's own count needs its data and is only a constant.

    Raises:
      ValueError: the batch does not split over the chips, or options that do not go together.
    """
    devices = list(devices)
    build.check_batch_sizes(cfg, len(devices), unit="chips")
    num_labels = (cfg.labels_num or DEFAULT_NUM_LABELS) if cfg.loss == "softmax" else None
    model, _, loss, mdef = build.model_and_loss(cfg, model, pooling, num_labels)
    tx, layout = build.optimizer_and_layout(cfg, mdef, build.mesh(cfg, devices),
                                            cfg.max_steps or _SCHEDULE_STEPS)
    return RunParts(cfg, model, loss, mdef, tx, layout)


# ---- the train step --------------------------------------------------------------------------

def train_step_lowering(parts: RunParts, *, negatives: int = 0) -> Lowering:
    """The train step of the run, lowered for its largest batch (`make_train_step`, as `Trainer`
    calls it)."""
    cfg, layout = parts.cfg, parts.layout
    step = make_train_step(parts.mdef.graphdef, parts.loss, parts.tx, layout, seed=cfg.seed,
                           windowed_einsum=cfg.windowed_einsum)
    batch = largest_batch(cfg, parts.loss, layout.mesh.devices.size, negatives=negatives,
                          pad_id=parts.model.pad_token_id)
    # The step traces under its mesh itself (make_train_step): splash on TPU, rows kept split.
    return Lowering("train_step", step.lower(layout.abstract, _abstract(batch)))


def _abstract(batch: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


# ---- the evaluator ---------------------------------------------------------------------------

def bytes_per_chip(tree: Any) -> int:
    """Bytes one chip holds of an abstract tree whose leaves carry their sharding (unpadded:
    XLA:TPU's tiles add a little for small arrays, which the HBM headroom covers)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(tree))


def evaluates(cfg: TrainConfig) -> tuple[bool, bool]:
    """(embeds STS files, classifies dev / test sets): what the run's evaluator runs."""
    return bool(cfg.sts_dev_paths), cfg.loss == "softmax" and bool(cfg.dev_path or cfg.test_path)


def evaluate_lowerings(parts: RunParts) -> list[Lowering]:
    """The evaluator's programs the run runs, for their largest batches.

    STS: the packed embed program at the one row count per row length that holds the most
    tokens (`Evaluator.packer`'s budget; at a given length memory only grows with rows, so the
    others fit where it does). Softmax dev / test: the classifier at `eval_batch_size` rows of
    `seq_length`. Each runs beside the optimizer state (the params are its argument).
    """
    cfg, layout = parts.cfg, parts.layout
    sts, classify = evaluates(cfg)
    if not (sts or classify):
        return []
    # Built as Trainer builds it; the tokenizer and the files are only read when it runs.
    ev = Evaluator(parts.mdef.graphdef, layout, None,  # type: ignore[arg-type]
                   seq_length=cfg.seq_length, batch_size=parts.eval_batch_size,
                   classify=cfg.loss == "softmax")
    resident = bytes_per_chip((layout.abstract.step, layout.abstract.opt_state))
    params = layout.abstract.params
    out = []
    if sts:
        most_rows: dict[int, int] = {}
        for rows, length in ev.packer.shapes():
            most_rows[length] = max(rows, most_rows.get(length, 0))
        for length, rows in sorted(most_rows.items()):
            out.append(Lowering(f"evaluate sts {rows}x{length}", ev.lower_embed(params, rows, length),
                                (rows, length), resident))
    if classify:
        source = _FullLengthSource(parts.loss.text_columns(False), "label", parts.eval_batch_size)
        batch = eval_batches(source, _FullLengthTokenizer(parts.model.pad_token_id),  # type: ignore[arg-type]
                             global_batch=parts.eval_batch_size, seq_length=cfg.seq_length,
                             joint_length=True)[0]
        shape = batch["text_a_ids"].shape
        out.append(Lowering(f"evaluate classify {shape[0]}x{shape[1]}",
                            ev.lower_classify(params, _abstract(batch)), tuple(shape), resident))
    return out


def run_lowerings(cfg: TrainConfig, model: BertConfig, pooling: PoolingConfig,
                  devices: Sequence[jax.Device], *, negatives: int = 0) -> list[Lowering]:
    """Every program of the run on `devices`: the train step, then the evaluator's."""
    parts = run_parts(cfg, model, pooling, devices)
    return [train_step_lowering(parts, negatives=negatives), *evaluate_lowerings(parts)]


# ---- the encode programs ---------------------------------------------------------------------

def encode_lowerings(model: BertConfig, pooling: PoolingConfig, devices: Sequence[jax.Device], *,
                     bf16: bool, max_seq_length: int, max_batch_tokens: int,
                     row_lengths: Sequence[int] = ROW_LENGTHS) -> list[Lowering]:
    """The sentence-encode program, as `SentenceEncoder` builds it for `devices`, lowered for
    every packed (rows, length) shape of its token budget."""
    devices = list(devices)
    graphdef, abstract = abstract_embedder(model, pooling)
    embedder = nnx.merge(graphdef, abstract)
    embedder.backbone.dtype = jnp.dtype(jnp.bfloat16 if bf16 else jnp.float32)
    embedder.backbone.attention_impl = None  # the default: splash for packed rows on TPU
    # (the program traces under its mesh itself: `programs.encode_program`)
    program = encode_program(nnx.graphdef(embedder), "sentence", devices)
    rep = NamedSharding(program.mesh, P())
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
    packer = Packer(max_batch_tokens, max_seq_length, len(devices), tuple(row_lengths))
    out = []
    for rows, length in packer.shapes():
        x = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        out.append(Lowering(f"encode {rows}x{length}", program.fn.lower(params, x, x, x),
                            (rows, length)))
    return out
