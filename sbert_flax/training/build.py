"""The parts of a run that follow from its config alone: the model definition and loss, the mesh,
the optimizer and the state layout.

`Trainer` builds them here, and so does `sbert-flax compile` (`aot.programs.run_parts`): one
builder, so the step compile checks is the step train runs (tests/aot/test_aot_compile.py compares
the two lowerings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sbert_flax.common import sharding
from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.training import optim
from sbert_flax.training.cross_encoder_losses import CrossEncoderLoss, make_cross_encoder_loss
from sbert_flax.training.losses import Loss, make_loss
from sbert_flax.training.siamese import ModelDef
from sbert_flax.training.state import StateLayout, state_layout
from sbert_flax.training.train_config import CROSS_ENCODER_LOSSES, TrainConfig


def check_batch_sizes(cfg: TrainConfig, num_devices: int, unit: str = "devices") -> None:
    """The batches split evenly over the devices, and GradCache's mini-batches over the batch;
    `unit` names the devices in the message ("chips" for a TPU slice).

    Raises:
      ValueError: naming the size that does not divide.
    """
    for name in ("batch_size", "eval_batch_size"):
        v = getattr(cfg, name)
        if v is not None and v % num_devices:
            raise ValueError(f"{name}={v} must be a multiple of the {num_devices} {unit}")
    if cfg.mini_batch_size and cfg.batch_size % cfg.mini_batch_size:
        raise ValueError(f"mini_batch_size={cfg.mini_batch_size} must divide batch_size="
                         f"{cfg.batch_size}")


def model_and_loss(cfg: TrainConfig, model: BertConfig, pooling: PoolingConfig,
                   num_labels: int | None
                   ) -> tuple[BertConfig, PoolingConfig, Loss | CrossEncoderLoss, ModelDef]:
    """(model config with the run's remat / scan_layers, the pooling the loss sees, the loss, the
    model definition) of `cfg`; `num_labels` is the classes of a labelled loss's data (softmax,
    ce-bce, ce-softmax; None otherwise)."""
    # How the backbone computes (remat, scan over layers) lives on its config.
    flags = {f: True for f in ("remat", "scan_layers") if getattr(cfg, f)}
    model = dataclasses.replace(model, **flags) if flags else model
    if cfg.loss == "softmax":  # UER's recipe: the head sees unnormalised embeddings
        pooling = dataclasses.replace(pooling, normalize=False)
    if cfg.loss in CROSS_ENCODER_LOSSES:  # cross-encoders (issue 25): pairs through one BERT
        loss = make_cross_encoder_loss(cfg.loss, num_labels)
    else:
        loss = make_loss(cfg.loss, scale=cfg.scale, symmetric=cfg.symmetric,
                         mini_batch_size=cfg.mini_batch_size, matryoshka_dims=cfg.matryoshka_dims,
                         num_labels=num_labels, pooling=pooling)
    mdef = loss.model_def(model, pooling, jnp.bfloat16 if cfg.bf16 else jnp.float32)
    return model, pooling, loss, mdef


def mesh(cfg: TrainConfig, devices: Sequence[jax.Device]) -> Mesh:
    """The ("data", "fsdp") mesh over `devices`: fsdp over all of them with
    `--param-sharding fsdp`, `--mesh_fsdp` ways when given, else data parallel."""
    devices = list(devices)
    fsdp = cfg.mesh_fsdp or (len(devices) if cfg.param_sharding == "fsdp" else 1)
    return sharding.make_mesh(-1, fsdp, devices)


def optimizer_and_layout(cfg: TrainConfig, mdef: ModelDef, mesh_: Mesh,
                         total_steps: int) -> tuple[Any, StateLayout]:
    """(the optax transformation with every optimizer field of `cfg`, the state layout on
    `mesh_` by the rules table of `--param-sharding`)."""
    tx = optim.make_optimizer(cfg.learning_rate, total_steps, warmup_ratio=cfg.warmup,
                              weight_decay=cfg.weight_decay, uer_adamw=cfg.uer_adamw,
                              params_for_mask=mdef.abstract_params,
                              max_grad_norm=cfg.max_grad_norm, adam_eps=cfg.adam_eps,
                              clip_head=cfg.clip_head)
    return tx, state_layout(mdef, tx, mesh_, sharding.rules_for(cfg.param_sharding))
