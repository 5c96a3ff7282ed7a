"""Moved: the training loop is `sbert_flax.training.trainer` (a `Trainer` object). These names
stay importable for existing callers."""

from sbert_flax.training.trainer import Trainer, TrainingDiverged, train_and_evaluate

__all__ = ["Trainer", "TrainingDiverged", "train_and_evaluate"]
