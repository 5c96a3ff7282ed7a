"""One embedder: packed rows == padded rows, and the trainer's tower embeds what `encode` returns."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import random_zh_sentences

from sbert_flax import load_model
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.inference.packing import Packer
from sbert_flax.models.config import PoolingConfig
from sbert_flax.models.embedder import SentenceEmbedder, abstract_embedder, embedder_params
from sbert_flax.models.tokenization import pad_batch
from sbert_flax.training.losses import make_loss

SENTS = random_zh_sentences(40, 1, 60, seed=31) + ["", "短"]


@pytest.fixture(scope="module")
def loaded(tiny_bert):
    return load_model(tiny_bert(hidden=32, heads=4, layers=2, pooling="mean", max_position=128))


def _padded(tokenizer, sents, length=128):
    ids = tokenizer.encode(sents, length)
    return pad_batch(ids, length, len(ids), tokenizer.pad_id)


@pytest.mark.parametrize("mode, normalize", [("cls", False), ("mean", False), ("max", False),
                                             ("mean", True)])
def test_packed_equals_padded(loaded, mode, normalize):
    pooling = PoolingConfig(mode, normalize)
    graphdef, state = abstract_embedder(loaded.config, pooling)
    nnx.replace_by_pure_dict(state, embedder_params(loaded.params))
    model = nnx.merge(graphdef, state)
    assert isinstance(model, SentenceEmbedder)
    ids, mask = _padded(loaded.tokenizer, SENTS)
    want = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask))
    seqs = loaded.tokenizer.encode(SENTS, 128)
    (batch,) = Packer(4096, 128).pack(seqs)
    assert batch.shape[0] < len(SENTS)  # several sentences share a row
    out = nnx.jit(lambda m, i, s, p: m.embed_packed(i, s, p, Packer.slots(i.shape[1])))(
        model, batch.ids, batch.segments, batch.positions)
    got = np.zeros_like(want)
    got[batch.index] = np.asarray(out)[batch.row, batch.slot]
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("loss_name", ["softmax", "mnrl"])
def test_trainer_tower_embeds_what_encode_returns(loaded, one_device, loss_name):
    # The tower a training loss differentiates is the SentenceEmbedder that encode runs: same
    # params, same pooling -> the same vectors (padded rows in training, packed rows in encode).
    loss = make_loss(loss_name, num_labels=3 if loss_name == "softmax" else None,
                     pooling=loaded.pooling)
    mdef = loss.model_def(loaded.config)
    params = loss.initial_params(loaded.params, loaded.config, seed=0)
    ids, mask = _padded(loaded.tokenizer, SENTS)

    @jax.jit
    def tower(p, i, k):
        return nnx.merge(mdef.graphdef, p).embedder(i, k)

    trained_side = np.asarray(tower(params, ids, mask))
    enc = SentenceEncoder(loaded, devices=one_device)
    assert np.abs(trained_side - enc.encode(SENTS)).max() <= 1e-5
