"""`SentenceEmbedder`: backbone + pooling + optional normalize -- the one module that `encode`,
training (every loss wraps it) and serving all run.

Two ways in:

- `__call__(ids, mask)`: one sentence per row, right-padded ([B, L] -> [B, D]). The softmax
  recipe's training uses it, and so does anything that embeds a padded batch.
- `embed_packed(ids, segments, positions, slots)`: several sentences per row (sequence packing,
  block-diagonal attention, positions restarting per sentence), pooled per sentence into
  `[B, slots, D]`. Inference and the embedding losses' training use it: a packed batch wastes
  almost no token slots on padding.

Both run the same backbone and the same pooling rules (sentence-transformers' clamped mean,
-1e9-filled max, first token), so a sentence embeds the same either way (up to float rounding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbert_flax.models.bert import BertModel
from sbert_flax.models.config import BertConfig, PoolingConfig, WeightsError
from sbert_flax.models.pooling import l2_normalize, pool

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST  # f32 pooling sums stay f32 on TPU (default is bf16 passes)


class SentenceEmbedder(nnx.Module):
    """Sentence vectors from token ids.

    Args:
      cfg: backbone architecture.
      pooling: pooling mode and whether the model L2-normalises (sentence-transformers' Normalize).
      rngs: initialisation randomness (converted weights overwrite it).
      dtype: compute dtype of the backbone; params, pooling and outputs stay float32.
    """

    def __init__(self, cfg: BertConfig, pooling: PoolingConfig, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.backbone = BertModel(cfg, rngs=rngs, dtype=dtype)
        self.pooling = pooling.mode
        self.normalize = bool(pooling.normalize)

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    def _finish(self, emb: Array) -> Array:
        return l2_normalize(emb) if self.normalize else emb

    def __call__(self, ids: Array, mask: Array, *, dropout_key: Array | None = None) -> Array:
        """Pooled float32 [B, D] for right-padded rows; dropout iff `dropout_key` is given."""
        hidden = self.backbone(ids, mask, dropout_key=dropout_key)  # [B, L, D]
        return self._finish(pool(hidden, mask, self.pooling))

    def tokens(self, ids: Array, mask: Array, *, segments: Array | None = None,
               positions: Array | None = None) -> Array:
        """Last hidden states as float32 [B, L, D] (padded or packed rows)."""
        return self.backbone(ids, mask, segment_ids=segments, positions=positions).astype(jnp.float32)

    def embed_packed(self, ids: Array, segments: Array, positions: Array, slots: int, *,
                     dropout_key: Array | None = None) -> Array:
        """Pooled float32 [B, slots, D] for packed rows; dropout iff `dropout_key` is given.

        Args:
          ids: [B, L] token ids, several sentences per row.
          segments: [B, L] int32, k (1..slots) for the tokens of the row's k-th sentence, 0 padding.
          positions: [B, L] int32 position ids restarting at 0 at each sentence's [CLS].
          slots: static, the most sentences one row may hold; unused slots hold garbage that the
            caller drops (they are finite zeros for cls/mean, and zeros for max).
        """
        mask = (segments > 0).astype(jnp.int32)
        hidden = self.backbone(ids, mask, segment_ids=segments, positions=positions,
                               dropout_key=dropout_key).astype(jnp.float32)  # [B, L, D]
        onehot = (segments[:, :, None] == jnp.arange(1, slots + 1)[None, None, :])  # [B, L, S]
        onehot = onehot.astype(jnp.float32)
        if self.pooling == "cls":
            first = onehot * (positions == 0)[:, :, None].astype(jnp.float32)
            emb = jnp.einsum("bls,bld->bsd", first, hidden, precision=_HIGHEST)
        elif self.pooling == "mean":
            summed = jnp.einsum("bls,bld->bsd", onehot, hidden, precision=_HIGHEST)
            count = jnp.clip(jnp.sum(onehot, axis=1), 1e-9, None)[..., None]  # [B, S, 1]
            emb = summed / count
        elif self.pooling == "max":
            def row_max(h: Array, seg: Array) -> Array:
                return jax.ops.segment_max(h, seg, num_segments=slots + 1)[1:]

            emb = jax.vmap(row_max)(hidden, segments)
            emb = jnp.where(jnp.isfinite(emb), emb, 0.0)  # empty slots
        else:
            raise ValueError(f"unknown pooling mode {self.pooling!r}")
        return self._finish(emb)


def abstract_embedder(cfg: BertConfig, pooling: PoolingConfig, dtype: Any = jnp.float32
                      ) -> tuple[nnx.GraphDef, nnx.State]:
    """The embedder's structure and abstract params, without allocating weights."""
    model = nnx.eval_shape(lambda: SentenceEmbedder(cfg, pooling, rngs=nnx.Rngs(0), dtype=dtype))
    return nnx.split(model)


def embedder_params(backbone: dict) -> dict:
    """The embedder's pure-dict params around a backbone's (`weights.hf_to_flax` output)."""
    return {"backbone": backbone}


def check_param_shapes(want: Any, params: dict, source: str) -> None:
    """`params` holds exactly the leaves of `want` (an abstract or concrete tree), each with its
    shape; errors name the path (`source`: the file or folder they came from).

    Raises:
      WeightsError: params missing or unexpected (the first five), or a shape that differs.
    """
    want_shapes = {jax.tree_util.keystr(p): v.shape
                   for p, v in jax.tree_util.tree_leaves_with_path(want)}
    have = {jax.tree_util.keystr(p): np.shape(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(set(want_shapes) - set(have)), sorted(set(have) - set(want_shapes))
    if missing or extra:
        raise WeightsError(f"{source}: params missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in want_shapes.items():
        if tuple(have[k]) != tuple(shape):
            raise WeightsError(f"{source}: param {k} has shape {have[k]}, config needs {shape}")


def check_backbone_params(params: dict, cfg: BertConfig, source: str) -> None:
    """Every backbone param present with the config's shape, nothing extra; errors name the path."""
    _, abstract = abstract_embedder(cfg, PoolingConfig())
    check_param_shapes(nnx.to_pure_dict(abstract)["backbone"], params, source)
