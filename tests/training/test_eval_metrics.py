"""sbert_flax.training.eval_metrics against sklearn.metrics and scipy.stats."""

from __future__ import annotations

import numpy as np
import pytest

from sbert_flax.retrieval import sts as evaluation
from sbert_flax.training import eval_metrics as metrics

sk = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def random_labels(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.6, gold, rng.integers(0, k, n))
    return pred, gold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_confusion_prf_match_sklearn(seed):
    pred, gold = random_labels(500, 3, seed)
    assert metrics.accuracy(pred, gold) == pytest.approx(sk.accuracy_score(gold, pred), abs=1e-12)
    cm = metrics.confusion_matrix(pred, gold, 3)
    np.testing.assert_array_equal(cm, sk.confusion_matrix(gold, pred, labels=[0, 1, 2]))
    prf = metrics.per_label_prf(pred, gold, 3)
    p, r, f, s = sk.precision_recall_fscore_support(gold, pred, labels=[0, 1, 2], zero_division=0)
    np.testing.assert_allclose(prf["precision"], p, rtol=1e-12)
    np.testing.assert_allclose(prf["recall"], r, rtol=1e-12)
    np.testing.assert_allclose(prf["f1"], f, rtol=1e-12)
    np.testing.assert_array_equal(prf["support"], s)
    assert prf["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="macro"), abs=1e-12)


def test_undefined_precision_recall_are_zero():
    # Label 2 never predicted (precision undefined), label 3 never gold nor predicted.
    gold = np.array([0, 1, 2, 2, 1])
    pred = np.array([0, 1, 1, 0, 1])
    prf = metrics.per_label_prf(pred, gold, 4)
    p, r, f, _ = sk.precision_recall_fscore_support(gold, pred, labels=[0, 1, 2, 3], zero_division=0)
    np.testing.assert_allclose(prf["precision"], p)
    np.testing.assert_allclose(prf["recall"], r)
    np.testing.assert_allclose(prf["f1"], f)
    assert prf["precision"][2] == 0 and prf["recall"][3] == 0 and prf["f1"][3] == 0


def test_weights_drop_pad_rows():
    pred, gold = random_labels(64, 3, 5)
    w = np.ones(64, np.float32)
    w[50:] = 0
    # Pad rows carry label 0 and a garbage prediction; they must not count.
    pred[50:], gold[50:] = 1, 0
    assert metrics.accuracy(pred, gold, w) == pytest.approx(sk.accuracy_score(gold[:50], pred[:50]))
    assert metrics.accuracy(pred, gold, w * 0.5) == pytest.approx(metrics.accuracy(pred, gold, w))
    np.testing.assert_array_equal(metrics.confusion_matrix(pred, gold, 3, w),
                                  sk.confusion_matrix(gold[:50], pred[:50], labels=[0, 1, 2]))
    prf = metrics.per_label_prf(pred, gold, 3, w)
    np.testing.assert_allclose(prf["f1"], sk.f1_score(gold[:50], pred[:50], average=None,
                                                      labels=[0, 1, 2], zero_division=0))
    assert np.isnan(metrics.accuracy([1], [1], [0.0]))


def test_label_errors():
    with pytest.raises(ValueError, match="different lengths"):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match=r"gold has labels outside \[0, 3\)"):
        metrics.confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="weights has 1 entries"):
        metrics.accuracy([0, 1], [0, 1], [1.0])


def test_format_report_uer_style():
    text = metrics.format_report([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert text.splitlines()[0] == "Acc. (Correct/Total): 0.7500 (3/4)"
    assert "Label 2: 1.000, 0.500, 0.667" in text


def test_correlations_are_evaluations_and_match_scipy():
    # One implementation, shared with the CLI's eval-sts.
    assert metrics.spearman is evaluation.spearman and metrics.pearson is evaluation.pearson
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(metrics.rankdata(x), stats.rankdata(x))
