"""The trainer's evaluator embeds through the packed path `encode` runs: the same vectors as
`SentenceEncoder.encode` and as its former padded path, on a (4, 2) fsdp mesh."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import random_zh_sentences

from sbert_flax import load_model
from sbert_flax.common import sharding
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.models.tokenization import pad_batch
from sbert_flax.retrieval.sts import pair_cosines, spearman
from sbert_flax.training.dev_eval import Evaluator
from sbert_flax.training.losses import make_loss
from sbert_flax.training.state import put_params, state_layout

SENTS = random_zh_sentences(30, 1, 60, seed=5) + ["", "短"]
SEQ = 64


@pytest.fixture(scope="module")
def loaded(tiny_bert):
    return load_model(tiny_bert(hidden=32, heads=4, layers=2, pooling="mean", max_position=128),
                      max_seq_length=SEQ)


@pytest.fixture(scope="module")
def encoded(loaded, one_device) -> np.ndarray:
    return SentenceEncoder(loaded, devices=one_device).encode(SENTS)


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("sts") / "sts.tsv"
    path.write_text("".join(f"{SENTS[i]}\t{SENTS[i + 1]}\t{rng.uniform(0, 5):.2f}\n"
                            for i in range(0, 24, 2)), encoding="utf-8")
    return str(path)


# One mesh: (4, 2) with fsdp params is the case with most to get wrong (rows split over 8 devices,
# params sharded); the one-device case is what every other trainer test runs.
@pytest.mark.parametrize("data, fsdp", [(4, 2)])
def test_evaluator_embeds_what_encode_returns(loaded, encoded, sts_file, data, fsdp):
    loss = make_loss("mnrl", pooling=loaded.pooling)
    mdef = loss.model_def(loaded.config)
    mesh = sharding.make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])
    layout = state_layout(mdef, optax.sgd(0.1), mesh,
                          sharding.rules_for("fsdp" if fsdp > 1 else "replicated"))
    params = put_params(loss.initial_params(loaded.params, loaded.config, seed=0),
                        layout.shardings.params)
    ev = Evaluator(mdef.graphdef, layout, loaded.tokenizer, seq_length=SEQ, batch_size=8,
                   sts_paths=[sts_file])
    got = ev.embed(params, SENTS)
    assert got.shape == encoded.shape
    np.testing.assert_allclose(got, encoded, rtol=0, atol=1e-5)

    # The former path: each sentence padded to the sequence length, the tower's padded forward.
    ids, mask = pad_batch(loaded.tokenizer.encode(SENTS, SEQ), SEQ, len(SENTS),
                          loaded.tokenizer.pad_id)
    host = jax.tree.map(np.asarray, loss.initial_params(loaded.params, loaded.config, seed=0))
    padded = np.asarray(jax.jit(lambda p, i, m: nnx.merge(mdef.graphdef, p).embedder(i, m))(
        host, ids, mask))
    np.testing.assert_allclose(got, padded, rtol=0, atol=1e-5)
    # Fewer rows than sentences: several share a row, as in encode.
    assert ev.packer.pack(loaded.tokenizer.encode(SENTS, SEQ))[0].shape[0] < len(SENTS)
    assert 1 <= ev.embed_traces <= len(ev.packer.shapes())

    rho = ev.sts_spearman(params)[sts_file]
    row = {s: i for i, s in enumerate(SENTS)}
    s1 = [SENTS[i] for i in range(0, 24, 2)]
    s2 = [SENTS[i + 1] for i in range(0, 24, 2)]
    gold = [float(line.split("\t")[2]) for line in open(sts_file, encoding="utf-8")]
    want = spearman(pair_cosines(encoded[[row[s] for s in s1]], encoded[[row[s] for s in s2]]),
                    gold)
    assert rho == pytest.approx(want, abs=1e-9)
