"""BERT encoder in Flax NNX: token ids in, hidden states out (no pooler: UER's conversion never
writes one, and sentence embeddings are pooled from the last hidden states).

Numerics follow Hugging Face `BertModel` exactly in float32: post-LN layers, exact erf GELU,
LayerNorm eps from the config (1e-12), additive attention mask. With `dtype=bfloat16` the matmuls run
in bf16 while params stay float32 and softmax / LayerNorm statistics stay float32.

Every parameter carries logical axis names (`out_sharding` metadata, e.g. ("embed", "mlp")); a rules table
in `sharding.py` maps them onto a mesh. The model never sees a mesh. Eager sharding is off so the
model can be built outside any mesh context (inference on one device, tests, conversion).

Dropout takes an explicit PRNG key argument instead of NNX Rngs state: the model state is then just
parameters, which keeps the jitted train step a pure function of (params, batch, key).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sbert_flax.common import sharding
from sbert_flax.models import splash_attention as splash
from sbert_flax.models.config import BertConfig

Array = jax.Array

# Mask fill for padded keys. Finite (not finfo.min) so a row whose keys are all masked -- the
# zero-weight rows that pad a batch -- gives a uniform softmax instead of NaN.
_MASK_VALUE = -1e30


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init: str, std: float = 0.02) -> nnx.Param:
    if init == "normal":
        key = rngs.params() if rngs is not None else jax.random.key(0)
        value = std * jax.random.normal(key, shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def exact_gelu(x: Array) -> Array:
    """HF's "gelu": x/2 * (1 + erf(x/sqrt 2)), the formula torch uses.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU evaluates 1.6x slower than
    erf ([4096, 3072] f32: 47 vs 30 ms); the erf form's error against a float64 reference is
    1.1e-6, the same as torch's own float32 GELU (1.3e-6).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def activation(name: str):
    """HF activation names -> functions. "gelu" is HF's exact erf GELU."""
    if name == "gelu":
        return exact_gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}")


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; identity when `key` is None (inference) or rate is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _split(key: Array | None, n: int) -> list[Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics whatever the compute dtype (bf16 variance underflows)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = _param(None, (dim,), ("norm",), "ones")
        self.bias = _param(None, (dim,), ("norm",), "zeros")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        std = cfg.initializer_range
        d = cfg.hidden_size
        self.word_embeddings = _param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), "normal", std)
        self.position_embeddings = _param(rngs, (cfg.max_position_embeddings, d), (None, "embed"),
                                          "normal", std)
        self.token_type_embeddings = _param(rngs, (cfg.type_vocab_size, d), (None, "embed"),
                                            "normal", std)
        self.layer_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, input_ids: Array, token_type_ids: Array, positions: Array | None,
                 dtype: jnp.dtype, dropout_key: Array | None) -> Array:
        seq_len = input_ids.shape[1]
        pos = (self.position_embeddings[...][None, :seq_len] if positions is None
               else jnp.take(self.position_embeddings[...], positions, axis=0))
        x = (jnp.take(self.word_embeddings[...], input_ids, axis=0)
             + jnp.take(self.token_type_embeddings[...], token_type_ids, axis=0)
             + pos)  # [B, L, D], summed in f32 like HF
        x = self.layer_norm(x).astype(dtype)
        return dropout(x, self.dropout_rate, dropout_key)


class AttentionMask(NamedTuple):
    """What attention masks by: the dense boolean mask ([B, 1, 1, L] over keys, or [B, 1, L, L]
    block-diagonal for packed rows) and, for packed rows, their segment ids [B, L] (the splash
    kernel's form of the same mask). A pytree, so it passes through remat and scan as an array."""

    dense: Array
    segment_ids: Array | None = None


