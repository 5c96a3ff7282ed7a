"""UER-py checkpoints, read in one place: the config json (its pooling, the fields sbert-flax does
not use, its architecture checked against the weights) and the state dict (the single-tower and
sbert layouts, the explicit key map to Hugging Face's names, the `run_classifier` head, and the
BertConfig its shapes give).

`loading.load_model` reads a UER `.bin` through `uer_to_hf` + `config_from_uer_hf`;
`pretrained.load_pretrained` reads the config json through `read_uer_config` and
`check_uer_architecture`; the cross-encoder loader through `uer_classifier_to_hf`. UER-py's own
conversion command (`scripts/convert_sbert_from_uer_to_huggingface.py`) is ported as is in
`uer_sbert_to_hf.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from sbert_flax.checkpoints.weight_maps import _HEAD_HF_NAMES, StateDict, canonical_hf_keys
from sbert_flax.common.files import read_json
from sbert_flax.models.config import BertConfig, WeightsError, pooling_from_uer

# ---- the config json -------------------------------------------------------------------------

# UER config fields that matter here: the architecture (checked against the weights), the
# pooling, and the nesting of sbert configs.
UER_USED_FIELDS = frozenset({
    "pooling", "heads_num", "hidden_act", "layernorm_eps", "dropout", "hidden_size", "emb_size",
    "feedforward_size", "layers_num", "max_seq_length", "stream_0", "stream_1", "tie_weights",
})
# Fields that describe exactly the architecture we implement (post-LN BERT), so they are fine
# with these values and need no warning.
UER_EXPECTED = {
    "embedding": ["word", "pos", "seg"], "encoder": "transformer", "mask": "fully_visible",
    "layernorm_positioning": "post", "feed_forward": "dense", "layernorm": "normal",
    "remove_embedding_layernorm": False, "data_processor": "bert", "target": ["sbert"],
}
# UER config field -> the BertConfig field read from the weights' shapes.
UER_ARCH_FIELDS = {"hidden_size": "hidden_size", "emb_size": "hidden_size",
                   "layers_num": "num_hidden_layers", "feedforward_size": "intermediate_size",
                   "heads_num": "num_attention_heads"}


def _flat_uer(d: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = dict(d)
    for stream in ("stream_0", "stream_1"):
        if isinstance(d.get(stream), dict):
            flat.update({k: v for k, v in d[stream].items() if k not in flat})
    return flat


def read_uer_config(path: str) -> tuple[str | None, list[str]]:
    """The pooling named by a UER (sbert) config json, and the fields training ignores."""
    flat = _flat_uer(read_json(path))
    ignored = sorted(k for k, v in flat.items()
                     if k not in UER_USED_FIELDS and UER_EXPECTED.get(k, object()) != v)
    pooling = flat.get("pooling")
    return (pooling_from_uer(pooling) if pooling else None), ignored


def check_uer_architecture(uer_cfg: dict[str, Any], cfg: BertConfig, source: str) -> None:
    """The UER json's architecture fields must match what the weights hold.

    Raises:
      WeightsError: names the field, the json's value and the weights' (e.g. a 768/12-layer json
        next to 8-wide 2-layer weights).
    """
    flat = _flat_uer(uer_cfg)
    for field, attr in UER_ARCH_FIELDS.items():
        if field in flat and flat[field] is not None and int(flat[field]) != getattr(cfg, attr):
            raise WeightsError(f"{source}: config says {field}={flat[field]} but the weights have "
                               f"{attr}={getattr(cfg, attr)}; the config json and the checkpoint "
                               "do not belong together")


def is_hf_config(d: Mapping[str, Any]) -> bool:
    """Whether a config dict is Hugging Face's (config.json) rather than UER-py's: a UER `.bin`
    may come with either."""
    return "model_type" in d or "num_hidden_layers" in d


def is_hf_config_file(path: str) -> bool:
    """`is_hf_config` of a json file."""
    return is_hf_config(read_json(path))


# --------------------------------------------------------------------------------------------
# UER-py / TencentPretrain layouts -> HF
# --------------------------------------------------------------------------------------------

UerLayout = Literal["sbert", "single", "single_legacy"]

_UER_LAYER = {
    "self_attn.linear_layers.0.weight": "attention.self.query.weight",
    "self_attn.linear_layers.0.bias": "attention.self.query.bias",
    "self_attn.linear_layers.1.weight": "attention.self.key.weight",
    "self_attn.linear_layers.1.bias": "attention.self.key.bias",
    "self_attn.linear_layers.2.weight": "attention.self.value.weight",
    "self_attn.linear_layers.2.bias": "attention.self.value.bias",
    "self_attn.final_linear.weight": "attention.output.dense.weight",
    "self_attn.final_linear.bias": "attention.output.dense.bias",
    "layer_norm_1.gamma": "attention.output.LayerNorm.weight",
    "layer_norm_1.beta": "attention.output.LayerNorm.bias",
    "feed_forward.linear_1.weight": "intermediate.dense.weight",
    "feed_forward.linear_1.bias": "intermediate.dense.bias",
    "feed_forward.linear_2.weight": "output.dense.weight",
    "feed_forward.linear_2.bias": "output.dense.bias",
    "layer_norm_2.gamma": "output.LayerNorm.weight",
    "layer_norm_2.beta": "output.LayerNorm.bias",
}

_UER_EMB_NAMES = {
    # layout -> (word, position, segment) embedding key stems
    "sbert": ("word.embedding", "pos.embedding", "seg.embedding"),
    "single": ("word.embedding", "pos.embedding", "seg.embedding"),
    "single_legacy": ("word_embedding", "position_embedding", "segment_embedding"),
}

# Keys of a UER checkpoint that are not part of the sentence encoder.
UER_IGNORED = (
    re.compile(r"^target\."),          # pre-training heads (MLM / NSP / SOP)
    re.compile(r"^classifier\."),      # fine-tuning heads
    re.compile(r"^output_layer"),
)


def _uer_prefixes(layout: UerLayout, tower: int) -> tuple[str, str]:
    if layout == "sbert":
        return f"embedding.embedding_{tower}.", f"encoder.encoder_{tower}.transformer."
    return "embedding.", "encoder.transformer."


def uer_key_map(layout: UerLayout, num_layers: int, tower: int = 0) -> dict[str, str]:
    """UER key -> HF key, for every tensor of the encoder (the segment table is remapped too)."""
    emb, enc = _uer_prefixes(layout, tower)
    word, pos, seg = _UER_EMB_NAMES[layout]
    table = {
        f"{emb}{word}.weight": "embeddings.word_embeddings.weight",
        f"{emb}{pos}.weight": "embeddings.position_embeddings.weight",
        f"{emb}{seg}.weight": "embeddings.token_type_embeddings.weight",
        f"{emb}layer_norm.gamma": "embeddings.LayerNorm.weight",
        f"{emb}layer_norm.beta": "embeddings.LayerNorm.bias",
    }
    for i in range(num_layers):
        for uk, hk in _UER_LAYER.items():
            table[f"{enc}{i}.{uk}"] = f"encoder.layer.{i}.{hk}"
    return table


def detect_uer_layout(state: Mapping[str, np.ndarray]) -> UerLayout:
    if any(k.startswith("embedding.embedding_0.") for k in state):
        return "sbert"
    if "embedding.word.embedding.weight" in state:
        return "single"
    if "embedding.word_embedding.weight" in state:
        return "single_legacy"
    raise WeightsError(
        "not a UER-py checkpoint: found neither 'embedding.embedding_0.*' (sbert), "
        "'embedding.word.embedding.weight' nor 'embedding.word_embedding.weight' (single tower)"
    )


def uer_num_layers(state: Mapping[str, np.ndarray], layout: UerLayout, tower: int = 0) -> int:
    _, enc = _uer_prefixes(layout, tower)
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(enc) + r"(\d+)\.", k))}
    if not idx or idx != set(range(max(idx) + 1)):
        raise WeightsError(f"UER checkpoint: transformer layers under {enc!r} are {sorted(idx)}, "
                           "expected 0..N-1")
    return max(idx) + 1


def uer_to_hf(state: Mapping[str, np.ndarray], layout: UerLayout | None = None,
              tower: int | None = None, source: str = "checkpoint") -> StateDict:
    """Translates a UER-py sbert / single-tower state dict into HF `BertModel` keys.

    UER's segment table has a row for "padding segment" 0 before segments A and B; HF's
    token-type table has no such row, so the first row is dropped (as UER-py's converter does).
    For the sbert layout with `tower=None` the other tower's keys are accepted only if they equal
    tower 0's (UER's `tie_weights`), so untied towers are never silently dropped; an explicit
    `tower=0` or `tower=1` takes that tower and ignores the other.
    """
    # An explicit tower is the only way to load an untied checkpoint (the error below says so);
    # before, the tie check ran whatever tower was asked for, so that advice could not be followed.
    check_tied = tower is None
    tower = 0 if tower is None else tower
    layout = layout or detect_uer_layout(state)
    n = uer_num_layers(state, layout, tower)
    table = uer_key_map(layout, n, tower)
    out: StateDict = {}
    missing = [k for k in table if k not in state]
    if missing:
        raise WeightsError(f"{source}: UER {layout} checkpoint is missing {len(missing)} key(s), "
                           f"first: {missing[:5]}")
    for uk, hk in table.items():
        out[hk] = np.asarray(state[uk])
    seg = out["embeddings.token_type_embeddings.weight"]
    if seg.ndim != 2 or seg.shape[0] < 2:
        raise WeightsError(f"{source}: UER segment embedding has shape {seg.shape}; expected "
                           "[1 + type_vocab_size, hidden]")
    out["embeddings.token_type_embeddings.weight"] = seg[1:]
    other_ok: set[str] = set()
    if layout == "sbert":
        other = 1 - tower
        for uk in uer_key_map(layout, n, other):
            if uk in state:
                mine = uk.replace(f"embedding_{other}.", f"embedding_{tower}.").replace(
                    f"encoder_{other}.", f"encoder_{tower}.")
                if check_tied and not np.array_equal(state[uk], state[mine]):
                    raise WeightsError(
                        f"{source}: towers are not tied ({uk!r} differs from {mine!r}); "
                        f"choose one explicitly with tower=0 or tower=1")
                other_ok.add(uk)
    unused = sorted(k for k in state if k not in table and k not in other_ok
                    and not any(r.search(k) for r in UER_IGNORED))
    if unused:
        raise WeightsError(f"{source}: {len(unused)} unexpected key(s) in UER {layout} checkpoint, "
                           f"first: {unused[:5]}")
    return out


def hf_to_uer(state: Mapping[str, np.ndarray], layout: UerLayout, num_layers: int,
              tower: int = 0) -> StateDict:
    """The inverse of `uer_to_hf` (a zero "padding segment" row is prepended)."""
    hf = canonical_hf_keys(state)
    out: StateDict = {}
    for uk, hk in uer_key_map(layout, num_layers, tower).items():
        w = np.asarray(hf[hk])
        if hk == "embeddings.token_type_embeddings.weight":
            w = np.concatenate([np.zeros_like(w[:1]), w], axis=0)
        out[uk] = w
    return out


def config_from_uer(uer_cfg: Mapping, state: Mapping[str, np.ndarray], source: str,
                    tower: int | None = None) -> BertConfig:
    """A BertConfig from a UER-py model config json plus shapes read off the weights.

    Only what changes the maths is read; UER training fields (batch size, lr, ...) are ignored.
    The LayerNorm eps defaults to 1e-12, what the published HF conversions declare.
    `tower` as in `uer_to_hf`.
    """
    return config_from_uer_hf(uer_cfg, uer_to_hf(state, tower=tower, source=source), source)


def config_from_uer_hf(uer_cfg: Mapping, hf: Mapping[str, np.ndarray], source: str) -> BertConfig:
    """`config_from_uer` for weights already translated by `uer_to_hf` (saves a second pass)."""
    if isinstance(uer_cfg.get("stream_0"), Mapping):
        # UER's sbert configs (models/sbert/*.json) nest each tower's fields under stream_0/1.
        uer_cfg = {**uer_cfg, **uer_cfg["stream_0"]}
    vocab, hidden = hf["embeddings.word_embeddings.weight"].shape
    heads = uer_cfg.get("heads_num")
    if heads is None:
        raise WeightsError(f"{source}: UER config has no 'heads_num'; cannot infer attention heads")
    n_layers = sum(1 for k in hf if k.endswith("attention.self.query.weight"))
    # UER names the tanh approximation "gelu_fast"; its "gelu" is the exact erf form, like HF.
    act = {"gelu": "gelu", "gelu_fast": "gelu_new", "relu": "relu"}.get(
        uer_cfg.get("hidden_act", "gelu"))
    if act is None:
        raise WeightsError(f"{source}: UER hidden_act={uer_cfg.get('hidden_act')!r} is not supported")
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=int(heads),
        intermediate_size=hf["encoder.layer.0.intermediate.dense.weight"].shape[0],
        hidden_act=act,
        max_position_embeddings=hf["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=hf["embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=float(uer_cfg.get("layernorm_eps", 1e-12) or 1e-12),
        hidden_dropout_prob=float(uer_cfg.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(uer_cfg.get("dropout", 0.1)),
    )


# UER-py's run_classifier head (finetune/run_classifier.py: tanh(output_layer_1(first token)),
# then output_layer_2) -> HF, as UER-py's scripts/convert_bert_text_classification_from_uer_to_
# huggingface.py maps it.
UER_CLASSIFIER_HEAD = {
    "output_layer_1.weight": "bert.pooler.dense.weight",
    "output_layer_1.bias": "bert.pooler.dense.bias",
    "output_layer_2.weight": "classifier.weight",
    "output_layer_2.bias": "classifier.bias",
}


def uer_classifier_to_hf(state: Mapping[str, np.ndarray], source: str = "checkpoint") -> StateDict:
    """A UER-py `run_classifier` checkpoint -> HF `BertForSequenceClassification` keys.

    The encoder goes through `uer_to_hf` (single-tower layouts, the segment table's padding row
    dropped); the head through `UER_CLASSIFIER_HEAD`. Any other `output_layer*` key is an error:
    it would be a head this map does not know.

    Raises:
      WeightsError: a head key missing, an unknown head key, or an encoder error (names them).
    """
    missing = [k for k in UER_CLASSIFIER_HEAD if k not in state]
    if missing:
        raise WeightsError(f"{source}: missing UER classifier key(s) {missing} (a run_classifier "
                           "checkpoint has output_layer_1.* and output_layer_2.*)")
    extra = sorted(k for k in state if k.startswith("output_layer") and k not in UER_CLASSIFIER_HEAD)
    if extra:
        raise WeightsError(f"{source}: unexpected UER head key(s) {extra[:5]}; only run_classifier's "
                           "output_layer_1 / output_layer_2 head is supported")
    body = {k: v for k, v in state.items() if k not in UER_CLASSIFIER_HEAD}
    out = {f"bert.{k}": v for k, v in uer_to_hf(body, source=source).items()}
    for uk, hk in UER_CLASSIFIER_HEAD.items():
        out[hk] = np.asarray(state[uk])
    return out


def hf_to_uer_classifier(state: Mapping[str, np.ndarray], layout: UerLayout,
                         num_layers: int) -> StateDict:
    """The inverse of `uer_classifier_to_hf` (a zero padding-segment row is prepended)."""
    canon = canonical_hf_keys(state)
    out = hf_to_uer({k: v for k, v in canon.items() if k not in _HEAD_HF_NAMES}, layout, num_layers)
    for uk, hk in UER_CLASSIFIER_HEAD.items():
        out[uk] = np.asarray(canon[hk.removeprefix("bert.")])
    return out
