"""The programs `sbert-flax compile` checks, built by the very code that runs them.

- The train step: `training.step.make_train_step` over the state layout and mesh that `Trainer`
  builds from a `TrainConfig` (loss, optimizer, remat / scan_layers, replicated or fsdp params,
  bf16), lowered for the run's largest batch: every text of the global batch at `seq_length`,
  laid out by the training pipeline's own `BatchBuilder` (packed rows, or padded columns for the
  softmax classifier).
- The encode programs: `programs.encode_program` (what `SentenceEncoder` runs), one lowering per
  packed shape its `Packer` can produce.

Nothing is allocated: the state, params and batch are abstract (`ShapeDtypeStruct`), so a
BERT-base step for a v5e-16 lowers on a laptop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax import sharding
from sbert_flax.config import BertConfig, PoolingConfig
from sbert_flax.embedder import abstract_embedder
from sbert_flax.packing import ROW_LENGTHS, Packer
from sbert_flax.programs import encode_program
from sbert_flax.training import optim
from sbert_flax.training.data import PipelineConfig, schema_for
from sbert_flax.training.losses import Loss, make_loss
from sbert_flax.training.pipeline import BatchBuilder
from sbert_flax.training.sources import Schema
from sbert_flax.training.state import state_layout
from sbert_flax.training.step import make_train_step
from sbert_flax.training.train_config import TrainConfig

# Steps of the learning-rate schedule baked into the program: a constant, not a shape.
_SCHEDULE_STEPS = 1000
# Classes of the softmax head when the run does not say (NLI's three).
DEFAULT_NUM_LABELS = 3


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One program ready to compile: a name for the report and its `jax.stages.Lowered`."""

    name: str
    lowered: Any
    shape: tuple[int, ...] | None = None  # encode: (rows, length)


# ---- the largest batch -----------------------------------------------------------------------

class _FullLengthSource:
    """Stands in for a `TextSource`: `n` records whose every text is as long as allowed."""

    def __init__(self, columns: Sequence[str], target: str | None, n: int):
        self.columns = tuple(columns)
        self.schema = Schema(self.columns, target=target)  # BatchBuilder reads its target
        dtype = np.int32 if target == "label" else np.float32
        self.targets = None if target is None else np.zeros((n,), dtype)

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


# ---- the train step --------------------------------------------------------------------------

def _check(cfg: TrainConfig, num_devices: int) -> None:
    if cfg.batch_size % num_devices:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {num_devices} chips")
    if cfg.mini_batch_size and cfg.batch_size % cfg.mini_batch_size:
        raise ValueError(f"mini_batch_size={cfg.mini_batch_size} must divide batch_size="
                         f"{cfg.batch_size}")


def train_step_lowering(cfg: TrainConfig, model: BertConfig, pooling: PoolingConfig,
                        devices: Sequence[jax.Device], *, negatives: int = 0) -> Lowering:
    """The train step of `cfg` on `devices`, lowered for its largest batch.

    Built as `Trainer` builds it: remat / scan_layers on the model config, the loss, the
    ("data", "fsdp") mesh, the optimizer, the state layout from the rules table, then
    `make_train_step`.

    Raises:
      ValueError: the batch does not split over the chips, or options that do not go together.
    """
    devices = list(devices)
    _check(cfg, len(devices))
    flags = {f: True for f in ("remat", "scan_layers") if getattr(cfg, f)}
    model = dataclasses.replace(model, **flags) if flags else model
    num_labels = None
    if cfg.loss == "softmax":  # UER's recipe: the head sees unnormalised embeddings
        pooling = dataclasses.replace(pooling, normalize=False)
        num_labels = cfg.labels_num or DEFAULT_NUM_LABELS
    loss = make_loss(cfg.loss, scale=cfg.scale, symmetric=cfg.symmetric,
                     mini_batch_size=cfg.mini_batch_size, matryoshka_dims=cfg.matryoshka_dims,
                     num_labels=num_labels, pooling=pooling)
    mdef = loss.model_def(model, pooling, jnp.bfloat16 if cfg.bf16 else jnp.float32)
    fsdp = cfg.mesh_fsdp or (len(devices) if cfg.param_sharding == "fsdp" else 1)
    mesh = sharding.make_mesh(-1, fsdp, devices)
    tx = optim.make_optimizer(cfg.learning_rate, cfg.max_steps or _SCHEDULE_STEPS,
                              warmup_ratio=cfg.warmup, weight_decay=cfg.weight_decay,
                              uer_adamw=cfg.uer_adamw, params_for_mask=mdef.abstract_params,
                              max_grad_norm=cfg.max_grad_norm)
    layout = state_layout(mdef, tx, mesh, sharding.rules_for(cfg.param_sharding))
    step = make_train_step(mdef.graphdef, loss, tx, layout, seed=cfg.seed,
                           windowed_einsum=cfg.windowed_einsum)
    batch = largest_batch(cfg, loss, len(devices), negatives=negatives, pad_id=model.pad_token_id)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    # The step traces under its mesh itself (make_train_step): splash on TPU, rows kept split.
    return Lowering("train_step", step.lower(layout.abstract, abstract))


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
