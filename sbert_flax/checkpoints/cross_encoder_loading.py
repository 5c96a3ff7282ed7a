"""Cross-encoder loader: any supported source -> host config, head, params, tokenizer, length.

Sources: a sentence-transformers `CrossEncoder` folder or a HF `BertForSequenceClassification`
folder (local or a hub id), a HF `BertModel` folder with `new_head=True` (a new pooler /
classifier for training; a pooler in the checkpoint is kept, as `from_pretrained` keeps it), or
a UER-py `run_classifier` checkpoint file (with its vocab and config). Nothing is put on a device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sbert_flax.checkpoints import uer
from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.checkpoints.cross_encoder_folder import read_cross_encoder_folder
from sbert_flax.checkpoints.loading import resolve_model_path
from sbert_flax.common.files import read_json
from sbert_flax.models.config import BertConfig, ConfigError
from sbert_flax.models.cross_encoder import (
    ClassifierConfig,
    check_classifier_params,
    init_head_params,
)
from sbert_flax.models.tokenization import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadedCrossEncoder:
    """A cross-encoder on the host.

    Attributes:
      config: the backbone architecture.
      head: number of labels and classifier dropout.
      params: {"backbone": ..., "pooler": {"kernel", "bias"}, "classifier": {"kernel", "bias"}},
        float32 numpy (`weights.seq_cls_hf_to_flax`).
      tokenizer: host-side tokenizer (pairs: `inference.pair_batches.encode_pairs`).
      max_length: tokens per pair incl. [CLS] and both [SEP].
      activation: the saved activation ("sigmoid", "identity", ...), or None: sentence-
        transformers' default for the label count.
      source: where it came from.
      hf_config: the config.json read (labels kept on export); empty for UER checkpoints.
    """

    config: BertConfig
    head: ClassifierConfig
    params: dict
    tokenizer: Tokenizer
    max_length: int
    activation: str | None = None
    source: str = ""
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return self.head.num_labels


def load_cross_encoder(source: str, *, max_length: int | None = None,
                       num_labels: int | None = None, new_head: bool = False, seed: int = 0,
                       vocab_path: str | None = None, config_path: str | None = None,
                       uer_max_seq_length: int = 128, revision: str | None = None,
                       token: str | bool | None = None, cache_dir: str | None = None
                       ) -> LoadedCrossEncoder:
    """Loads a cross-encoder onto the host from any supported source.

    Args:
      source: a CrossEncoder / HF folder, a hub id, or a UER-py `run_classifier` `.bin` file.
      max_length: tokens per pair; default the folder's (sentence-transformers' rule: the
        tokenizer's `model_max_length`, at most `max_position_embeddings`), or
        `uer_max_seq_length` for a UER checkpoint.
      num_labels: the labels wanted; a checkpoint with a classifier must have this many (None:
        whatever it has); a new head gets this many (None: 1).
      new_head: allow a checkpoint without a classifier (a `BertModel`): the head is initialised
        as HF does, from `seed`. Without it, a missing head key is an error naming the key.
      seed: the new head's initialisation.
      vocab_path: a vocab file; required for a UER `.bin`, overrides a folder's tokenizer.
      config_path: required for a UER `.bin`: its UER config json or an HF config.json.
      uer_max_seq_length: a UER checkpoint's pair length when `max_length` is None (UER-py's
        `--seq_length` default).
      revision, token, cache_dir: hub ids, as `load_model`.

    Raises:
      ModelNotFoundError: not local and not downloadable.
      weights.WeightsError, ConfigError, ValueError: the files do not fit together (names which).
    """
    if num_labels is not None:
        ClassifierConfig(num_labels)  # validates it before any file is read
    if os.path.isfile(source) or (config_path and vocab_path and not os.path.isdir(source)):
        return _load_uer(source, vocab_path, config_path, max_length or uer_max_seq_length,
                         num_labels)
    local = resolve_model_path(source, revision=revision, token=token, cache_dir=cache_dir)
    folder = read_cross_encoder_folder(local)
    cfg = folder.config
    wfile = weights.find_weights_file(folder.model_dir)
    state = weights.read_weights(wfile)
    have = weights.classifier_num_labels(state, wfile)
    if have is not None and folder.num_labels is not None and have != folder.num_labels:
        raise weights.WeightsError(
            f"{wfile}: key 'classifier.weight' has {have} rows but {local}/config.json declares "
            f"{folder.num_labels} labels (id2label)")
    if have is not None and num_labels is not None and have != num_labels:
        raise weights.WeightsError(f"{wfile}: key 'classifier.weight' has {have} labels, not the "
                                   f"num_labels={num_labels} asked for")
    n = have or num_labels or 1
    head = ClassifierConfig(n, folder.hf_config.get("classifier_dropout"))
    fresh = init_head_params(cfg, n, seed) if new_head else None
    try:
        params = weights.seq_cls_hf_to_flax(state, cfg, n, source=wfile, head=fresh)
    except weights.WeightsError as e:
        if have is None and not new_head:
            raise weights.WeightsError(f"{e}; to train a new head on this backbone, load it with "
                                       "new_head=True") from None
        raise
    check_classifier_params(params, cfg, head, wfile)
    tokenizer = load_tokenizer(vocab_path or folder.model_dir)
    if max_length is None:
        max_length = folder.max_length or min(tokenizer.model_max_length,
                                              cfg.max_position_embeddings)
    return LoadedCrossEncoder(cfg, head, params, tokenizer, _checked_length(max_length, cfg),
                              folder.activation, local, folder.hf_config)


def _checked_length(max_length: int, cfg: BertConfig) -> int:
    n = int(max_length)
    if not 3 <= n <= cfg.max_position_embeddings:
        raise ValueError(f"max_length={n} must be in [3, max_position_embeddings="
                         f"{cfg.max_position_embeddings}] ([CLS] a [SEP] b [SEP] needs 3 tokens)")
    return n


def _load_uer(source: str, vocab_path: str | None, config_path: str | None, max_length: int,
              num_labels: int | None) -> LoadedCrossEncoder:
    """A UER-py run_classifier checkpoint: its encoder and output_layer_1/2 head.

    Pairs are then tokenized as sentence-transformers does (longest-first truncation); UER-py's
    own run_classifier cut `[CLS] a [SEP] b [SEP]` at the end instead, so pairs longer than the
    length can score differently from UER-py's (shorter ones score the same).
    """
    if not (vocab_path and config_path):
        raise ValueError(f"{source} is a UER-py checkpoint file: pass vocab_path (e.g. "
                         "models/google_zh_vocab.txt) and config_path (its config json)")
    tokenizer = load_tokenizer(vocab_path)  # cheap: a bad vocab fails before the big read
    hf = uer.uer_classifier_to_hf(weights.read_state_dict(source), source=source)
    cfg_dict = read_json(config_path)
    if uer.is_hf_config(cfg_dict):
        cfg = BertConfig.from_hf_dict(cfg_dict, source=config_path)
    else:
        cfg = uer.config_from_uer_hf(cfg_dict, weights.canonical_hf_keys(hf), source=source)
    n = weights.classifier_num_labels(hf, source)
    if num_labels is not None and n != num_labels:
        raise weights.WeightsError(f"{source}: key 'output_layer_2.weight' has {n} labels, not the "
                                   f"num_labels={num_labels} asked for")
    try:
        head = ClassifierConfig(n)
    except ConfigError as e:
        raise weights.WeightsError(f"{source}: output_layer_2.weight: {e}") from None
    params = weights.seq_cls_hf_to_flax(hf, cfg, n, source=source)
    return LoadedCrossEncoder(cfg, head, params, tokenizer, _checked_length(max_length, cfg),
                              None, source)
