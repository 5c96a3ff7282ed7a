"""Where a cross-encoder run starts and what it exports.

The start: a BERT checkpoint's backbone and pooler (a `BertModel` folder such as m3e-small: what
`BertForSequenceClassification.from_pretrained` and sentence-transformers' `CrossEncoder(name,
num_labels=...)` keep) and a new classifier drawn from the run's seed; or a cross-encoder folder
(`BertForSequenceClassification`, a sentence-transformers `CrossEncoder`) whose head has the
run's label count, trained further; or a UER-py `.bin` backbone (with --vocab_path and
--config_path) under a new pooler and classifier.

The export: `best_model/`, a sentence-transformers `CrossEncoder` folder
(`inference.cross_encoder.CrossEncoder.save`), which `sentence_transformers.CrossEncoder`,
transformers and `sbert_flax.CrossEncoder` load to the same scores; ce-softmax runs with
--label_names name their labels in it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from sbert_flax.checkpoints.cross_encoder_folder import default_activation
from sbert_flax.checkpoints.cross_encoder_loading import LoadedCrossEncoder, load_cross_encoder
from sbert_flax.checkpoints.pretrained import Pretrained, load_pretrained
from sbert_flax.models.config import PoolingConfig
from sbert_flax.models.cross_encoder import ClassifierConfig, init_head_params
from sbert_flax.training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class CrossEncoderStart:
    """The model a cross-encoder run starts from.

    Attributes:
      pre: what the trainer reads of any start (config, tokenizer; `params` is the whole
        classifier, {"backbone", "pooler", "classifier"}, so the resume check's model_sha256
        covers the head it starts from).
      head: the classifier's label count and dropout.
      hf_config: the start folder's config.json (its labels carry over to the export).
    """

    pre: Pretrained
    head: ClassifierConfig
    hf_config: dict[str, Any]


def load_start(cfg: TrainConfig, num_labels: int) -> CrossEncoderStart:
    """The start of `cfg`'s run with a head of `num_labels` logits (a new head from `cfg.seed`).

    Raises:
      WeightsError, ConfigError, ValueError: a checkpoint whose classifier has another label
        count, or files that do not fit together (the message names them).
    """
    path = cfg.pretrained_model_path
    if os.path.isfile(path):  # a UER-py backbone: load_pretrained reads its layouts
        pre = load_pretrained(path, vocab_path=cfg.vocab_path, config_path=cfg.config_path,
                              pooling="cls", seq_length=cfg.seq_length)
        params = {"backbone": pre.params,
                  **init_head_params(pre.config, num_labels, cfg.seed)}
        head = ClassifierConfig(num_labels)
        return CrossEncoderStart(dataclasses.replace(pre, params=params), head, {})
    loaded = load_cross_encoder(path, max_length=cfg.seq_length, num_labels=num_labels,
                                new_head=True, seed=cfg.seed, vocab_path=cfg.vocab_path)
    pre = Pretrained(loaded.config, loaded.params, loaded.tokenizer, PoolingConfig("cls"))
    return CrossEncoderStart(pre, loaded.head, dict(loaded.hf_config))


def export(dest: str, start: CrossEncoderStart, params: Any, seq_length: int,
           label_names: tuple[str, ...] | None = None) -> None:
    """Writes `params` (host arrays of the whole classifier) as a sentence-transformers
    CrossEncoder folder at `dest` (replaced atomically): sentence-transformers' default
    activation for the label count (Sigmoid for one logit, Identity for classes)."""
    from sbert_flax.inference.cross_encoder import CrossEncoder

    hf_config = dict(start.hf_config)
    if label_names and len(label_names) == start.head.num_labels:
        hf_config["id2label"] = {str(i): name for i, name in enumerate(label_names)}
    loaded = LoadedCrossEncoder(start.pre.config, start.head, jax.tree.map(np.asarray, params),
                                start.pre.tokenizer, seq_length,
                                default_activation(start.head.num_labels), hf_config=hf_config)
    CrossEncoder(loaded, devices=jax.local_devices()[:1]).save(dest, overwrite=True)
