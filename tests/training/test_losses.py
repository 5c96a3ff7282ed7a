"""losses.py on fixed embeddings == sentence-transformers' losses (values and gradients).

sentence-transformers gets the same embeddings through a real `SentenceTransformer` whose one module
returns them (so every model method a pinned loss calls is the library's own), and only the real
rows; ours gets the padded batch (zero-weight rows scattered in it, as a global batch
assembled from several processes' padded local batches has them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import losses as st_losses

from sbert_flax.models.config import BertConfig
from sbert_flax.training import losses

B, D = 12, 16
PAD = np.array([3, 7, 11])  # zero-weight rows


class _Fixed(torch.nn.Module):
    """A module whose forward returns fixed embeddings: features {"column": k} -> column k."""

    def __init__(self, embs):
        super().__init__()
        self.embs = [torch.tensor(e, dtype=torch.float32, requires_grad=True) for e in embs]

    def forward(self, features):
        return {**features, "sentence_embedding": self.embs[features["column"]]}

    def get_embedding_dimension(self):
        return self.embs[0].shape[-1]


def _st(loss_cls, embs, labels=None, **kw):
    """(value, grads per column) of a sentence-transformers loss on fixed embeddings."""
    fixed = _Fixed(embs)
    # A real SentenceTransformer around the module: losses may call any of the model's methods
    # (MatryoshkaLoss in 6.3 asks it for its untruncated dimension), and a stand-in model would
    # have to follow every release's private interface.
    model = SentenceTransformer(modules=[fixed], device="cpu")
    loss = loss_cls(model, **kw) if not isinstance(loss_cls, tuple) else \
        loss_cls[0](model, loss_cls[1](model, **kw), **loss_cls[2])
    features = [{"column": k} for k in range(len(embs))]
    labels = torch.zeros(len(embs[0])) if labels is None else torch.tensor(labels, dtype=torch.float32)
    value = loss(features, labels)
    value.backward()
    return float(value.detach()), [e.grad.numpy() for e in fixed.embs]


def _data(columns, seed=0):
    rng = np.random.default_rng(seed)
    embs = [rng.standard_normal((B, D)).astype(np.float32) for _ in range(columns)]
    weights = np.ones(B, np.float32)
    weights[PAD] = 0.0
    return embs, weights


def _real(x):
    return np.delete(x, PAD, axis=0)


def _ours(fn, embs, batch):
    value, grads = jax.value_and_grad(lambda e: fn(e, batch)[0])([jnp.asarray(e) for e in embs])
    return float(value), [np.asarray(g) for g in grads]


def _compare(ours, theirs):
    (v1, g1), (v2, g2) = ours, theirs
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(_real(a), b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[PAD], 0.0)  # padding rows get no gradient


@pytest.mark.parametrize("negatives", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mnrl_equals_sentence_transformers(negatives, symmetric):
    embs, w = _data(3 if negatives else 2)
    loss = losses.make_loss("mnrl", symmetric=symmetric)
    ours = _ours(loss.objective(), embs, {"weights": jnp.asarray(w)})
    kw = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} \
        if symmetric else {}
    theirs = _st(st_losses.MultipleNegativesRankingLoss, [_real(e) for e in embs], scale=20.0, **kw)
    _compare(ours, theirs)


def test_mnrl_symmetric_equals_the_deprecated_symmetric_class():
    embs, w = _data(2, seed=3)
    ours = _ours(losses.make_loss("mnrl", symmetric=True).objective(), embs, {"weights": jnp.asarray(w)})
    with pytest.warns(DeprecationWarning):
        theirs = _st(st_losses.MultipleNegativesSymmetricRankingLoss, [_real(e) for e in embs])
    _compare(ours, theirs)


def test_mnrl_scale_and_accuracy():
    embs, w = _data(2, seed=1)
    ours = _ours(losses.make_loss("mnrl", scale=7.5).objective(), embs, {"weights": jnp.asarray(w)})
    _compare(ours, _st(st_losses.MultipleNegativesRankingLoss, [_real(e) for e in embs], scale=7.5))
    # Positives equal to their anchors: top-1 everywhere, whatever the padding rows hold.
    _, m = losses.mnrl(jnp.asarray(embs[0]), jnp.asarray(embs[0]), jnp.asarray(w))
    assert float(m["accuracy"]) == 1.0


def test_cosent_equals_sentence_transformers():
    embs, w = _data(2, seed=2)
    scores = np.random.default_rng(5).integers(0, 6, B).astype(np.float32) / 5.0  # with ties
    batch = {"weights": jnp.asarray(w), "scores": jnp.asarray(scores)}
    ours = _ours(losses.make_loss("cosent").objective(), embs, batch)
    theirs = _st(st_losses.CoSENTLoss, [_real(e) for e in embs], labels=_real(scores), scale=20.0)
    _compare(ours, theirs)


def test_cosent_all_padding_is_zero():
    embs, _ = _data(2)
    value, _ = losses.cosent(jnp.asarray(embs[0]), jnp.asarray(embs[1]), jnp.arange(B, dtype=jnp.float32),
                             jnp.zeros(B))
    assert float(value) == 0.0


@pytest.mark.parametrize("name", ["mnrl", "cosent"])
def test_matryoshka_equals_sentence_transformers(name):
    dims = (16, 8, 4)  # unsorted on purpose below: both sides sort descending
    embs, w = _data(2, seed=4)
    scores = np.random.default_rng(6).random(B).astype(np.float32)
    batch = {"weights": jnp.asarray(w), "scores": jnp.asarray(scores)}
    ours = _ours(losses.make_loss(name, matryoshka_dims=(4, 16, 8)).objective(), embs, batch)
    inner = st_losses.MultipleNegativesRankingLoss if name == "mnrl" else st_losses.CoSENTLoss
    theirs = _st((st_losses.MatryoshkaLoss, inner, {"matryoshka_dims": dims}), [_real(e) for e in embs],
                 labels=_real(scores) if name == "cosent" else None)
    _compare(ours, theirs)


@pytest.mark.parametrize("name,options", [("mnrl", {"symmetric": True}), ("cosent", {}),
                                          ("mnrl", {"matryoshka_dims": (16, 4)})])
def test_zero_padding_embeddings(name, options):
    """A padding row whose mask is all zero pools to a zero vector: loss and gradients stay
    finite and equal the loss on the real rows (the norm's gradient at 0 would be NaN)."""
    embs, w = _data(3 if name == "mnrl" else 2, seed=8)
    for e in embs:
        e[PAD] = 0.0
    scores = np.random.default_rng(2).random(B).astype(np.float32)
    batch = {"weights": jnp.asarray(w), "scores": jnp.asarray(scores)}
    fn = losses.make_loss(name, **options).objective()
    value, grads = _ours(fn, embs, batch)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    real = {"weights": jnp.ones(B - len(PAD)), "scores": jnp.asarray(_real(scores))}
    np.testing.assert_allclose(value, _ours(fn, [_real(e) for e in embs], real)[0], rtol=1e-6)


def test_make_loss_validates():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.make_loss("triplet")
    with pytest.raises(ValueError, match="mini_batch_size"):
        losses.make_loss("cached-mnrl")
    with pytest.raises(ValueError, match="mini_batch_size"):
        losses.make_loss("mnrl", mini_batch_size=8)
    with pytest.raises(ValueError, match="num_labels"):
        losses.make_loss("softmax")
    with pytest.raises(ValueError, match="not to softmax"):
        losses.make_loss("softmax", num_labels=3, matryoshka_dims=(8,))
    with pytest.raises(ValueError, match="symmetric"):
        losses.make_loss("cosent", symmetric=True)
    with pytest.raises(ValueError, match="no negative"):
        losses.make_loss("cosent").text_columns(True)
    cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8, max_position_embeddings=8)
    with pytest.raises(ValueError, match="8 dims"):
        losses.make_loss("mnrl", matryoshka_dims=(16, 8)).model_def(cfg, "mean")


def test_loss_interface():
    m = losses.make_loss("cached-mnrl", mini_batch_size=4, pooling="mean")
    assert (m.name, m.target, m.text_columns(False), m.text_columns(True)) == \
        ("cached-mnrl", None, ("anchor", "positive"), ("anchor", "positive", "negative"))
    c = losses.make_loss("cosent")
    assert (c.name, c.target, c.text_columns(False)) == ("cosent", "scores", ("sentence1", "sentence2"))
    s = losses.make_loss("softmax", num_labels=3)
    assert (s.name, s.target, s.text_columns(False)) == ("softmax", "labels", ("text_a", "text_b"))
