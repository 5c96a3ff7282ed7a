"""Training losses, one pluggable piece each: the trainer runs whichever `make_loss` returns.

- `softmax`: UER-py's siamese classifier ([u, v, |u-v|, u*v] -> linear -> cross-entropy).
- `mnrl`: MultipleNegativesRankingLoss (InfoNCE) over the GLOBAL batch: every anchor against
  every positive (and every hard negative) of the batch, cosine x scale, cross-entropy with the
  own positive as label; `symmetric` adds positives -> anchors (sentence-transformers'
  MultipleNegativesSymmetricRankingLoss). Under `jax.jit` with rows sharded over devices, the
  [B, B] score matrix of the global embeddings makes XLA gather them across devices, so no
  anchor misses a negative that lives on another device or host.
- `cached-mnrl`: the same loss and gradient in mini-batches (GradCache, see `columns.py`).
- `cosent`: CoSENT on graded pairs (sentence-transformers' CoSENTLoss).
- `matryoshka_dims`: wraps any embedding loss: the sum over dims of the loss on embeddings
  truncated to each dim (sentence-transformers' MatryoshkaLoss, weights 1).

Every loss takes a batch in either layout of the pipeline: padded (`{c}_ids`/`{c}_mask`
per text column) or packed (the texts of all columns in shared rows, `packed_*` and `{c}_row` /
`{c}_slot`; the default, see `packing.TrainPacking`). Both give each text the same embedding.
Padding rows (weight 0) are neither negatives nor counted in any mean. Each loss exposes `name`,
`text_columns(has_negative)`, `target` (the batch's label key), `model_def`, `initial_params` and
`value_and_grad(graphdef, params, batch, dropout_key) -> (loss, grads, metrics)`, a pure
function called inside the jitted train step (`step.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.models.embedder import SentenceEmbedder
from sbert_flax.models.pooling import l2_normalize
from sbert_flax.training import columns as cols
from sbert_flax.training import siamese
from sbert_flax.training.siamese import ModelDef
from sbert_flax.training.train_config import CROSS_ENCODER_LOSSES, LOSSES

Array = jax.Array
Batch = dict[str, Array]
# (embeddings per text column [B, D], batch) -> (loss, metrics)
EmbeddingObjective = Callable[[Sequence[Array], Batch], tuple[Array, dict[str, Array]]]

# A logit that is not there: finite (not -inf) so an all-masked row of a padding anchor gives a
# finite, zero-weighted loss and zero gradients instead of NaN; exp() of it underflows to 0.
_EXCLUDED = -1e9


# ---- losses on embeddings ------------------------------------------------------------------------

def mnrl(anchors: Array, positives: Array, weights: Array, negatives: Array | None = None, *,
         scale: float = 20.0, symmetric: bool = False) -> tuple[Array, dict[str, Array]]:
    """MultipleNegativesRankingLoss on embeddings [B, D] (any norm; cosine is taken here).

    Anchor i is scored against every positive and every negative of the batch; its label is
    positive i. `symmetric` averages the log-partition of anchors -> documents with that of
    positives -> anchors, as sentence-transformers' symmetric loss (per-direction softmax) does.

    Returns:
      (mean loss over real rows, {"accuracy": in-batch top-1 of anchor -> own positive}).
    """
    real = weights > 0
    a, p = l2_normalize(anchors), l2_normalize(positives)
    docs, doc_real = p, real
    if negatives is not None:  # [k * B, D]: k hard negatives per anchor, column after column
        docs = jnp.concatenate([p, l2_normalize(negatives)])
        doc_real = jnp.tile(real, docs.shape[0] // real.shape[0])
    scores = jnp.where(doc_real[None, :], scale * (a @ docs.T), _EXCLUDED)  # [B, (1 + k) B]
    rows = jnp.arange(a.shape[0])
    positive = scores[rows, rows]
    log_z = jax.nn.logsumexp(scores, axis=1)
    if symmetric:
        back = jnp.where(real[None, :], scale * (p @ a.T), _EXCLUDED)  # [B, B] positive -> anchors
        log_z = 0.5 * (log_z + jax.nn.logsumexp(back, axis=1))
    denom = jnp.maximum(jnp.sum(weights), 1e-9)
    loss = jnp.sum(jnp.where(real, weights * (log_z - positive), 0.0)) / denom
    correct = (jnp.argmax(scores, axis=1) == rows).astype(jnp.float32)
    return loss, {"accuracy": jnp.sum(correct * weights) / denom}


def cosent(emb1: Array, emb2: Array, scores: Array, weights: Array, *,
           scale: float = 20.0) -> tuple[Array, dict[str, Array]]:
    """CoSENT: log(1 + sum over pairs (i, j) with score_i < score_j of exp(scale (cos_i - cos_j))).

    Pairs touching a padding row are left out. The O(B^2) form: batches are small.
    """
    real = weights > 0
    s = scale * jnp.sum(l2_normalize(emb1) * l2_normalize(emb2), axis=-1)  # [B]
    diff = s[:, None] - s[None, :]  # [i, j] = s_i - s_j
    ordered = (scores[:, None] < scores[None, :]) & real[:, None] & real[None, :]
    terms = jnp.where(ordered, diff, _EXCLUDED).reshape(-1)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), terms.dtype), terms])), {}


def matryoshka(objective: EmbeddingObjective, dims: Sequence[int],
               weights: Sequence[float] | None = None) -> EmbeddingObjective:
    """The sum over `dims` of `weights[k] * objective(embeddings truncated to dims[k])`.

    The inner losses are cosine-based, so truncation is all it takes (they renormalise). Dims
    run largest first, as sentence-transformers sorts them; the metrics are the largest dim's.
    Under GradCache the gradient w.r.t. the full embeddings is then the sum over dims by itself.
    """
    ws = [1.0] * len(dims) if weights is None else list(weights)
    if len(ws) != len(dims) or not dims:
        raise ValueError(f"matryoshka: {len(dims)} dims and {len(ws)} weights; give one weight per dim")
    pairs = sorted(zip(dims, ws, strict=True), key=lambda dw: -dw[0])

    def wrapped(embs: Sequence[Array], batch: Batch) -> tuple[Array, dict[str, Array]]:
        full = embs[0].shape[-1]
        if pairs[0][0] > full:
            raise ValueError(f"matryoshka dim {pairs[0][0]} exceeds the embedding dimension {full}")
        total, metrics = 0.0, None
        for d, w in pairs:
            loss, m = objective([e[..., :d] for e in embs], batch)
            total = total + w * loss
            metrics = m if metrics is None else metrics
        return total, metrics

    return wrapped


# ---- the loss objects the trainer runs -----------------------------------------------------------

class EmbeddingModel(nnx.Module):
    """The model the embedding losses train: a `SentenceEmbedder` (params {"embedder": ...})."""

    def __init__(self, cfg: BertConfig, pooling: PoolingConfig, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.embedder = SentenceEmbedder(cfg, pooling, rngs=rngs, dtype=dtype)


def _pooling(given: str | PoolingConfig | None, default: PoolingConfig | None) -> PoolingConfig:
    chosen = given if given is not None else default
    if chosen is None:
        raise ValueError("no pooling: pass model_def(..., pooling=) or make_loss(..., pooling=)")
    return siamese.as_pooling(chosen)


@dataclasses.dataclass(frozen=True)
class SoftmaxLoss:
    """UER-py's siamese recipe: [u, v, |u-v|, u*v] -> linear -> cross-entropy.

    A packed batch (the default: `packed_*`, `text_a_row/slot`, `text_b_row/slot`) embeds every
    text of both columns in shared rows, as the embedding losses do, then gathers u and v per pair;
    a padded one (`--no_pack`) pads [a; b] to one length and embeds it in one backbone call.
    """

    num_labels: int
    pooling: PoolingConfig | None = None
    name: ClassVar[str] = "softmax"
    target: ClassVar[str] = "labels"
    # Padded batches pad both columns to one length: the classifier embeds [a; b] in one call.
    joint_length: ClassVar[bool] = True
    columns: ClassVar[tuple[str, str]] = ("text_a", "text_b")

    def text_columns(self, has_negative: bool = False) -> tuple[str, ...]:
        if has_negative:
            raise ValueError("the softmax loss takes (text_a, text_b, label) rows; no negative column")
        return self.columns

    def model_def(self, cfg: BertConfig, pooling: str | PoolingConfig | None = None,
                  dtype: Any = jnp.float32) -> ModelDef:
        return siamese.model_def(cfg, self.num_labels, _pooling(pooling, self.pooling), dtype)

    def initial_params(self, backbone_params: dict, cfg: BertConfig, seed: int) -> dict:
        return siamese.initial_params(backbone_params, cfg, self.num_labels, seed)

    def value_and_grad(self, graphdef: nnx.GraphDef, params: Any, batch: Batch,
                       dropout_key: Array | None) -> tuple[Array, Any, dict[str, Array]]:
        if "packed_ids" in batch:
            ids, segments, positions, row, slot = cols.packed_arrays(batch, self.columns)
            keys = None if dropout_key is None else cols.row_keys(dropout_key, 1, ids.shape[0])[0]

            def logits_of(p):
                embs = cols.embed_packed_rows(graphdef, p, ids, segments, positions, keys)[row, slot]
                return nnx.merge(graphdef, p).head(embs[0], embs[1])  # embs [2, B, D]
        else:
            def logits_of(p):
                return nnx.merge(graphdef, p)(batch["text_a_ids"], batch["text_a_mask"],
                                              batch["text_b_ids"], batch["text_b_mask"],
                                              dropout_key=dropout_key)

        def loss_fn(p):
            logits = logits_of(p)
            return siamese.weighted_cross_entropy(logits, batch["labels"], batch["weights"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        w = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return loss, grads, {"accuracy": jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1e-9)}


@dataclasses.dataclass(frozen=True)
class EmbeddingLoss:
    """A loss on sentence embeddings (mnrl, cached-mnrl, cosent), optionally Matryoshka.

    Attributes:
      name: "mnrl" | "cached-mnrl" | "cosent".
      scale: cosine multiplier (1 / temperature).
      symmetric: mnrl only: add the positives -> anchors term.
      mini_batch_size: cached-mnrl only: sentences per forward pass (global; best a multiple of
        the device count, and it must divide the global batch size).
      matryoshka_dims: train these truncated dims too (sum of the losses), or None.
      pooling: the default pooling of `model_def`.
    """

    name: str
    scale: float = 20.0
    symmetric: bool = False
    mini_batch_size: int | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    pooling: PoolingConfig | None = None
    # Each text column is embedded on its own, at its own padded length.
    joint_length: ClassVar[bool] = False

    @property
    def target(self) -> str | None:
        return "scores" if self.name == "cosent" else None

    def text_columns(self, has_negative: bool | tuple[str, ...] = False) -> tuple[str, ...]:
        """The batch's text columns; `has_negative`: a `negative` column, or the names of the
        negative columns (`negative_1 .. negative_n` of a mined n-tuple file)."""
        if self.name == "cosent":
            if has_negative:
                raise ValueError("the cosent loss takes (sentence1, sentence2, score) rows; no negative column")
            return ("sentence1", "sentence2")
        if isinstance(has_negative, tuple):
            return ("anchor", "positive", *has_negative)
        return ("anchor", "positive", "negative") if has_negative else ("anchor", "positive")

    def model_def(self, cfg: BertConfig, pooling: str | PoolingConfig | None = None,
                  dtype: Any = jnp.float32) -> ModelDef:
        if self.matryoshka_dims and max(self.matryoshka_dims) > cfg.hidden_size:
            raise ValueError(f"matryoshka_dims {self.matryoshka_dims}: the model's embeddings have "
                             f"{cfg.hidden_size} dims")
        pool = _pooling(pooling, self.pooling)
        return siamese.abstract_model_def(lambda rngs: EmbeddingModel(cfg, pool, rngs=rngs, dtype=dtype))

    def initial_params(self, backbone_params: dict, cfg: BertConfig, seed: int) -> dict:
        del cfg, seed  # nothing is freshly initialised
        return {"embedder": {"backbone": jax.tree.map(np.asarray, backbone_params)}}

    def objective(self) -> EmbeddingObjective:
        """The loss on the embeddings of `text_columns` (in that order)."""
        if self.name == "cosent":
            def fn(embs, batch):
                return cosent(embs[0], embs[1], batch["scores"], batch["weights"], scale=self.scale)
        else:
            def fn(embs, batch):
                neg = jnp.concatenate(list(embs[2:])) if len(embs) > 2 else None
                return mnrl(embs[0], embs[1], batch["weights"], neg, scale=self.scale,
                            symmetric=self.symmetric)
        return matryoshka(fn, self.matryoshka_dims) if self.matryoshka_dims else fn

    def value_and_grad(self, graphdef: nnx.GraphDef, params: Any, batch: Batch,
                       dropout_key: Array | None) -> tuple[Array, Any, dict[str, Array]]:
        packed = "packed_ids" in batch
        suffix = "_row" if packed else "_ids"
        negatives = tuple(sorted((k[:-len(suffix)] for k in batch
                                  if k.startswith("negative") and k.endswith(suffix)),
                                 key=lambda c: (len(c), c)))  # negative_2 before negative_10
        names = self.text_columns(has_negative=negatives if self.name != "cosent" else False)
        fn = self.objective()

        def objective(embs: Array) -> tuple[Array, dict[str, Array]]:  # [C, B, D]
            return fn(list(embs), batch)

        if packed:
            arrays = cols.packed_arrays(batch, names)
            keys = None if dropout_key is None else cols.row_keys(dropout_key, 1, arrays[0].shape[0])[0]
            if self.mini_batch_size:
                return cols.packed_cached_value_and_grad(objective, graphdef, params, arrays, keys,
                                                         self.mini_batch_size)
            return cols.packed_value_and_grad(objective, graphdef, params, arrays, keys)
        columns = cols.column_arrays(batch, names)
        keys = None if dropout_key is None else cols.row_keys(dropout_key, len(names),
                                                              columns[0][0].shape[0])
        if self.mini_batch_size:
            return cols.cached_value_and_grad(objective, graphdef, params, columns, keys,
                                              self.mini_batch_size)
        return cols.value_and_grad(objective, graphdef, params, columns, keys)


Loss = SoftmaxLoss | EmbeddingLoss


def make_loss(name: str, *, scale: float = 20.0, symmetric: bool = False,
              mini_batch_size: int | None = None, matryoshka_dims: Sequence[int] | None = None,
              num_labels: int | None = None, pooling: str | PoolingConfig | None = None) -> Loss:
    """The loss called `name` ("softmax" | "mnrl" | "cached-mnrl" | "cosent").

    Args:
      name: the loss.
      scale: cosine multiplier of mnrl / cached-mnrl / cosent (sentence-transformers' 20).
      symmetric: mnrl / cached-mnrl: add the positives -> anchors term.
      mini_batch_size: cached-mnrl: sentences per forward pass (required there, refused elsewhere).
      matryoshka_dims: wrap the embedding loss in Matryoshka over these dims (e.g. 768,512,...,64).
      num_labels: softmax: the number of classes (required there).
      pooling: the default pooling of `loss.model_def`.

    Raises:
      ValueError: an unknown name or an option that does not apply to the loss.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    if name in CROSS_ENCODER_LOSSES:  # not an embedding loss: its own builder and options
        raise ValueError(f"{name} is a cross-encoder loss: build it with "
                         "cross_encoder_losses.make_cross_encoder_loss")
    pool = None if pooling is None else siamese.as_pooling(pooling)
    if (mini_batch_size is not None) != (name == "cached-mnrl"):
        raise ValueError("mini_batch_size is required by cached-mnrl and used by no other loss "
                         f"(loss {name!r}, mini_batch_size={mini_batch_size})")
    if mini_batch_size is not None and mini_batch_size < 1:
        raise ValueError(f"mini_batch_size={mini_batch_size} must be >= 1")
    if symmetric and name not in ("mnrl", "cached-mnrl"):
        raise ValueError(f"symmetric applies to mnrl / cached-mnrl, not {name!r}")
    if name == "softmax":
        if matryoshka_dims:
            raise ValueError("matryoshka_dims applies to the embedding losses (mnrl, cached-mnrl, "
                             "cosent), not to softmax, whose head needs the full embedding")
        if not num_labels or num_labels < 2:
            raise ValueError(f"the softmax loss needs num_labels >= 2 (got {num_labels})")
        return SoftmaxLoss(num_labels, pool)
    if num_labels is not None:
        raise ValueError(f"num_labels applies to the softmax loss, not {name!r}")
    if scale <= 0:
        raise ValueError(f"scale={scale} must be positive")
    dims = tuple(int(d) for d in matryoshka_dims) if matryoshka_dims else None
    if dims and (min(dims) < 1 or len(set(dims)) != len(dims)):
        raise ValueError(f"matryoshka_dims {dims}: positive and distinct")
    return EmbeddingLoss(name, float(scale), symmetric, mini_batch_size, dims, pool)
