"""The siamese classifier of UER-py's `run_classifier_siamese.py`, and its loss.

Two towers with shared weights (one `SentenceEmbedder` run on both sides), each side pooled
("cls" = UER's "first", the default; or mean / max), features `[u, v, |u-v|, u*v]`, one linear
layer to the labels, softmax cross-entropy. The head is float32 whatever the backbone's compute
dtype. Params: `{"embedder": {"backbone": ...}, "classifier": {"kernel", "bias"}}`.

`ModelDef` (graphdef, abstract params, logical axis names) is what every training loss hands the
state and the step (see `losses.py`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.models.embedder import SentenceEmbedder

Array = jax.Array


class Classifier(nnx.Module):
    """Linear(4 * hidden, num_labels) with PyTorch's nn.Linear init, as UER-py builds it."""

    def __init__(self, in_features: int, num_labels: int, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) and bias bound
        kk, kb = rngs.params(), rngs.params()
        self.kernel = nnx.Param(
            jax.random.uniform(kk, (in_features, num_labels), jnp.float32, -bound, bound),
            out_sharding=(None, None), eager_sharding=False)
        self.bias = nnx.Param(jax.random.uniform(kb, (num_labels,), jnp.float32, -bound, bound),
                              out_sharding=(None,), eager_sharding=False)

    def __call__(self, x: Array) -> Array:
        return x @ self.kernel[...] + self.bias[...]


class SiameseClassifier(nnx.Module):
    """Shared-weight towers + [u, v, |u-v|, u*v] + linear head.

    Args:
      cfg: backbone architecture.
      num_labels: classes.
      pooling: "cls" | "mean" | "max", or a `PoolingConfig` (UER's recipe does not normalise).
      rngs: init randomness (the head's init; the backbone is overwritten by pretrained params).
      dtype: backbone compute dtype (float32 or bfloat16); params stay float32.
    """

    def __init__(self, cfg: BertConfig, num_labels: int, pooling: str | PoolingConfig, *,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.embedder = SentenceEmbedder(cfg, as_pooling(pooling), rngs=rngs, dtype=dtype)
        self.classifier = Classifier(4 * cfg.hidden_size, num_labels, rngs)

    def __call__(self, a_ids: Array, a_mask: Array, b_ids: Array, b_mask: Array, *,
                 dropout_key: Array | None = None) -> Array:
        """Logits float32 [B, num_labels]; dropout iff `dropout_key` is given."""
        n = a_ids.shape[0]
        # Both sides in one backbone call ([2B, L]): the same weights, twice the GEMM rows.
        emb = self.embedder(jnp.concatenate([a_ids, b_ids]), jnp.concatenate([a_mask, b_mask]),
                            dropout_key=dropout_key)
        return self.head(emb[:n], emb[n:])

    def head(self, u: Array, v: Array) -> Array:
        """Logits float32 [B, num_labels] of the pair embeddings u, v [B, D]."""
        u, v = u.astype(jnp.float32), v.astype(jnp.float32)
        return self.classifier(jnp.concatenate([u, v, jnp.abs(u - v), u * v], axis=-1))


def weighted_cross_entropy(logits: Array, labels: Array, weights: Array) -> Array:
    """Mean softmax cross-entropy weighted by `weights` (zero-weight pad rows change nothing)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def as_pooling(pooling: str | PoolingConfig) -> PoolingConfig:
    """A pooling mode name ("cls" | "mean" | "max", unnormalised) or a `PoolingConfig`."""
    return pooling if isinstance(pooling, PoolingConfig) else PoolingConfig(pooling)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """A trained model's structure: graphdef, abstract params and their logical axis names."""

    graphdef: nnx.GraphDef
    abstract_params: dict  # pure dict of ShapeDtypeStruct
    logical_specs: dict  # pure dict of PartitionSpec of logical names


def abstract_model_def(make: Callable[[nnx.Rngs], nnx.Module]) -> ModelDef:
    """The `ModelDef` of `make(rngs)`, built abstractly (no weights allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return ModelDef(graphdef, nnx.to_pure_dict(state), specs)


def model_def(cfg: BertConfig, num_labels: int, pooling: str | PoolingConfig,
              dtype: Any = jnp.float32) -> ModelDef:
    """Builds the classifier abstractly (no weights allocated)."""
    return abstract_model_def(
        lambda rngs: SiameseClassifier(cfg, num_labels, pooling, rngs=rngs, dtype=dtype))


def initial_params(backbone: dict, cfg: BertConfig, num_labels: int, seed: int) -> dict:
    """Host params: the pretrained backbone plus a freshly initialised head (from `seed`)."""
    head = Classifier(4 * cfg.hidden_size, num_labels, nnx.Rngs(params=seed))
    return {"embedder": {"backbone": jax.tree.map(np.asarray, backbone)},
            "classifier": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(head)))}
