"""The NNX backbone against Hugging Face `BertModel` (PyTorch), layer pieces included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.models.bert import BertModel, LayerNorm, abstract_model, activation
from sbert_flax.models.config import BertConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300  # small: these tests feed random ids, no tokenizer needed


def _hf_model(seed=0, **kw):
    """A random HF BertModel with every tensor perturbed (biases and LayerNorms too)."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, type_vocab_size=2, max_position_embeddings=64,
                                  **kw)
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "LayerNorm.weight" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model


def _flax_model(hf_model, dtype=jnp.float32) -> BertModel:
    cfg = BertConfig.from_hf_dict(hf_model.config.to_dict())
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, weights.hf_to_flax(sd, cfg))
    model = nnx.merge(graphdef, state)
    model.dtype = jnp.dtype(dtype)
    return model


@nnx.jit
def _run(model, ids, mask, types, dropout_key=None):
    # One compiled program per call shape; eager NNX would compile every primitive separately.
    return model(ids, mask, types, dropout_key=dropout_key)


def _inputs(b=4, length=19, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (b, length)).astype(np.int32)
    lengths = np.array([length, 1, 7, 12])[:b]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    types = np.where(np.arange(length)[None] >= lengths[:, None] // 2, 1, 0) * mask
    return ids, mask, types.astype(np.int32)


CONFIGS = {
    "h60-5heads-1layer-gelu": dict(hidden_size=60, num_attention_heads=5, num_hidden_layers=1,
                                   intermediate_size=37, hidden_act="gelu"),
    "h48-3heads-3layers-relu": dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3,
                                    intermediate_size=50, hidden_act="relu"),
    "h32-4heads-2layers-gelu_new": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                        intermediate_size=37, hidden_act="gelu_new"),
    "h32-2heads-eps1e-5-tanh": dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                    intermediate_size=64, hidden_act="gelu_pytorch_tanh",
                                    layer_norm_eps=1e-5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_backbone_matches_hf(name):
    hf = _hf_model(**CONFIGS[name])
    model = _flax_model(hf)
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 token_type_ids=torch.from_numpy(types).long()).last_hidden_state.numpy()
    got = np.asarray(_run(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    real = mask > 0  # padded positions are garbage in both implementations
    assert np.abs(got[real] - ref[real]).max() <= 1e-5


def test_padding_content_does_not_leak():
    model = _flax_model(_hf_model(**CONFIGS["h48-3heads-3layers-relu"]))
    ids, mask, types = _inputs()
    junk = np.where(mask > 0, ids, 7).astype(np.int32)  # different ids under the padding
    a = np.asarray(_run(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    b = np.asarray(_run(model, jnp.asarray(junk), jnp.asarray(mask), jnp.asarray(types)))
    real = mask > 0
    # Masked keys get exp(-1e30 - max) == 0 exactly, so real tokens are unaffected bit for bit.
    np.testing.assert_array_equal(a[real], b[real])


def test_all_padding_row_is_finite():
    model = _flax_model(_hf_model(**CONFIGS["h32-4heads-2layers-gelu_new"]))
    ids, mask, types = _inputs()
    mask[1] = 0  # a zero-weight row that pads a batch
    out = np.asarray(_run(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    assert np.isfinite(out).all()


# ---- activation ---------------------------------------------------------------------------------

def test_gelu_is_exact_erf_form():
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    ours = np.asarray(activation("gelu")(jnp.asarray(x)))
    exact = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # erf form
    tanh = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    hf = transformers.activations.ACT2FN["gelu"](torch.from_numpy(x)).numpy()
    assert np.abs(ours - exact).max() <= 1e-6
    assert np.abs(ours - hf).max() <= 1e-6
    # Sensitivity: the tanh approximation is distinguishable at this tolerance.
    assert np.abs(exact - tanh).max() > 1e-4


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_mlp_block_matches_hf_layer(act):
    """Our MLP (dense -> act -> dense) vs HF's BertIntermediate + dense of BertOutput."""
    hf = _hf_model(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                   hidden_act=act)
    model = _flax_model(hf)
    # Large inputs put many pre-activations where erf and tanh GELU differ by > 1e-4.
    x = np.random.default_rng(0).normal(0, 4, (2, 5, 32)).astype(np.float32)
    layer = hf.encoder.layer[0]
    with torch.no_grad():
        ref = layer.output.dense(layer.intermediate(torch.from_numpy(x))).numpy()
    got = np.asarray(model.layers[0].mlp(jnp.asarray(x), None))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---- LayerNorm ----------------------------------------------------------------------------------

def test_layer_norm_eps_1e12_is_honoured():
    # Variance ~1e-10: an eps of 1e-6 (flax's default) or 1e-5 (torch's) would shrink the output
    # by orders of magnitude, 1e-12 barely changes it.
    x = (1e-5 * np.random.default_rng(0).normal(size=(3, 16))).astype(np.float32)
    ln = LayerNorm(16, eps=1e-12)
    ln.scale.set_value(jnp.asarray(np.linspace(0.5, 1.5, 16, dtype=np.float32)))
    ln.bias.set_value(jnp.asarray(np.linspace(-0.1, 0.1, 16, dtype=np.float32)))
    ref_ln = torch.nn.LayerNorm(16, eps=1e-12)
    with torch.no_grad():
        ref_ln.weight.copy_(torch.tensor(np.asarray(ln.scale.get_value())))
        ref_ln.bias.copy_(torch.tensor(np.asarray(ln.bias.get_value())))
        ref = ref_ln(torch.from_numpy(x)).numpy()
        ref_ln.eps = 1e-6
        wrong_eps = ref_ln(torch.from_numpy(x)).numpy()
    got = np.asarray(ln(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert np.abs(wrong_eps - ref).max() > 0.1  # the test can tell the eps values apart


@pytest.mark.parametrize("eps", [1e-12, 1e-7])
def test_config_eps_reaches_every_layer_norm(eps):
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, layer_norm_eps=eps)
    model = nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0)))
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, LayerNorm)]
    assert len(norms) == 1 + 2 * cfg.num_hidden_layers
    assert all(n.eps == eps for n in norms)
    assert BertConfig.from_hf_dict({"layer_norm_eps": eps}).layer_norm_eps == eps


# ---- dtypes, dropout, parameter metadata ---------------------------------------------------------

def test_bf16_compute_keeps_f32_params_and_stays_close():
    hf = _hf_model(**CONFIGS["h32-4heads-2layers-gelu_new"])
    f32 = _flax_model(hf)
    bf16 = _flax_model(hf, jnp.bfloat16)
    ids, mask, types = _inputs()
    a = np.asarray(_run(f32, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    out = _run(bf16, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    b = np.asarray(out, np.float32)
    real = mask > 0
    assert not np.array_equal(a[real], b[real])  # bf16 really ran
    # Post-LN states are O(1); bf16 keeps ~3 significant digits, two layers add a few ulps.
    assert np.abs(a[real] - b[real]).max() < 0.1


def test_dropout_only_with_key():
    hf = _hf_model(**CONFIGS["h32-4heads-2layers-gelu_new"])
    model = _flax_model(hf)
    ids, mask, types = _inputs()
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    plain = np.asarray(_run(model, *args))
    np.testing.assert_array_equal(plain, np.asarray(_run(model, *args)))
    k = jax.random.key(0)
    d1 = np.asarray(_run(model, *args, dropout_key=k))
    np.testing.assert_array_equal(d1, np.asarray(_run(model, *args, dropout_key=k)))
    assert not np.allclose(d1, plain)


def test_every_param_has_logical_axes():
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16)
    _, state = abstract_model(cfg)
    for path, var in nnx.to_flat_state(state):
        meta = var.get_metadata()
        axes = meta.get("sharding_names") or meta.get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path


@pytest.mark.parametrize("flags", [{"remat": True}, {"scan_layers": True},
                                   {"scan_layers": True, "remat": True}])
def test_remat_and_scan_layers_same_values_and_gradients(flags):
    # --remat recomputes each layer in the backward pass, --scan_layers runs the layers as one
    # lax.scan: the same numbers either way (dropout on), only memory / compile time change.
    import dataclasses

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    ids = jax.random.randint(jax.random.key(1), (3, 16), 1, VOCAB)
    mask = jnp.ones((3, 16), jnp.int32).at[1, 9:].set(0)
    key = jax.random.key(2)
    # A random projection of the output: a plain sum of squares of LayerNorm output is nearly
    # constant, and its near-zero gradient would compare float noise.
    proj = jax.random.normal(jax.random.key(3), (3, 16, 32))

    def loss_and_grad(c):
        graphdef, state = nnx.split(BertModel(c, rngs=nnx.Rngs(0)))

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p)(ids, mask, dropout_key=key) * proj)

        return jax.jit(jax.value_and_grad(loss))(state)

    (v0, g0), (v1, g1) = loss_and_grad(cfg), loss_and_grad(dataclasses.replace(cfg, **flags))
    assert abs(float(v0) - float(v1)) <= 1e-5 * abs(float(v0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert np.max(np.abs(np.asarray(b) - np.asarray(a))) <= 1e-5 * np.max(np.abs(np.asarray(a)))
    assert not {"remat", "scan_layers"} & set(cfg.to_hf_dict())


def test_remat_under_vmap_as_the_train_step_calls_it():
    # The train step calls the backbone under jax.vmap over rows: --remat must trace there (it
    # raised flax's TraceContextError when the layer itself went through nnx.remat) and give the
    # plain model's gradients.
    import dataclasses

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    ids = jax.random.randint(jax.random.key(1), (3, 16), 1, VOCAB)
    mask = jnp.ones((3, 16), jnp.int32).at[1, 9:].set(0)
    proj = jax.random.normal(jax.random.key(3), (3, 16, 32))

    def grads(c):
        graphdef, state = nnx.split(BertModel(c, rngs=nnx.Rngs(0)))

        def loss(p):
            model = nnx.merge(graphdef, p)
            out = jax.vmap(lambda i, m: model(i[None], m[None])[0])(ids, mask)
            return jnp.sum(out * proj)

        return jax.jit(jax.grad(loss))(state)

    g0, g1 = grads(cfg), grads(dataclasses.replace(cfg, remat=True))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert np.max(np.abs(np.asarray(b) - np.asarray(a))) <= 1e-5 * np.max(np.abs(np.asarray(a)))


def test_scan_layers_traces_one_layer_whatever_the_depth():
    def equations(layers, scan):
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                         scan_layers=scan)
        graphdef, state = nnx.split(BertModel(cfg, rngs=nnx.Rngs(0)))
        ids = jnp.ones((2, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(ids, jnp.ones_like(ids)))(state)
        return len(jaxpr.jaxpr.eqns)

    assert equations(4, False) > 1.8 * equations(2, False)  # unrolled: grows with depth
    assert equations(8, True) == equations(2, True)  # one stack per param, one scanned layer
