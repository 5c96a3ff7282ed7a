"""`SequenceClassifier` against transformers' `BertForSequenceClassification` on the same weights.

The padded call reproduces the torch logits (fp32, 1e-5); packed rows (several pairs per row,
attention within a pair, positions restarting) give the padded call's logits; dropout runs only
with a key; the head's params are where `abstract_classifier` says; bf16 compute keeps f32 logits.
"""

from __future__ import annotations

import functools

import cross_encoder_helpers as ceh
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.inference.packing import Packer
from sbert_flax.inference.pair_batches import PairEncoder, pack_pairs, pad_pairs
from sbert_flax.models.config import BertConfig
from sbert_flax.models.cross_encoder import ClassifierConfig, abstract_classifier
from sbert_flax.models.tokenization import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
LENGTH = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, zh_vocab):
    """(torch model, our graphdef, our params, padded batch, tokenized pairs), 3 labels."""
    path = ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp("ce3")), num_labels=3,
                                           seed=7, max_position=LENGTH, vocab_file=zh_vocab)
    ref = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    cfg = BertConfig.from_json_file(f"{path}/config.json")
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    graphdef, params = abstract_classifier(cfg, ClassifierConfig(3))
    nnx.replace_by_pure_dict(params, weights.seq_cls_hf_to_flax(state, cfg, 3))
    ids = PairEncoder(load_tokenizer(path)).encode(ceh.make_pairs(9, seed=8, max_len=25), LENGTH)
    return ref, graphdef, params, pad_pairs(ids, LENGTH, len(ids)), ids


@functools.partial(jax.jit, static_argnums=(0, 5))
def _padded(graphdef, params, ids, mask, types, dtype=jnp.float32, key=None):
    model = nnx.merge(graphdef, params)
    model.backbone.dtype = jnp.dtype(dtype)
    return model(ids, mask, types, dropout_key=key)


def test_padded_logits_match_transformers(setup):
    ref, graphdef, params, batch, ids = setup
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(batch["ids"]).long(),
                   attention_mask=torch.from_numpy(batch["mask"]).long(),
                   token_type_ids=torch.from_numpy(batch["token_types"]).long()).logits.numpy()
    got = np.asarray(_padded(graphdef, params, batch["ids"], batch["mask"], batch["token_types"]))
    assert got.shape == want.shape == (len(ids), 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # Token types matter: all zeros gives other logits (so a dropped type would be caught).
    zeros = np.asarray(_padded(graphdef, params, batch["ids"], batch["mask"],
                               np.zeros_like(batch["token_types"])))
    assert np.abs(zeros - want).max() > 1e-3


def test_packed_rows_score_as_padded(setup):
    _, graphdef, params, batch, ids = setup
    padded = np.asarray(_padded(graphdef, params, batch["ids"], batch["mask"],
                                batch["token_types"]))
    batches = pack_pairs(Packer(512, LENGTH), ids)
    assert len(batches) == 1 and (batches[0].slot > 0).any()  # several pairs share rows
    b = batches[0]
    out = np.asarray(jax.jit(lambda p, *a: nnx.merge(graphdef, p).score_packed(
        *a, Packer.slots(LENGTH)))(params, b.ids, b.token_types, b.segments, b.positions))
    got = np.zeros_like(padded)
    got[b.index] = out[b.row, b.slot]
    np.testing.assert_allclose(got, padded, rtol=0, atol=TOL)


def test_dropout_only_with_a_key(setup):
    _, graphdef, params, batch, _ = setup
    args = (graphdef, params, batch["ids"], batch["mask"], batch["token_types"], jnp.float32)
    plain = np.asarray(_padded(*args))
    k1, k2 = jax.random.split(jax.random.key(0))
    d1 = np.asarray(_padded(*args, k1))
    assert np.abs(d1 - plain).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(_padded(*args, k1)), d1)
    assert np.abs(np.asarray(_padded(*args, k2)) - d1).max() > 1e-4


def test_param_tree_and_bf16(setup):
    _, graphdef, params, batch, _ = setup
    tree = nnx.to_pure_dict(params)
    d = tree["pooler"]["bias"].shape[0]
    assert set(tree) == {"backbone", "pooler", "classifier"}
    assert tree["pooler"]["kernel"].shape == (d, d) and tree["classifier"]["kernel"].shape == (d, 3)
    assert tree["classifier"]["bias"].shape == (3,)
    args = (graphdef, params, batch["ids"], batch["mask"], batch["token_types"])
    low = np.asarray(_padded(*args, jnp.bfloat16))
    assert low.dtype == np.float32  # the head and the logits stay float32
    np.testing.assert_allclose(low, np.asarray(_padded(*args)), atol=0.1)
