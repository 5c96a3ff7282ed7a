"""The softmax recipe step by step against sentence-transformers' SoftmaxLoss (bench/siamese_divergence.py).

A tiny random BERT, the first 80 nli-zh pairs, batch 8 (a 10-step schedule, warmup 1, 4 steps
run), dropout off, the same head init and batch order: with PyTorch's flags (`adam_eps=1e-8`,
`clip_head=False`) our packed train step follows sentence-transformers' update step for step
(loss, gradient norm, the params' change). One compile: the padded layout and UER's flags are
compared on m3e-small by the bench (README, Fine-tuning).
"""

import os
import sys

import helpers
import numpy as np
import pytest
from helpers import make_tiny_bert_dir

from sbert_flax.common.devdata import data_path

sys.path.insert(0, os.path.join(helpers.REPO, "bench"))
import siamese_divergence as div  # noqa: E402

NLI = data_path("nli-zh", "train.tsv")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("div")
    model = make_tiny_bert_dir(str(root / "m"), hidden=32, layers=1, heads=4, intermediate=37)
    recipe = div.Recipe(model_dir=model, train_path=NLI, pairs=80, steps=4, batch_size=8, seq_length=24,
                        lr=5e-3, max_grad_norm=1.0)
    source = div.open_train(recipe)
    batches = div.batch_order(recipe, recipe.pairs)
    torch_run = div.run_torch(recipe, source, batches)
    head = (torch_run["init"]["classifier.weight"], torch_run["init"]["classifier.bias"])
    return recipe, source, batches, torch_run, head


def test_follows_sentence_transformers(setup):
    recipe, source, batches, torch_run, head = setup
    flax_run = div.run_flax(recipe, source, batches, head)  # packed, PyTorch's optimizer flags
    c = div.compare(torch_run, flax_run)
    assert not c["missing"] and c["start_max_abs"] == 0.0
    # The clipping must have acted (norms above 1), or the test would not see the clip scope.
    assert np.max(torch_run["grad_norm"]) > recipe.max_grad_norm
    assert np.max(c["loss_rel"]) < 1e-5, c["loss_rel"]
    assert np.max(c["grad_norm_rel"]) < 1e-4, c["grad_norm_rel"]
    assert c["update_rel"] < 1e-4, c
