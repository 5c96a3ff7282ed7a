"""The Pallas splash attention kernel (`sbert_flax/models/splash_attention.py`) against the XLA path, on CPU.

Pallas's interpret mode runs the TPU kernel on any backend (`attention_impl="splash-interpret"`),
so the kernel's numerics, its gradient and the row split over a mesh are checked here; the TPU
compile itself is checked by tests/aot/test_aot_compile.py. Kept cheap: a 2-layer hidden-32 model,
rows of 128 tokens (the kernel's smallest).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.models import splash_attention as splash
from sbert_flax.models.bert import BertModel
from sbert_flax.models.config import BertConfig

L = 128  # the kernel's smallest row length


def packed_rows(rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(ids, segments, positions) [rows, length]: several sentences per row, padding at the end
    (a row of one sentence and a row of only short ones among them)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, (rows, length)).astype(np.int32)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = [length - 7] if r == 0 else sorted(rng.choice(np.arange(3, length - 9), 4, False))
        start = 0
        for s, end in enumerate(cuts, 1):
            seg[r, start:end] = s
            pos[r, start:end] = np.arange(end - start)
            start = end
    ids[seg == 0] = 0
    return ids, seg, pos


@pytest.fixture(scope="module")
def model() -> BertModel:
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=L, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg, rngs=nnx.Rngs(0))


def run(model: BertModel, impl: str | None, ids, seg, pos):
    """Hidden states and the gradient of a loss over real tokens, jitted, for `impl`."""
    model.attention_impl = impl
    graphdef, params = nnx.split(model)
    real = jnp.asarray(seg > 0)[..., None]
    # A fixed random read-out of the real tokens (not a sum of squares: that of a LayerNorm's
    # output hardly depends on its input, so its gradient would be rounding noise).
    weights = jax.random.normal(jax.random.key(1), (*seg.shape, model.config.hidden_size))

    @jax.jit
    def fwd_grad(params, ids, seg, pos):
        def loss(p):
            h = nnx.merge(graphdef, p)(ids, seg > 0, segment_ids=seg, positions=pos)
            return jnp.sum(jnp.where(real, h, 0.0) * weights), h

        (_, h), g = jax.value_and_grad(loss, has_aux=True)(params)
        return h, g

    return fwd_grad(params, ids, seg, pos)


def test_kernel_matches_xla_forward_and_gradient(model):
    ids, seg, pos = packed_rows(3, L)
    h_ref, g_ref = run(model, None, ids, seg, pos)
    h, g = run(model, "splash-interpret", ids, seg, pos)
    assert bool(jnp.isfinite(h).all())  # padding too: it attends to padding, never to nothing
    real = seg > 0
    np.testing.assert_allclose(np.asarray(h)[real], np.asarray(h_ref)[real], atol=2e-5, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-4)
    model.attention_impl = None


def _pallas_calls(model: BertModel, impl: str | None, ids, seg, pos, packed: bool = True) -> int:
    model.attention_impl = impl
    fn = lambda i, s, p: model(i, s > 0, segment_ids=s if packed else None, positions=p)  # noqa: E731
    text = str(jax.make_jaxpr(fn)(ids, seg, pos))
    model.attention_impl = None
    return text.count("pallas_call")


def test_falls_back_to_xla_where_the_kernel_does_not_apply(model):
    ids, seg, pos = packed_rows(2, L)
    assert _pallas_calls(model, "splash-interpret", ids, seg, pos) > 0
    # Rows of 64 tokens (not a multiple of the kernel's 128-lane tiles) and unpacked rows: XLA.
    short = tuple(a[:, :64] for a in packed_rows(2, 64))
    assert not splash.supports(64) and not splash.supports(200) and splash.supports(256)
    assert _pallas_calls(model, "splash-interpret", *short) == 0
    assert _pallas_calls(model, "splash-interpret", ids, seg, pos, packed=False) == 0
    h_ref, _ = run(model, None, *short)
    h, _ = run(model, "splash-interpret", *short)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h_ref))
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.splash_attention(*(jnp.zeros((1, 64, 2, 8)),) * 3, jnp.ones((1, 64), jnp.int32))


def _mesh(platform: str) -> AbstractMesh:
    return AbstractMesh((4,), ("data",),
                        abstract_device=AbstractDevice(device_kind="x", num_cores=None,
                                                       platform=platform))


def test_default_is_the_kernel_only_for_packed_rows_under_a_tpu_mesh():
    assert not splash.use_splash(None, L, True)  # no mesh declared: XLA, as before
    with jax.sharding.use_abstract_mesh(_mesh("cpu")):
        assert not splash.use_splash(None, L, True)
    with jax.sharding.use_abstract_mesh(_mesh("tpu")):
        assert splash.use_splash(None, 256, True) and splash.use_splash(None, 512, True)
        assert not splash.use_splash(None, 128, True)  # the kernel takes it, but costs memory there
        assert not splash.use_splash(None, 64, True)  # shape
        assert not splash.use_splash(None, L, False)  # one sentence per row
        assert not splash.use_splash("xla", L, True) and not splash.use_splash("cudnn", L, True)
    assert splash.use_splash("splash", L, True)


def test_split_over_rows_under_a_mesh_and_vmap():
    """As the train step runs it: the model vmapped over rows, rows sharded over 8 devices, the
    mesh declared; no all-gather, same gradients as XLA."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((8, L, 2, 8)), jnp.float32) for _ in range(3))
    _, seg, _ = packed_rows(8, L, seed=2)
    real = jnp.asarray(seg > 0)[..., None, None]

    def xla(q, k, v, s):
        m = (s[:, :, None] == s[:, None, :]) & (s[:, None, :] > 0)
        return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], scale=8 ** -0.5)

    def grads(attend):
        def loss(q, k, v, s):
            one = lambda *a: attend(*(x[None] for x in a))[0]  # noqa: E731
            return jnp.sum(jnp.where(real, jax.vmap(one)(q, k, v, s), 0.0) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))

    sharded = NamedSharding(mesh, P("data"))
    fn = jax.jit(grads(lambda *a: splash.splash_attention(*a, interpret=True)),
                 in_shardings=(sharded,) * 4)
    args = (q, k, v, jnp.asarray(seg))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = fn.lower(*args).compile()
    assert "all-gather" not in compiled.as_text()
    got = compiled(*args)
    want = jax.jit(grads(xla))(*args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-4)


def test_rows_not_a_multiple_of_the_devices_are_padded():
    """6 rows on 8 devices (replicated in, so the jit may take them): padded to 8 inside the
    shard_map and cut back, the same attention as XLA's."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((6, L, 2, 8)), jnp.float32) for _ in range(3))
    _, seg, _ = packed_rows(6, L, seed=4)
    fn = jax.jit(lambda *a: splash.splash_attention(*a, interpret=True),
                 in_shardings=(NamedSharding(mesh, P()),) * 4)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        got = fn(q, k, v, jnp.asarray(seg))
    m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(m)[:, None], scale=8 ** -0.5)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=2e-5)
