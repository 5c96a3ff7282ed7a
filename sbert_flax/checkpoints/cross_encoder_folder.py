"""The sentence-transformers `CrossEncoder` folder (a HF `BertForSequenceClassification` folder),
read and written without torch.

What sentence-transformers 6.3 saves (`CrossEncoder.save`), and what is read back here:

- `config.json`: the HF config, `architectures: ["BertForSequenceClassification"]`, the labels
  (`id2label`; its length is `num_labels`);
- `model.safetensors`: `bert.*` (backbone and pooler) and `classifier.*`;
- the tokenizer files; `tokenizer_config.json`'s `model_max_length` is the pair length
  (`CrossEncoder(max_length=...)` sets it);
- `config_sentence_transformers.json`: `model_type: "CrossEncoder"` and `activation_fn`, the
  dotted torch class applied to the logits in `predict` (Sigmoid or Identity);
- `modules.json` (one Transformer module) and `sentence_bert_config.json` (its task): without
  them sentence-transformers 6.3 does not read `config_sentence_transformers.json` at all.

Older releases kept the activation in `config.json` (`sentence_transformers.activation_fn`, v4 and
v5; `sbert_ce_default_activation_function` before); it is read from there too, in
sentence-transformers' order, and written there as well so those releases load our exports.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from sbert_flax.common.files import atomic_path, read_json, write_json
from sbert_flax.models.config import BertConfig, ConfigError
from sbert_flax.models.cross_encoder import ClassifierConfig
from sbert_flax.models.prompts import ST_CONFIG_FILE

ARCHITECTURE = "BertForSequenceClassification"
# Activation names -> the torch class sentence-transformers saves for them (`util.fullname`).
ACTIVATION_PATHS = {
    "sigmoid": "torch.nn.modules.activation.Sigmoid",
    "identity": "torch.nn.modules.linear.Identity",
    "tanh": "torch.nn.modules.activation.Tanh",
    "relu": "torch.nn.modules.activation.ReLU",
}
_ST_MODULE = "sentence_transformers.base.modules.transformer.Transformer"
_ST_TASK = {
    "transformer_task": "sequence-classification",
    "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
    "module_output_name": "scores",
}


def default_activation(num_labels: int) -> str:
    """sentence-transformers' default: Sigmoid for one label, Identity for several."""
    return "sigmoid" if num_labels == 1 else "identity"


def activation_from_path(path: str, source: str) -> str:
    """A saved torch class path (`torch.nn.modules.activation.Sigmoid`, `torch.nn.Sigmoid`) -> its
    name here; a class we do not reproduce is an error naming the file and the value."""
    short = path.rsplit(".", 1)[-1].lower()
    if not path.startswith("torch.") or short not in ACTIVATION_PATHS:
        raise ConfigError(f"{source}: activation_fn={path!r} is not supported; sbert-flax applies "
                          f"{sorted(ACTIVATION_PATHS)} (torch.nn's Sigmoid, Identity, Tanh, ReLU)")
    return short


@dataclasses.dataclass(frozen=True)
class CrossEncoderFolder:
    """What a HF / sentence-transformers cross-encoder folder says about the model.

    Attributes:
      model_dir: where config.json, the weights and the tokenizer are.
      config: the backbone architecture.
      num_labels: the labels config.json declares; None when it is not a sequence-classification
        config (a `BertModel` folder, which only a new head can turn into a cross-encoder).
      hf_config: config.json as read (its labels and extra fields go back out on export).
      activation: the saved activation's name, or None (sentence-transformers' default applies).
      max_length: `sentence_bert_config.json`'s `max_seq_length` (beside a modules.json), which
        sentence-transformers prefers to the tokenizer's `model_max_length`; usually None.
    """

    model_dir: str
    config: BertConfig
    num_labels: int | None
    hf_config: dict[str, Any]
    activation: str | None
    max_length: int | None = None


