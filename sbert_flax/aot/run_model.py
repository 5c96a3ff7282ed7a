"""The model a `TrainConfig` trains, resolved as `Trainer` resolves it, and its own sequence length.

`sbert-flax compile --model` takes what `train --pretrained_model_path` takes (a model folder, or
a UER `.bin` with --vocab_path and --config_path), read by the training loader itself
(`training.pretrained.load_pretrained`: the pooling from --pooling, a UER config or the loss's
default), plus a bare BERT `config.json`: the architecture is all that is compiled.
"""

from __future__ import annotations

import dataclasses
import os

from sbert_flax.models.config import BertConfig, PoolingConfig, pooling_from_uer
from sbert_flax.training.train_config import CROSS_ENCODER_LOSSES, TrainConfig


@dataclasses.dataclass(frozen=True)
class RunModel:
    """The backbone of a run.

    Attributes:
      config: the architecture (the run's remat / scan_layers are set later, by `run_parts`).
      pooling: the pooling the run trains with.
      max_seq_length: the model's own, what `encode` and `serve` run at (a bare config.json:
        max_position_embeddings, sentence-transformers' rule for a folder without
        sentence_bert_config.json when no tokenizer says less); the run's --seq_length when
        `resolve` was not asked for it.
    """

    config: BertConfig
    pooling: PoolingConfig
    max_seq_length: int


def _default_pooling(cfg: TrainConfig) -> str | None:
    # Trainer's rule: softmax trains UER's "cls" unless told; the embedding losses the folder's own.
    return "cls" if cfg.loss == "softmax" else None


def _bare_config(cfg: TrainConfig) -> RunModel:
    from sbert_flax.checkpoints.uer import read_uer_config

    config = BertConfig.from_json_file(cfg.pretrained_model_path)
    # load_pretrained's order: --pooling, a UER config's, the loss's default; then (no folder to
    # ask) mean, as sentence-transformers pools a bare BERT.
    uer = read_uer_config(cfg.config_path)[0] if cfg.config_path else None
    mode = pooling_from_uer(cfg.pooling) if cfg.pooling else (uer or _default_pooling(cfg) or "mean")
    return RunModel(config, PoolingConfig(mode), config.max_position_embeddings)


def resolve(cfg: TrainConfig, *, encode_seq_length: bool = False) -> RunModel:
    """The model of `cfg.pretrained_model_path` (with `cfg.vocab_path`, `cfg.config_path`,
    `cfg.pooling`), as `Trainer` loads it.

    Args:
      cfg: the run.
      encode_seq_length: also read the model's own max_seq_length (a model folder is then read a
        second time, without the run's --seq_length; otherwise `max_seq_length` is the run's).

    Raises:
      ValueError: --seq_length beyond the model's positions, a UER `.bin` without its vocab and
        config; ModelNotFoundError, WeightsError: as `sbert-flax train` raises them.
    """
    path = cfg.pretrained_model_path
    if cfg.loss in CROSS_ENCODER_LOSSES:
        # Their batches are token-type pairs under a classifier head, which the compiled targets
        # do not build yet; refusing here beats a weights error about an unexpected classifier.
        raise ValueError(f"sbert-flax compile does not check cross-encoder runs yet (--loss "
                         f"{cfg.loss}); compile the embedding losses, or run `sbert-flax train "
                         "--max_steps 1` on the target to try a cross-encoder run")
    if not path:
        raise ValueError("no model: pass --model (a model folder or a BERT config.json), or "
                         "pretrained_model_path in --config")
    if os.path.isfile(path) and path.endswith(".json"):
        model = _bare_config(cfg)
    else:
        from sbert_flax.checkpoints.loading import load_model
        from sbert_flax.checkpoints.pretrained import load_pretrained

        pre = load_pretrained(path, vocab_path=cfg.vocab_path, config_path=cfg.config_path,
                              pooling=cfg.pooling, seq_length=cfg.seq_length,
                              default_pooling=_default_pooling(cfg))
        msl = cfg.seq_length
        if encode_seq_length:  # as `SentenceEncoder.from_pretrained` reads the model
            msl = load_model(path, vocab_path=cfg.vocab_path,
                             config_path=cfg.config_path if os.path.isfile(path) else None
                             ).max_seq_length
        model = RunModel(pre.config, pre.pooling_config, msl)
    if cfg.seq_length > model.config.max_position_embeddings:
        raise ValueError(f"--seq_length {cfg.seq_length} exceeds the model's "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    return model
