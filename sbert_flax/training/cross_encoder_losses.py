"""The cross-encoder losses on logits: what `--loss ce-bce | ce-softmax | ce-listwise` trains.

A cross-encoder reads a (query, document) pair as one sequence, `[CLS] a [SEP] b [SEP]`, and
gives logits [num_labels] from its pooled [CLS] state. The three losses, each equal to
sentence-transformers' cross-encoder loss on the same logits (tests/training/
test_cross_encoder_training.py feeds both the same numbers):

- `ce-bce`: one logit per (text_a, text_b) pair, label 0/1, sigmoid cross-entropy
  (`cross_encoder.losses.BinaryCrossEntropyLoss`, `BCEWithLogitsLoss`).
- `ce-softmax`: `num_labels` logits per pair, softmax cross-entropy on the label id (UER-py's
  run_classifier recipe on NLI pairs; `cross_encoder.losses.CrossEntropyLoss`).
- `ce-listwise`: one logit per (anchor, candidate) pair over [positive, negative_1 .. negative_n]
  (the rows `sbert-flax mine-negatives` writes, n-tuple or triplet), softmax cross-entropy with
  the positive as the label: sentence-transformers' cross-encoder
  `MultipleNegativesRankingLoss.calculate_loss` on those logits with `activation_fn=None`,
  `scale=1`. That loss also scores each anchor against other rows' documents (in-batch
  negatives, a random subset); here only the row's own mined negatives are candidates, since
  every extra candidate is one more forward pass of the cross-encoder.

Every function weights rows by `weights` (0 for the rows that pad a batch): a pad row changes
neither the loss nor its gradient, and the mean is over real rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbert_flax.models.config import BertConfig
from sbert_flax.models.cross_encoder import ClassifierConfig, SequenceClassifier
from sbert_flax.training.siamese import ModelDef, abstract_model_def
from sbert_flax.training.train_config import CROSS_ENCODER_LOSSES

Array = jax.Array
Batch = dict[str, Array]
# The candidate column of the pair losses: (text_a, text_b) rows are one (query, document) pair.
PAIR = "pair"


def _weighted_mean(per_row: Array, weights: Array) -> Array:
    # jnp.where, not a product alone: a pad row's loss may be inf / NaN-free garbage and must
    # contribute exactly 0.
    total = jnp.sum(jnp.where(weights > 0, per_row * weights, 0.0))
    return total / jnp.maximum(jnp.sum(weights), 1e-9)


def binary_cross_entropy(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict]:
    """Sigmoid cross-entropy of logits [B] against labels [B] in [0, 1] (torch's
    `BCEWithLogitsLoss`: max(x, 0) - x y + log(1 + exp(-|x|)), stable for any x).

    Returns:
      (weighted mean loss, {"accuracy": share of real rows with (logit > 0) == (label > 0.5)}).
    """
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    per = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    correct = ((x > 0) == (y > 0.5)).astype(jnp.float32)
    return _weighted_mean(per, weights), {"accuracy": _weighted_mean(correct, weights)}


def softmax_cross_entropy(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict]:
    """Softmax cross-entropy of logits [B, C] against class ids [B] (torch's `CrossEntropyLoss`).

    Returns:
      (weighted mean loss, {"accuracy": share of real rows whose argmax is the label}).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _weighted_mean(nll, weights), {"accuracy": _weighted_mean(correct, weights)}


def listwise_cross_entropy(logits: Array, weights: Array) -> tuple[Array, dict]:
    """Softmax cross-entropy over each row's candidates, logits [B, 1 + n] with the positive in
    column 0 and the row's negatives after it.

    Returns:
      (weighted mean loss, {"accuracy": share of real rows whose positive scores highest}).
    """
    x = logits.astype(jnp.float32)
    per = jax.nn.logsumexp(x, axis=-1) - x[:, 0]
    correct = (jnp.argmax(x, axis=-1) == 0).astype(jnp.float32)
    return _weighted_mean(per, weights), {"accuracy": _weighted_mean(correct, weights)}


# ---- the loss object the trainer runs ------------------------------------------------------------

def candidate_columns(batch: Batch) -> tuple[str, ...]:
    """The batch's candidate columns in logit order: `pair`, or `positive` then the negatives
    (`negative`, or `negative_1 .. negative_n` numerically: negative_2 before negative_10)."""
    if f"{PAIR}_ids" in batch:
        return (PAIR,)
    negatives = sorted((k[:-len("_ids")] for k in batch
                        if k.startswith("negative") and k.endswith("_ids")),
                       key=lambda c: (len(c), c))
    return ("positive", *negatives)


@dataclasses.dataclass(frozen=True)
class CrossEncoderLoss:
    """A cross-encoder (`models.cross_encoder.SequenceClassifier`) trained on pairs.

    Batches (`cross_encoder_batches.PairBatchBuilder`) hold one padded pair per row and candidate
    column c: `{c}_ids`, `{c}_mask`, `{c}_types` int32 [B, L] (`[CLS] query [SEP] document
    [SEP]`, all columns one length L), `weights` [B] and, for the pair losses, `labels` [B].

    Attributes:
      name: "ce-bce" | "ce-softmax" | "ce-listwise".
      num_labels: logits per pair (1, except ce-softmax's classes).
      classifier_dropout: dropout before the classifier; None: the backbone's hidden dropout.
    """

    name: str
    num_labels: int = 1
    classifier_dropout: float | None = None
    # One pair per row at one padded length for every candidate column.
    joint_length: ClassVar[bool] = True

    @property
    def target(self) -> str | None:
        return None if self.name == "ce-listwise" else "labels"

    @property
    def head(self) -> ClassifierConfig:
        return ClassifierConfig(self.num_labels, self.classifier_dropout)

    def text_columns(self, has_negative: bool | tuple[str, ...] = False) -> tuple[str, ...]:
        """The training file's text columns: (text_a, text_b), or (anchor, positive, negatives)
        for ce-listwise (`has_negative`: the negative columns the file has)."""
        if self.name != "ce-listwise":
            if has_negative:
                raise ValueError(f"the {self.name} loss takes (text_a, text_b, label) rows; no "
                                 "negative column")
            return ("text_a", "text_b")
        if not has_negative:
            raise ValueError("the ce-listwise loss ranks each anchor's positive above its "
                             "negatives: it needs a negative column (a triplet, or negative_1 .. "
                             "negative_n as `sbert-flax mine-negatives` writes them)")
        negs = has_negative if isinstance(has_negative, tuple) else ("negative",)
        return ("anchor", "positive", *negs)

    def model_def(self, cfg: BertConfig, pooling: Any = None, dtype: Any = jnp.float32
                  ) -> ModelDef:
        del pooling  # the [CLS] state through the pooler: a cross-encoder has no pooling mode
        return abstract_model_def(
            lambda rngs: SequenceClassifier(cfg, self.head, rngs=rngs, dtype=dtype))

    def initial_params(self, start_params: dict, cfg: BertConfig, seed: int) -> dict:
        """The params the run starts from: `start_params` is the whole classifier
        (`cross_encoder_start.load_start`: backbone, pooler, classifier; a new head was drawn
        from the run's seed there)."""
        del cfg, seed
        return jax.tree.map(np.asarray, dict(start_params))

    def logits(self, graphdef: nnx.GraphDef, params: Any, batch: Batch,
               dropout_key: Array | None) -> Array:
        """Float32 logits [B, P, num_labels] of the batch's P candidate columns."""
        names = candidate_columns(batch)
        ids, mask, types = (jnp.stack([batch[f"{c}_{k}"] for c in names], axis=1)
                            for k in ("ids", "mask", "types"))  # [B, P, L]
        b, p, length = ids.shape
        # Rows stay contiguous per example, so the reshape keeps the batch split over devices.
        flat = nnx.merge(graphdef, params)(ids.reshape(b * p, length), mask.reshape(b * p, length),
                                           types.reshape(b * p, length), dropout_key=dropout_key)
        return flat.reshape(b, p, -1)

    def objective(self, logits: Array, batch: Batch) -> tuple[Array, dict[str, Array]]:
        """The loss and metrics of logits [B, P, C]."""
        w = batch["weights"]
        if self.name == "ce-bce":
            return binary_cross_entropy(logits[:, 0, 0], batch["labels"], w)
        if self.name == "ce-softmax":
            return softmax_cross_entropy(logits[:, 0], batch["labels"], w)
        return listwise_cross_entropy(logits[..., 0], w)

    def value_and_grad(self, graphdef: nnx.GraphDef, params: Any, batch: Batch,
                       dropout_key: Array | None) -> tuple[Array, Any, dict[str, Array]]:
        def loss_fn(p):
            return self.objective(self.logits(graphdef, p, batch, dropout_key), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, metrics


def make_cross_encoder_loss(name: str, num_labels: int | None = None,
                            classifier_dropout: float | None = None) -> CrossEncoderLoss:
    """The cross-encoder loss `name`; `num_labels` is the classes of the training labels (ce-bce:
    2 at most, ce-softmax: its head size, ce-listwise: unused).

    Raises:
      ValueError: an unknown name, or labels the loss cannot take.
    """
    if name not in CROSS_ENCODER_LOSSES:
        raise ValueError(f"unknown cross-encoder loss {name!r}; expected one of "
                         f"{CROSS_ENCODER_LOSSES}")
    if name == "ce-softmax":
        if not num_labels or num_labels < 2:
            raise ValueError(f"the ce-softmax loss needs num_labels >= 2 (got {num_labels})")
        return CrossEncoderLoss(name, num_labels, classifier_dropout)
    if name == "ce-bce" and num_labels is not None and num_labels > 2:
        raise ValueError(f"the ce-bce loss takes labels 0 and 1, the training labels go up to "
                         f"{num_labels - 1}; train several classes with --loss ce-softmax")
    return CrossEncoderLoss(name, 1, classifier_dropout)
