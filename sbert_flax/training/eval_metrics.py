"""Classification and correlation metrics for fine-tuning evaluation (host-side numpy).

UER-py's classifier evaluation prints accuracy, a confusion matrix and per-label precision /
recall / F1; these give the same numbers. Rank/linear correlations live in
`sbert_flax.retrieval.sts` (shared with the CLI's eval-sts) and are re-exported here.
"""

from __future__ import annotations

import numpy as np

from sbert_flax.retrieval.sts import pearson, rankdata, spearman

__all__ = ["accuracy", "confusion_matrix", "format_report", "pearson", "per_label_prf", "rankdata",
           "spearman"]


def _labels(pred, gold, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred).ravel()
    gold = np.asarray(gold).ravel()
    if pred.shape != gold.shape:
        raise ValueError(f"pred and gold have different lengths ({pred.size} vs {gold.size})")
    w = np.ones(pred.shape, np.float64) if weights is None else np.asarray(weights, np.float64).ravel()
    if w.shape != pred.shape:
        raise ValueError(f"weights has {w.size} entries for {pred.size} predictions")
    return pred.astype(np.int64), gold.astype(np.int64), w


def accuracy(pred, gold, weights=None) -> float:
    """Fraction of correct predictions; `weights` (e.g. 0 for pad rows) weight each one.

    Returns NaN when the total weight is 0 (nothing to score).
    """
    pred, gold, w = _labels(pred, gold, weights)
    total = float(w.sum())
    if total == 0.0:
        return float("nan")
    return float(np.sum(w * (pred == gold)) / total)


def confusion_matrix(pred, gold, num_labels: int, weights=None) -> np.ndarray:
    """int64 [num_labels, num_labels]: entry [g, p] counts gold g predicted as p.

    sklearn's orientation (rows gold); UER-py prints the transpose (rows predicted). Rows with
    weight 0 (pad rows) are left out; other weights must be 0 or 1.

    Raises:
      ValueError: a label outside [0, num_labels).
    """
    pred, gold, w = _labels(pred, gold, weights)
    keep = w != 0
    pred, gold = pred[keep], gold[keep]
    for name, x in (("pred", pred), ("gold", gold)):
        if x.size and (x.min() < 0 or x.max() >= num_labels):
            raise ValueError(f"{name} has labels outside [0, {num_labels}): {np.unique(x).tolist()}")
    cm = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(cm, (gold, pred), 1)
    return cm


def per_label_prf(pred, gold, num_labels: int, weights=None) -> dict[str, np.ndarray | float]:
    """Per-label precision, recall and F1 (0 where undefined, like sklearn's zero_division=0).

    Returns:
      {"precision", "recall", "f1"}: float64 [num_labels]; "support": int64 [num_labels] gold
      counts; "macro_f1": their unweighted mean.
    """
    cm = confusion_matrix(pred, gold, num_labels, weights)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support,
            "macro_f1": float(f1.mean())}


def format_report(pred, gold, num_labels: int, weights=None) -> str:
    """UER-style text report: accuracy, confusion matrix (rows gold) and per-label P/R/F1."""
    cm = confusion_matrix(pred, gold, num_labels, weights)
    prf = per_label_prf(pred, gold, num_labels, weights)
    lines = [f"Acc. (Correct/Total): {accuracy(pred, gold, weights):.4f} "
             f"({int(np.trace(cm))}/{int(cm.sum())})",
             "Confusion matrix (rows gold, columns predicted):"]
    lines += ["  " + " ".join(f"{v:7d}" for v in row) for row in cm]
    lines.append("Report precision, recall, and f1:")
    lines += [f"Label {i}: {prf['precision'][i]:.3f}, {prf['recall'][i]:.3f}, {prf['f1'][i]:.3f}"
              for i in range(num_labels)]
    return "\n".join(lines)


def classification_report(preds: np.ndarray, gold: np.ndarray, num_labels: int
                          ) -> dict[str, float]:
    """Accuracy, macro F1 and per-label P/R/F1 (`f1_i`, `precision_i`, `recall_i`), as the
    trainer logs and records them for a labelled dev or test set."""
    prf = per_label_prf(preds, gold, num_labels)
    out: dict[str, float] = {"accuracy": accuracy(preds, gold), "macro_f1": float(prf["macro_f1"])}
    for i in range(num_labels):
        out[f"f1_{i}"] = float(prf["f1"][i])
        out[f"precision_{i}"] = float(prf["precision"][i])
        out[f"recall_{i}"] = float(prf["recall"][i])
    return out