def _num_labels(d: dict[str, Any], source: str) -> int | None:
    if not any(a.endswith("ForSequenceClassification") for a in d.get("architectures") or []):
        return None
    # transformers' rule: id2label decides; without it num_labels, default 2.
    n = len(d["id2label"]) if isinstance(d.get("id2label"), dict) else d.get("num_labels", 2)
    try:
        return ClassifierConfig(n).num_labels
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _saved_activation(path: str, d: dict[str, Any], source: str) -> str | None:
    """The activation in sentence-transformers' order of precedence, or None."""
    st_file = os.path.join(path, ST_CONFIG_FILE)
    # config_sentence_transformers.json counts only beside a modules.json (see the module doc).
    if os.path.isfile(st_file) and os.path.isfile(os.path.join(path, "modules.json")):
        value = read_json(st_file).get("activation_fn")
        if value:
            return activation_from_path(value, st_file)
    st = d.get("sentence_transformers")
    if isinstance(st, dict) and st.get("activation_fn"):
        return activation_from_path(st["activation_fn"], source)
    if d.get("sbert_ce_default_activation_function"):
        return activation_from_path(d["sbert_ce_default_activation_function"], source)
    return None


def read_cross_encoder_folder(path: str) -> CrossEncoderFolder:
    """Parses a HF sequence-classification or sentence-transformers CrossEncoder folder.

    Raises:
      FileNotFoundError: no config.json.
      ConfigError: not a BERT, or an activation / label count sbert-flax cannot reproduce.
    """
    source = os.path.join(path, "config.json")
    d = read_json(source)
    cfg = BertConfig.from_hf_dict(d, source=source)
    max_length = None
    sb = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(sb) and os.path.isfile(os.path.join(path, "modules.json")):
        max_length = read_json(sb).get("max_seq_length")
    return CrossEncoderFolder(path, cfg, _num_labels(d, source), d,
                              _saved_activation(path, d, source), max_length)


def hf_classifier_config(cfg: BertConfig, head: ClassifierConfig,
                         base: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a `BertForSequenceClassification` with `head.num_labels` labels; the
    labels of `base` (the config read at load) are kept when their count still fits."""
    d = cfg.to_hf_dict()
    d["architectures"] = [ARCHITECTURE]
    d["classifier_dropout"] = head.classifier_dropout
    base = base or {}
    id2label = base.get("id2label")
    if not (isinstance(id2label, dict) and len(id2label) == head.num_labels):
        id2label = {str(i): f"LABEL_{i}" for i in range(head.num_labels)}
    d["id2label"] = {str(k): v for k, v in id2label.items()}
    d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
    return d


def write_cross_encoder_folder(dest: str, cfg: BertConfig, head: ClassifierConfig,
                               hf_state: dict[str, np.ndarray], tokenizer, max_length: int,
                               activation: str | None, base_config: dict[str, Any] | None = None
                               ) -> None:
    """Writes a sentence-transformers 6.3 CrossEncoder folder into the (created, empty) `dest`.

    Args:
      dest: the folder (an `atomic_directory` temp dir).
      cfg, head: the architecture.
      hf_state: `weight_maps.seq_cls_flax_to_hf` output.
      tokenizer: a `tokenization.Tokenizer`; saved with `model_max_length = max_length`.
      max_length: tokens per pair, what `CrossEncoder(path).max_length` reads back.
      activation: a name of `ACTIVATION_PATHS`, or None to leave sentence-transformers' default.
      base_config: config.json as loaded (keeps its labels).
    """
    from safetensors.numpy import save_file

    with atomic_path(os.path.join(dest, "model.safetensors")) as tmp:
        save_file(hf_state, tmp, metadata={"format": "pt"})
    hf = hf_classifier_config(cfg, head, base_config)
    st: dict[str, Any] = {"model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": None}
    if activation is not None:
        st["activation_fn"] = ACTIVATION_PATHS[activation]
        hf["sentence_transformers"] = {"activation_fn": ACTIVATION_PATHS[activation]}
    write_json(os.path.join(dest, "config.json"), hf)
    tokenizer.save(dest)
    tok_cfg_path = os.path.join(dest, "tokenizer_config.json")
    tok_cfg = read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
    write_json(tok_cfg_path, {**tok_cfg, "model_max_length": int(max_length)})
    write_json(os.path.join(dest, ST_CONFIG_FILE), st)
    write_json(os.path.join(dest, "modules.json"),
               [{"idx": 0, "name": "0", "path": "", "type": _ST_MODULE}])
    write_json(os.path.join(dest, "sentence_bert_config.json"), _ST_TASK)