class SelfAttention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection (one GEMM instead of three)."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        std = cfg.initializer_range
        self.num_heads, self.head_dim = h, hd
        self.qkv_kernel = _param(rngs, (d, 3, h, hd), ("embed", None, "heads", "kv"), "normal", std)
        self.qkv_bias = _param(None, (3, h, hd), (None, "heads", "kv"), "zeros")
        self.out_kernel = _param(rngs, (h, hd, d), ("heads", "kv", "embed"), "normal", std)
        self.out_bias = _param(None, (d,), ("embed",), "zeros")
        self.attn_dropout_rate = cfg.attention_probs_dropout_prob
        self.dropout_rate = cfg.hidden_dropout_prob
        # None (XLA; splash on TPU for packed rows, see splash.use_splash), "xla", "cudnn",
        # "splash" or "splash-interpret"; set by BertModel.
        self.attention_impl: str | None = None

    def __call__(self, x: Array, mask: AttentionMask, dropout_key: Array | None) -> Array:
        b, seq, d = x.shape
        dtype = x.dtype
        k_attn, k_out = _split(dropout_key, 2)
        # 2-D GEMMs ([B*L, D] x [D, 3D]) hit XLA:CPU's fastest matmul path.
        qkv = x.reshape(b * seq, d) @ self.qkv_kernel[...].reshape(d, 3 * d).astype(dtype)
        qkv = (qkv + self.qkv_bias[...].reshape(3 * d).astype(dtype))
        qkv = qkv.reshape(b, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
        impl = self.attention_impl
        if (k_attn is None or self.attn_dropout_rate <= 0.0) and splash.use_splash(
                impl, seq, mask.segment_ids is not None):
            # Packed rows on TPU: the Pallas splash kernel, segment ids instead of a dense mask.
            ctx = splash.splash_attention(q, k, v, mask.segment_ids,
                                          interpret=impl == "splash-interpret")
        elif k_attn is None or self.attn_dropout_rate <= 0.0:
            # Inference: the fused attention op (cuDNN flash attention on GPU when
            # `attention_impl="cudnn"`, XLA elsewhere); f32 logits and softmax either way.
            dense = mask.dense
            if impl == "cudnn" and dense.shape[1:] != (self.num_heads, seq, seq):
                # cuDNN's batching rule reshapes a vmapped mask to [B, heads, L, L] and fails on
                # a head-broadcast one (the train step vmaps the model over rows): spell the
                # heads out. A bool [B, H, L, L] is small next to the activations.
                dense = jnp.broadcast_to(dense, (b, self.num_heads, seq, seq))
            ctx = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=self.head_dim ** -0.5,
                                               implementation=None if impl in splash.IMPLS else impl)
        else:
            # Training with attention dropout, which jax.nn.dot_product_attention does not do.
            q = q * jnp.asarray(self.head_dim ** -0.5, dtype)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            scores = jnp.where(mask.dense, scores, _MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1)  # f32 softmax, [B, H, L, L]
            probs = dropout(probs, self.attn_dropout_rate, k_attn).astype(dtype)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        ctx = ctx.reshape(b * seq, d)
        out = ctx @ self.out_kernel[...].reshape(d, d).astype(dtype) + self.out_bias[...].astype(dtype)
        return dropout(out.reshape(b, seq, d), self.dropout_rate, k_out)


class MLP(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        std = cfg.initializer_range
        self.wi_kernel = _param(rngs, (d, f), ("embed", "mlp"), "normal", std)
        self.wi_bias = _param(None, (f,), ("mlp",), "zeros")
        self.wo_kernel = _param(rngs, (f, d), ("mlp", "embed"), "normal", std)
        self.wo_bias = _param(None, (d,), ("embed",), "zeros")
        self.act = activation(cfg.hidden_act)
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, x: Array, dropout_key: Array | None) -> Array:
        b, seq, d = x.shape
        dtype = x.dtype
        h = x.reshape(b * seq, d) @ self.wi_kernel[...].astype(dtype) + self.wi_bias[...].astype(dtype)
        # The widest activation: rows split, its "mlp" dim whole (the weights' split is not its).
        h = sharding.constrain_rows(self.act(h).reshape(b, seq, -1)).reshape(b * seq, -1)
        out = h @ self.wo_kernel[...].astype(dtype) + self.wo_bias[...].astype(dtype)
        return dropout(out.reshape(b, seq, d), self.dropout_rate, dropout_key)


