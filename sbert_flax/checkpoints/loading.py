"""One pure loader: any supported source -> host-side config, params, tokenizer, pooling, length.

Sources: an sbert-flax folder, a Hugging Face / sentence-transformers folder, a hub id (fetched
with huggingface_hub), or a UER-py checkpoint file (`.bin`, with its vocab and config). Nothing is
put on a device: `SentenceEncoder` and the trainer each place the params where they need them.
"""

from __future__ import annotations

import dataclasses
import os

from sbert_flax.checkpoints import hub, uer
from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.checkpoints.flax_folder import is_flax_folder, read_flax_folder
from sbert_flax.checkpoints.hub import (
    DEFAULT_MODEL,  # noqa: F401 -- re-exported: its old home
    ModelNotFoundError,  # noqa: F401 -- its home for callers and errors.py
)
from sbert_flax.checkpoints.st_folder import read_st_folder
from sbert_flax.common.files import read_json
from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.models.embedder import check_backbone_params
from sbert_flax.models.prompts import Prompts
from sbert_flax.models.tokenization import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model on the host.

    Attributes:
      config: the backbone architecture.
      params: the backbone's params, a nested dict of float32 numpy arrays (`weights.hf_to_flax`).
      tokenizer: host-side tokenizer.
      pooling: pooling mode and whether the model normalises.
      max_seq_length: tokens per sentence incl. [CLS]/[SEP].
      source: where it came from (for messages and /info).
      prompts: named prompts and the default one (sentence-transformers' prompts).
    """

    config: BertConfig
    params: dict
    tokenizer: Tokenizer
    pooling: PoolingConfig
    max_seq_length: int
    source: str = ""
    prompts: Prompts = dataclasses.field(default_factory=Prompts)


def resolve_model_path(path: str, *, revision: str | None = None, token: str | bool | None = None,
                       cache_dir: str | None = None) -> str:
    """A local directory as is; otherwise a hub id, of which only what is read is fetched."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelNotFoundError(f"model directory not found: {path}")
    return hub.download(path, revision=revision, token=token, cache_dir=cache_dir)


def load_model(source: str = DEFAULT_MODEL, *, pooling: str | None = None,
               max_seq_length: int | None = None, normalize: bool | None = None,
               vocab_path: str | None = None, config_path: str | None = None,
               tower: int | None = None, uer_max_seq_length: int = 128,
               revision: str | None = None, token: str | bool | None = None,
               cache_dir: str | None = None) -> LoadedModel:
    """Loads a model onto the host from any supported source.

    Args:
      source: sbert-flax dir, HF / sentence-transformers dir, hub id, or UER-py `.bin` file.
      pooling: "cls" | "mean" | "max" to override the source's pooling (UER checkpoints default
        to "cls", UER-py's "first").
      max_seq_length: override the source's sequence length.
      normalize: override whether the model L2-normalises its embeddings.
      vocab_path: a vocab file; required for a UER `.bin`, overrides a folder's tokenizer.
      config_path: required for a UER `.bin`: its UER config json or an HF config.json.
      tower: UER sbert checkpoints: None requires tied towers and takes tower 0; 0 or 1 takes that
        tower (see `uer.uer_to_hf`).
      uer_max_seq_length: a UER checkpoint's sequence length when `max_seq_length` is None.
      revision: hub ids: branch, tag or commit to fetch (default: the default branch).
      token: hub ids: access token for gated / private models (None: HF_TOKEN or the saved login).
      cache_dir: hub ids: the download cache (default: huggingface_hub's).

    Raises:
      ModelNotFoundError: not local and not downloadable (offline, auth, not found, disk full).
      weights.WeightsError, ConfigError, ValueError: the files do not fit together (names which).
    """
    # A UER checkpoint is a file; with its vocab and config given, a missing one is reported by
    # the UER path (vocab first: cheap) rather than as a missing model folder.
    if os.path.isfile(source) or (config_path and vocab_path and not os.path.isdir(source)):
        if not (vocab_path and config_path):
            raise ValueError(f"{source} is a UER-py checkpoint file: pass vocab_path (e.g. "
                             "models/google_zh_vocab.txt) and config_path (its config json)")
        tokenizer = load_tokenizer(vocab_path)  # cheap: a bad vocab fails before the big read
        state = weights.read_state_dict(source)
        cfg_dict = read_json(config_path)
        hf = uer.uer_to_hf(state, tower=tower, source=source)
        if uer.is_hf_config(cfg_dict):
            cfg = BertConfig.from_hf_dict(cfg_dict, source=config_path)
        else:
            cfg = uer.config_from_uer_hf(cfg_dict, hf, source=source)
        params = weights.hf_to_flax(hf, cfg, source=source)
        pool_cfg, msl, prompts = PoolingConfig("cls"), uer_max_seq_length, Prompts()
    else:
        local = resolve_model_path(source, revision=revision, token=token, cache_dir=cache_dir)
        if is_flax_folder(local):
            folder = read_flax_folder(local)
            check_backbone_params(folder.params, folder.config, local)
            cfg, params, pool_cfg, msl = folder.config, folder.params, folder.pooling, folder.max_seq_length
            lower, tok_dir, prompts = folder.lowercase_text, local, folder.prompts
        else:
            st = read_st_folder(local)
            cfg = st.config
            wfile = weights.find_weights_file(st.model_dir)
            # Errors name the weights file; the config they were checked against is beside it.
            params = weights.hf_to_flax(weights.read_weights(wfile), cfg, source=wfile)
            pool_cfg, msl, lower, tok_dir = st.pooling, st.max_seq_length, st.lowercase_text, st.model_dir
            prompts = st.prompts
        tokenizer = load_tokenizer(vocab_path or tok_dir, lowercase_text=lower)
        if msl is None:
            # sentence-transformers' rule for folders without sentence_bert_config.json.
            msl = min(tokenizer.model_max_length, cfg.max_position_embeddings)
    pool_cfg = PoolingConfig(pooling or pool_cfg.mode,
                             pool_cfg.normalize if normalize is None else normalize)
    msl = int(max_seq_length or msl)
    if not 2 <= msl <= cfg.max_position_embeddings:
        raise ValueError(f"max_seq_length={msl} must be in [2, max_position_embeddings="
                         f"{cfg.max_position_embeddings}]")
    return LoadedModel(cfg, params, tokenizer, pool_cfg, msl, source, prompts)
