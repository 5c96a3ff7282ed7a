"""Pooling and normalisation against a numpy reference and sentence-transformers' own modules."""

import numpy as np
import pytest

from sbert_flax.models import pooling


def _batch(seed: int = 0, b: int = 5, length: int = 7, d: int = 6):
    rng = np.random.default_rng(seed)
    # Large-magnitude states so that a leaked padding value (set to +-50 below) cannot hide.
    hidden = rng.normal(0, 3, (b, length, d)).astype(np.float32)
    lengths = np.array([7, 1, 3, 0, 5])[:b]  # row 3 is all padding (a zero-weight batch row)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    # Padding positions hold values that would dominate any pooling that does not mask them.
    hidden = np.where(mask[..., None] > 0, hidden, 50.0).astype(np.float32)
    return hidden, mask, lengths


def _np_pool(hidden, mask, mode):
    out = []
    for h, m in zip(hidden, mask, strict=True):
        real = h[m > 0]
        if mode == "cls":
            out.append(h[0])
        elif mode == "mean":
            out.append(real.mean(0) if len(real) else np.zeros(h.shape[-1], np.float32))
        else:
            out.append(real.max(0) if len(real) else np.full(h.shape[-1], -1e9, np.float32))
    return np.stack(out)


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_pool_matches_numpy_reference(mode):
    hidden, mask, _ = _batch()
    got = np.asarray(pooling.pool(hidden, mask, mode))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _np_pool(hidden, mask, mode), rtol=1e-6, atol=1e-6)


def test_mean_all_padding_row_is_zero_not_nan():
    hidden, mask, lengths = _batch()
    got = np.asarray(pooling.mean_pool(hidden, mask))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[lengths == 0], 0.0)


def test_max_ignores_padding():
    hidden, mask, lengths = _batch()
    got = np.asarray(pooling.max_pool(hidden, mask))
    # Padding holds 50.0, larger than any real value: a max that saw it would return 50.
    real_rows = lengths > 0
    assert (got[real_rows] < 50.0).all()
    # Row 1 has one real token: max is that token.
    np.testing.assert_array_equal(got[1], hidden[1, 0])


def test_cls_is_first_token_even_if_masked():
    hidden, mask, _ = _batch()
    np.testing.assert_array_equal(np.asarray(pooling.cls_pool(hidden, mask)), hidden[:, 0])


def test_bf16_input_pools_in_float32():
    import jax.numpy as jnp

    hidden, mask, _ = _batch()
    got = pooling.mean_pool(jnp.asarray(hidden, jnp.bfloat16), mask)
    assert got.dtype == jnp.float32


def test_unknown_mode_raises():
    hidden, mask, _ = _batch()
    with pytest.raises(ValueError, match="sqrt"):
        pooling.pool(hidden, mask, "sqrt")


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_pool_matches_sentence_transformers_pooling(mode):
    torch = pytest.importorskip("torch")
    st_models = pytest.importorskip("sentence_transformers.models")

    hidden, mask, lengths = _batch()
    keep = lengths > 0  # sentence-transformers never sees an all-padding row
    hidden, mask = hidden[keep], mask[keep]
    module = st_models.Pooling(hidden.shape[-1], pooling_mode=mode)
    features = {"token_embeddings": torch.from_numpy(hidden),
                "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    ref = module(features)["sentence_embedding"].numpy()
    np.testing.assert_allclose(np.asarray(pooling.pool(hidden, mask, mode)), ref,
                               rtol=1e-6, atol=1e-6)


def test_l2_normalize_like_torch():
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(1).normal(size=(4, 9)).astype(np.float32)
    x[2] = 0.0  # zero vector stays zero (torch divides by max(norm, 1e-12))
    ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()
    got = np.asarray(pooling.l2_normalize(x))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[2], 0.0)


def test_cosine_similarity_matrix():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 8)).astype(np.float32)
    b = rng.normal(size=(5, 8)).astype(np.float32)
    ref = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    got = np.asarray(pooling.cosine_similarity(a, b))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---- sentence-transformers' 1_Pooling/config.json -------------------------------------------------

@pytest.mark.parametrize("d,mode", [
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),  # <= 5
    ({"pooling_mode_cls_token": True}, "cls"),
    ({"embedding_dimension": 8, "pooling_mode": "max", "include_prompt": True}, "max"),  # >= 6
    ({"pooling_mode": ["cls"]}, "cls"),
])
def test_pooling_config_formats(d, mode):
    from sbert_flax.models.config import PoolingConfig

    assert PoolingConfig.from_st_dict(d).mode == mode


@pytest.mark.parametrize("d,named", [
    ({"pooling_mode": "lasttoken"}, "lasttoken"),
    ({"pooling_mode": ["mean", "max"]}, "mean"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "mean"),
    ({"pooling_mode_weightedmean_tokens": True}, "weightedmean"),
    ({}, "none"),
])
def test_pooling_config_rejects_what_we_cannot_reproduce(d, named):
    from sbert_flax.models.config import ConfigError, PoolingConfig

    with pytest.raises(ConfigError, match=named):
        PoolingConfig.from_st_dict(d, source="1_Pooling/config.json")
