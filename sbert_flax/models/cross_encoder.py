"""`SequenceClassifier`: the BERT backbone + pooler + linear classifier, scoring sentence pairs.

The layout and maths of Hugging Face `BertForSequenceClassification` (what sentence-transformers'
`CrossEncoder` runs for a BERT): `[CLS] a [SEP] b [SEP]` with token types 0 / 1, the first token's
last hidden state through the BERT pooler (dense + tanh), dropout, then a dense layer to
`num_labels` logits. Our backbone has no pooler (UER's sentence-BERT conversion never wrote one),
so it lives here, next to the classifier.

Two ways in, as `SentenceEmbedder` has:

- `__call__(ids, mask, token_types)`: one pair per row, right-padded: logits [B, num_labels].
- `score_packed(ids, token_types, segments, positions, slots)`: several pairs per row (block-
  diagonal attention, positions restarting per pair): logits [B, slots, num_labels], read at each
  pair's first token. Inference uses it; a pair scores the same either way (up to float rounding).

The head runs in float32 whatever the backbone's compute dtype: it is two small matmuls, and the
logits are what a ranking compares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbert_flax.models.bert import BertModel, dropout
from sbert_flax.models.config import BertConfig, ConfigError
from sbert_flax.models.embedder import check_param_shapes

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST  # f32 head matmuls and the [CLS] gather stay f32 on TPU


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The head on top of the backbone (HF `BertForSequenceClassification`'s own fields).

    Attributes:
      num_labels: logits per pair; 1 is a relevance score (sentence-transformers' rerankers).
      classifier_dropout: dropout before the classifier in training; None uses the backbone's
        hidden_dropout_prob, as HF does.
    """

    num_labels: int = 1
    classifier_dropout: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) \
                or self.num_labels < 1:
            raise ConfigError(f"num_labels={self.num_labels!r} must be a positive integer")

    def dropout_rate(self, cfg: BertConfig) -> float:
        return cfg.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout


class Dense(nnx.Module):
    """y = x @ kernel + bias with float32 params ([in, out] kernel: torch's Linear transposed)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], std: float,
                 rngs: nnx.Rngs):
        init = std * jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32)
        self.kernel = nnx.Param(init, out_sharding=axes, eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32), out_sharding=(axes[1],),
                              eager_sharding=False)

    def __call__(self, x: Array) -> Array:
        return jnp.dot(x, self.kernel[...], precision=_HIGHEST) + self.bias[...]


class SequenceClassifier(nnx.Module):
    """Pair logits from token ids: backbone -> [CLS] -> pooler (dense + tanh) -> classifier.

    Args:
      cfg: backbone architecture.
      head: number of labels and the classifier's dropout.
      rngs: initialisation randomness (converted weights overwrite it; a new head keeps it:
        normal(0, initializer_range) kernels and zero biases, as HF initialises them).
      dtype: compute dtype of the backbone; params, the head and the logits stay float32.
    """

    def __init__(self, cfg: BertConfig, head: ClassifierConfig, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.backbone = BertModel(cfg, rngs=rngs, dtype=dtype)
        self.pooler = Dense(d, d, ("embed", None), std, rngs)
        self.classifier = Dense(d, head.num_labels, ("embed", None), std, rngs)
        self.num_labels = head.num_labels
        self.dropout_rate = head.dropout_rate(cfg)

    def head(self, first: Array, dropout_key: Array | None = None) -> Array:
        """Logits [..., num_labels] from first-token states [..., D] (the pooler and classifier)."""
        pooled = jnp.tanh(self.pooler(first.astype(jnp.float32)))
        return self.classifier(dropout(pooled, self.dropout_rate, dropout_key))

    def __call__(self, ids: Array, mask: Array, token_types: Array | None = None, *,
                 dropout_key: Array | None = None) -> Array:
        """Float32 logits [B, num_labels] for right-padded rows, one pair each.

        Args:
          ids: [B, L] token ids, `[CLS] a [SEP] b [SEP]` then padding.
          mask: [B, L], 1 for real tokens.
          token_types: [B, L], 0 for `[CLS] a [SEP]`, 1 for `b [SEP]` (and padding); default 0.
          dropout_key: dropout runs iff given (training).
        """
        k_body, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        hidden = self.backbone(ids, mask, token_types, dropout_key=k_body)  # [B, L, D]
        return self.head(hidden[:, 0], k_head)

    def score_packed(self, ids: Array, token_types: Array, segments: Array, positions: Array,
                     slots: int, *, dropout_key: Array | None = None) -> Array:
        """Float32 logits [B, slots, num_labels] for packed rows; slot k-1 is the row's k-th pair.

        Args:
          ids, token_types: [B, L] int32, several pairs per row.
          segments: [B, L] int32, k (1..slots) for the tokens of the row's k-th pair, 0 padding;
            attention stays within a pair.
          positions: [B, L] int32 position ids restarting at 0 at each pair's [CLS].
          slots: static, the most pairs one row may hold; empty slots give the logits of a zero
            state, which the caller drops.
          dropout_key: dropout runs iff given (training).
        """
        k_body, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        mask = (segments > 0).astype(jnp.int32)
        hidden = self.backbone(ids, mask, token_types, segment_ids=segments, positions=positions,
                               dropout_key=k_body)  # [B, L, D]
        first = ((segments[:, :, None] == jnp.arange(1, slots + 1)[None, None, :])
                 & (positions == 0)[:, :, None]).astype(jnp.float32)  # [B, L, S]
        # One nonzero term per slot: exactly the [CLS] state, at HIGHEST precision.
        cls = jnp.einsum("bls,bld->bsd", first, hidden.astype(jnp.float32), precision=_HIGHEST)
        return self.head(cls, k_head)


def abstract_classifier(cfg: BertConfig, head: ClassifierConfig, dtype: Any = jnp.float32
                        ) -> tuple[nnx.GraphDef, nnx.State]:
    """The classifier's structure and abstract params, without allocating weights."""
    return nnx.split(nnx.eval_shape(
        lambda: SequenceClassifier(cfg, head, rngs=nnx.Rngs(0), dtype=dtype)))


def init_head_params(cfg: BertConfig, num_labels: int, seed: int = 0) -> dict:
    """A new head as HF initialises one: {"pooler": ..., "classifier": ...} of numpy arrays."""
    kp, kc = jax.random.split(jax.random.key(seed))
    d, std = cfg.hidden_size, cfg.initializer_range

    def dense(key: Array, d_out: int) -> dict:
        return {"kernel": np.asarray(std * jax.random.normal(key, (d, d_out), jnp.float32)),
                "bias": np.zeros((d_out,), np.float32)}

    return {"pooler": dense(kp, d), "classifier": dense(kc, num_labels)}


def check_classifier_params(params: dict, cfg: BertConfig, head: ClassifierConfig,
                            source: str) -> None:
    """Every param present with the config's shape, nothing extra; errors name the path."""
    _, abstract = abstract_classifier(cfg, head)
    check_param_shapes(nnx.to_pure_dict(abstract), params, source)