class Layer(nnx.Module):
    """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs)
        self.attention_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = MLP(cfg, rngs)
        self.output_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: Array, mask: AttentionMask, dropout_key: Array | None) -> Array:
        k_attn, k_mlp = _split(dropout_key, 2)
        # Rows split over the batch axes, features whole, under a declared mesh (see
        # sharding.constrain_rows: with fsdp params XLA may otherwise gather the batch).
        x = sharding.constrain_rows(x)
        x = self.attention_norm(x + self.attention(x, mask, k_attn))
        return sharding.constrain_rows(self.output_norm(x + self.mlp(x, k_mlp)))


class BertModel(nnx.Module):
    """Backbone: ids in, last hidden states out.

    Args:
      cfg: architecture.
      rngs: initialisation randomness (converted weights overwrite it).
      dtype: compute dtype of activations and matmuls; params stay float32.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embeddings = Embeddings(cfg, rngs)
        self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    @property
    def attention_impl(self) -> str | None:
        return self.layers[0].attention.attention_impl if len(self.layers) else None

    @attention_impl.setter
    def attention_impl(self, impl: str | None) -> None:
        for layer in self.layers:
            layer.attention.attention_impl = impl

    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
                 *, segment_ids: Array | None = None, positions: Array | None = None,
                 dropout_key: Array | None = None) -> Array:
        """Returns the last hidden states [B, L, D] in the compute dtype.

        Args:
          input_ids: [B, L] token ids.
          attention_mask: [B, L], 1 for real tokens (right padding).
          token_type_ids: [B, L] segment (A/B) ids; default all 0.
          segment_ids: packed rows ([B, L], 1..k per packed sentence, 0 padding): attention is
            block-diagonal, each sentence sees only itself. None: one sentence per row.
          positions: [B, L] position ids (restarting at 0 per packed sentence); default 0..L-1.
          dropout_key: dropout runs iff given (training); inference passes None.
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        keys = _split(dropout_key, len(self.layers) + 1)
        if segment_ids is None:
            mask = AttentionMask(attention_mask[:, None, None, :] > 0)  # [B, 1, 1, L] over keys
        else:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = AttentionMask((same & (segment_ids[:, None, :] > 0))[:, None],  # [B, 1, L, L]
                                 segment_ids)
        x = self.embeddings(input_ids, token_type_ids, positions, self.dtype, keys[0])
        if self.config.scan_layers and len(self.layers) > 1:
            return self._scan_layers(x, mask, None if dropout_key is None else jnp.stack(keys[1:]))
        for layer, key in zip(self.layers, keys[1:], strict=True):
            if self.config.remat:
                # Keep only each layer's input for the backward pass; recompute the rest. A pure
                # function of the layer's split state under jax.checkpoint (as _scan_layers does):
                # nnx.remat over the module itself raises TraceContextError when the model is
                # called under jax.vmap, as the train step calls it over rows.
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(
                    lambda st, h, m, k, g=graphdef: nnx.merge(g, st)(h, m, k))(state, x, mask, key)
            else:
                x = layer(x, mask, key)
        return x

    def _scan_layers(self, x: Array, mask: AttentionMask, keys: Array | None) -> Array:
        """The layers as one `lax.scan` over their params stacked on a leading axis.

        The params stay one entry per layer (the checkpoint and weight-map layout); the stack is
        built inside the jitted function (one params-sized copy, freed after the step), and the
        gradient flows back through it to each layer's entry.
        """
        graphdef, _ = nnx.split(self.layers[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(lyr) for lyr in self.layers])

        def body(h: Array, xs) -> tuple[Array, None]:
            state, key = xs
            return nnx.merge(graphdef, state)(h, mask, key), None

        if self.config.remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, (stacked, keys))
        return x


def abstract_model(cfg: BertConfig, dtype: jnp.dtype = jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """The backbone's structure and abstract param shapes, without allocating weights."""
    return nnx.split(nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0), dtype=dtype)))
