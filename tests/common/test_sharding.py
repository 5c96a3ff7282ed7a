"""sharding.py: mesh construction, the logical-axis rules, batch placement."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sbert_flax.common import sharding
from sbert_flax.models.config import BertConfig
from sbert_flax.training.siamese import model_def


def test_make_mesh_shapes():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(sharding.make_mesh(fsdp=2).shape) == {"data": 4, "fsdp": 2}
    assert dict(sharding.make_mesh(2, 4).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="divide"):
        sharding.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(3, 2)


def test_logical_rules():
    mesh = sharding.make_mesh(2, 4)
    rules = sharding.FSDP_RULES
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), (100, 32), rules, mesh) == P("fsdp")
    # vocab not divisible by 4 -> the next dimension takes the axis
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), (101, 32), rules, mesh) == P(None, "fsdp")
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (32, 64), rules, mesh) == P("fsdp")
    assert sharding.logical_to_mesh_spec(("mlp",), (37,), rules, mesh) == P()
    assert sharding.logical_to_mesh_spec(("norm",), (32,), rules, mesh) == P()
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (32, 64), sharding.REPLICATED_RULES,
                                         mesh) == P()
    assert sharding.rules_for("fsdp") is sharding.FSDP_RULES
    with pytest.raises(ValueError, match="replicated"):
        sharding.rules_for("zero3")


def _tiny_def_and_mesh():
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return model_def(cfg, 3, "cls"), sharding.make_mesh(4, 2)


def test_fsdp_shards_every_big_matrix():
    mdef, mesh = _tiny_def_and_mesh()
    sh = sharding.param_shardings(mdef.logical_specs, mdef.abstract_params, sharding.FSDP_RULES, mesh)
    shapes = jax.tree.leaves(mdef.abstract_params)
    for (path, s), x in zip(jax.tree_util.tree_leaves_with_path(sh), shapes, strict=True):
        name = jax.tree_util.keystr(path)
        if len(x.shape) >= 2 and "bias" not in name and "classifier" not in name:
            assert "fsdp" in tuple(s.spec), (name, s.spec)
    rep = sharding.param_shardings(mdef.logical_specs, mdef.abstract_params,
                                   sharding.REPLICATED_RULES, mesh)
    assert all(s.spec == P() for s in jax.tree.leaves(rep))


def test_tree_shardings_like_matches_moments():
    import optax

    mdef, mesh = _tiny_def_and_mesh()
    p_sh = sharding.param_shardings(mdef.logical_specs, mdef.abstract_params, sharding.FSDP_RULES, mesh)
    opt = jax.eval_shape(optax.adamw(1e-3).init, mdef.abstract_params)
    o_sh = sharding.tree_shardings_like(opt, mdef.abstract_params, p_sh, mesh)
    mu = o_sh[0].mu
    assert (mu["embedder"]["backbone"]["embeddings"]["word_embeddings"]
            == p_sh["embedder"]["backbone"]["embeddings"]["word_embeddings"])
    assert o_sh[0].count.spec == P()


def test_put_batch_is_sharded_over_all_devices():
    mesh = sharding.make_mesh(4, 2)
    x = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    out = sharding.put_batch({"x": x}, mesh)["x"]
    assert out.shape == (16, 3)
    assert len({s.device for s in out.addressable_shards}) == 8
    assert all(s.data.shape == (2, 3) for s in out.addressable_shards)
    np.testing.assert_array_equal(np.asarray(out), x)
    np.testing.assert_array_equal(sharding.host_tree({"y": out}, mesh)["y"], x)


def test_model_params_carry_logical_names():
    mdef, _ = _tiny_def_and_mesh()
    assert tuple(mdef.logical_specs["embedder"]["backbone"]["layers"][0]["mlp"]["wi_kernel"]) == ("embed", "mlp")
    assert isinstance(mdef.graphdef, nnx.GraphDef)
