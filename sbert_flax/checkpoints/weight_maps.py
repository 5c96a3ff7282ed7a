"""Explicit PyTorch <-> Flax weight maps (HF BertModel, UER-py sbert and single-tower layouts).

Nothing is guessed: every Flax parameter is listed with the PyTorch key(s) it comes from and the
transform between them; loading checks that every key is present, every shape matches the
config, and every checkpoint key is used or on an explicit ignore list. Errors name the key.

The UER layouts are translated to the HF layout by a key table first (the same tables as UER-py's
`scripts/convert_{sbert,bert}_from_uer_to_huggingface.py`), so there is one HF -> Flax map.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping

import numpy as np

from sbert_flax.models.config import BertConfig, WeightsError  # noqa: F401  (WeightsError: re-exported)

StateDict = dict[str, np.ndarray]
FlaxPath = tuple[str | int, ...]


# --------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------

def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def _torch_load_reason(e: Exception) -> str:
    """The informative part of a `torch.load` error, on one line.

    With weights_only=True torch wraps every unpickling failure in a long message that suggests
    retrying with weights_only=False; for a corrupt file that advice is wrong (and unsafe), so
    keep only the unpickler's own reason.
    """
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(msg.split()) or type(e).__name__


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads `*.safetensors` (no torch needed) or `*.bin`/`*.pt` (needs torch) into numpy.

    Raises:
      FileNotFoundError: the file does not exist.
      WeightsError: the file is corrupt or not a state dict.
      ImportError: a `.bin` file and torch is not installed (says how to install it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises several error types for corrupt files
            raise WeightsError(f"{path}: cannot read safetensors file: it is corrupt, truncated or not "
                               f"safetensors ({type(e).__name__}: {e})") from None
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle checkpoint and reading it needs torch, which is not "
            "installed. Install the CPU build (pip install 'sbert-flax[torch]' or "
            "pip install torch==2.13.0), or convert the checkpoint to model.safetensors."
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read PyTorch checkpoint: it is corrupt, truncated or not "
                           f"saved with torch.save ({type(e).__name__}: {_torch_load_reason(e)})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    out: StateDict = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: key {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = _torch_to_numpy(v)
    return out


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def find_weights_file(model_dir: str | os.PathLike) -> str:
    """The weights file of a HF / sentence-transformers folder, safetensors preferred."""
    for name in WEIGHT_FILES:
        p = os.path.join(model_dir, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        f"{model_dir}: no weights file found (looked for {', '.join(WEIGHT_FILES)})"
    )


def read_weights(path: str) -> StateDict:
    """Reads a weights file, following a sharded-checkpoint `*.index.json` to its shards."""
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{path}: not a valid sharded-checkpoint index ({e})") from None
        state: StateDict = {}
        for shard in shards:
            state.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
        return state
    return read_state_dict(path)


# --------------------------------------------------------------------------------------------
# HF BertModel <-> Flax
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Port:
    """One Flax parameter and the HF tensors it is made of."""

    flax: FlaxPath
    hf: tuple[str, ...]
    to_flax: Callable[[list[np.ndarray]], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]
    hf_shapes: tuple[tuple[int, ...], ...]


def _same(ws: list[np.ndarray]) -> np.ndarray:
    return ws[0]


def _linear(ws: list[np.ndarray]) -> np.ndarray:
    return ws[0].T  # torch Linear stores [out, in]; we keep [in, out]


def hf_ports(cfg: BertConfig) -> list[Port]:
    """The complete HF `BertModel` <-> sbert-flax parameter map for `cfg`."""
    d, f, h, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    ports = [
        Port(("embeddings", "word_embeddings"), ("embeddings.word_embeddings.weight",),
             _same, lambda x: [x], ((cfg.vocab_size, d),)),
        Port(("embeddings", "position_embeddings"), ("embeddings.position_embeddings.weight",),
             _same, lambda x: [x], ((cfg.max_position_embeddings, d),)),
        Port(("embeddings", "token_type_embeddings"), ("embeddings.token_type_embeddings.weight",),
             _same, lambda x: [x], ((cfg.type_vocab_size, d),)),
        Port(("embeddings", "layer_norm", "scale"), ("embeddings.LayerNorm.weight",),
             _same, lambda x: [x], ((d,),)),
        Port(("embeddings", "layer_norm", "bias"), ("embeddings.LayerNorm.bias",),
             _same, lambda x: [x], ((d,),)),
    ]
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv = tuple(p + f"attention.self.{n}" for n in ("query", "key", "value"))
        ports += [
            # Fused QKV: three [D, D] torch weights -> one [D, 3, H, Dh] kernel.
            Port(("layers", i, "attention", "qkv_kernel"), tuple(k + ".weight" for k in qkv),
                 lambda ws: np.stack([w.T for w in ws], axis=1).reshape(d, 3, h, hd),
                 lambda x: [x.reshape(d, 3, d)[:, j].T for j in range(3)], ((d, d),) * 3),
            Port(("layers", i, "attention", "qkv_bias"), tuple(k + ".bias" for k in qkv),
                 lambda ws: np.stack(ws).reshape(3, h, hd),
                 lambda x: list(x.reshape(3, d)), ((d,),) * 3),
            Port(("layers", i, "attention", "out_kernel"), (p + "attention.output.dense.weight",),
                 lambda ws: ws[0].T.reshape(h, hd, d), lambda x: [x.reshape(d, d).T], ((d, d),)),
            Port(("layers", i, "attention", "out_bias"), (p + "attention.output.dense.bias",),
                 _same, lambda x: [x], ((d,),)),
            Port(("layers", i, "attention_norm", "scale"), (p + "attention.output.LayerNorm.weight",),
                 _same, lambda x: [x], ((d,),)),
            Port(("layers", i, "attention_norm", "bias"), (p + "attention.output.LayerNorm.bias",),
                 _same, lambda x: [x], ((d,),)),
            Port(("layers", i, "mlp", "wi_kernel"), (p + "intermediate.dense.weight",),
                 _linear, lambda x: [x.T], ((f, d),)),
            Port(("layers", i, "mlp", "wi_bias"), (p + "intermediate.dense.bias",),
                 _same, lambda x: [x], ((f,),)),
            Port(("layers", i, "mlp", "wo_kernel"), (p + "output.dense.weight",),
                 _linear, lambda x: [x.T], ((d, f),)),
            Port(("layers", i, "mlp", "wo_bias"), (p + "output.dense.bias",),
                 _same, lambda x: [x], ((d,),)),
            Port(("layers", i, "output_norm", "scale"), (p + "output.LayerNorm.weight",),
                 _same, lambda x: [x], ((d,),)),
            Port(("layers", i, "output_norm", "bias"), (p + "output.LayerNorm.bias",),
                 _same, lambda x: [x], ((d,),)),
        ]
    return ports


# Keys a HF checkpoint may carry that the sentence encoder does not use.
HF_IGNORED = (
    re.compile(r"^embeddings\.position_ids$"),  # a buffer, not a weight
    re.compile(r"^pooler\."),                   # BERT pooler: not part of sentence embeddings
    re.compile(r"^cls\."),                      # pre-training heads (BertForPreTraining)
)


def canonical_hf_keys(state: Mapping[str, np.ndarray]) -> StateDict:
    """Strips the `bert.` prefix of task models and renames legacy TF-era `gamma`/`beta`."""
    prefixed = any(k.startswith("bert.") for k in state)
    out: StateDict = {}
    for k, v in state.items():
        if prefixed and k.startswith("bert."):
            k = k[len("bert."):]
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


def _set_path(tree: dict, path: FlaxPath, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: FlaxPath):
    for p in path:
        tree = tree[p]
    return tree


def hf_to_flax(state: Mapping[str, np.ndarray], cfg: BertConfig, source: str = "checkpoint") -> dict:
    """HF BertModel state dict -> nested dict of float32 numpy arrays for `BertModel`.

    Raises:
      WeightsError: a key is missing, has the wrong shape, or is not used (names them).
    """
    state = canonical_hf_keys(state)
    used: set[str] = set()
    params: dict = {}
    missing: list[str] = []
    for port in hf_ports(cfg):
        ws = []
        for key, shape in zip(port.hf, port.hf_shapes, strict=True):
            if key not in state:
                missing.append(key)
                continue
            w = np.asarray(state[key])
            if w.shape != shape:
                raise WeightsError(
                    f"{source}: key {key!r} has shape {w.shape} but the config needs {shape} "
                    "(does config.json belong to these weights?)"
                )
            ws.append(w.astype(np.float32))
            used.add(key)
        if len(ws) == len(port.hf):
            _set_path(params, port.flax, port.to_flax(ws))
    if missing:
        raise WeightsError(f"{source}: missing {len(missing)} key(s), first: {missing[:5]}")
    unused = sorted(k for k in state if k not in used and not any(r.search(k) for r in HF_IGNORED))
    if unused:
        raise WeightsError(
            f"{source}: {len(unused)} unexpected key(s) not in the BERT map, first: {unused[:5]} "
            f"(the config has {cfg.num_hidden_layers} layers)"
        )
    return params


def flax_to_hf(params: Mapping, cfg: BertConfig) -> StateDict:
    """Nested Flax params -> HF `BertModel` state dict (contiguous float32 numpy)."""
    out: StateDict = {}
    for port in hf_ports(cfg):
        value = np.asarray(_get_path(params, port.flax), dtype=np.float32)
        for key, w in zip(port.hf, port.to_hf(value), strict=True):
            out[key] = np.ascontiguousarray(w)
    return out


# --------------------------------------------------------------------------------------------
# HF BertForSequenceClassification (cross-encoders) <-> Flax `SequenceClassifier`
# --------------------------------------------------------------------------------------------

# The head's HF keys as `canonical_hf_keys` leaves them (the `bert.` prefix stripped) -> as a
# `BertForSequenceClassification` state dict names them (what errors and exports say).
_HEAD_HF_NAMES = {
    "pooler.dense.weight": "bert.pooler.dense.weight",
    "pooler.dense.bias": "bert.pooler.dense.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}


def classifier_head_ports(cfg: BertConfig, num_labels: int) -> list[Port]:
    """The pooler (dense + tanh) and classifier of `BertForSequenceClassification` (canonical
    keys, without `bert.`): torch Linear [out, in] <-> our Dense [in, out]."""
    d = cfg.hidden_size
    return [
        Port(("pooler", "kernel"), ("pooler.dense.weight",), _linear, lambda x: [x.T], ((d, d),)),
        Port(("pooler", "bias"), ("pooler.dense.bias",), _same, lambda x: [x], ((d,),)),
        Port(("classifier", "kernel"), ("classifier.weight",), _linear, lambda x: [x.T],
             ((num_labels, d),)),
        Port(("classifier", "bias"), ("classifier.bias",), _same, lambda x: [x], ((num_labels,),)),
    ]


def classifier_num_labels(state: Mapping[str, np.ndarray], source: str = "checkpoint") -> int | None:
    """The number of labels the checkpoint's `classifier.weight` has; None if it has none."""
    w = canonical_hf_keys(state).get("classifier.weight")
    if w is None:
        return None
    if np.ndim(w) != 2:
        raise WeightsError(f"{source}: key 'classifier.weight' has shape {np.shape(w)}; "
                           "expected [num_labels, hidden]")
    return int(np.shape(w)[0])


def seq_cls_hf_to_flax(state: Mapping[str, np.ndarray], cfg: BertConfig, num_labels: int,
                       source: str = "checkpoint", head: Mapping | None = None) -> dict:
    """HF `BertForSequenceClassification` state dict -> `SequenceClassifier` params
    ({"backbone", "pooler", "classifier"}, float32 numpy).

    Args:
      state: the state dict (`bert.*` backbone and pooler, `classifier.*`).
      cfg, num_labels: the architecture every shape is checked against.
      source: the file, for messages.
      head: a new head's params (`init_head_params`) for the parts the checkpoint lacks (a
        `BertModel` checkpoint: no classifier, maybe a pooler); None requires all four keys.

    Raises:
      WeightsError: a key is missing (named as `BertForSequenceClassification` names it), has
        the wrong shape, or is not used.
    """
    canon = canonical_hf_keys(state)
    body = {k: v for k, v in canon.items() if k not in _HEAD_HF_NAMES}
    params = {"backbone": hf_to_flax(body, cfg, source=source)}
    missing = []
    for port in classifier_head_ports(cfg, num_labels):
        (key,), (shape,) = port.hf, port.hf_shapes
        if key not in canon:
            if head is None:
                missing.append(_HEAD_HF_NAMES[key])
            else:
                _set_path(params, port.flax, np.asarray(_get_path(head, port.flax), np.float32))
            continue
        w = np.asarray(canon[key])
        if w.shape != shape:
            raise WeightsError(f"{source}: key {_HEAD_HF_NAMES[key]!r} has shape {w.shape} but the "
                               f"config needs {shape} (num_labels={num_labels}, hidden_size="
                               f"{cfg.hidden_size})")
        _set_path(params, port.flax, port.to_flax([w.astype(np.float32)]))
    if missing:
        raise WeightsError(f"{source}: missing {len(missing)} key(s) of the sequence-classification "
                           f"head: {missing} (is this a BertForSequenceClassification checkpoint?)")
    return params


def seq_cls_flax_to_hf(params: Mapping, cfg: BertConfig, num_labels: int) -> StateDict:
    """`SequenceClassifier` params -> HF `BertForSequenceClassification` state dict."""
    out = {f"bert.{k}": v for k, v in flax_to_hf(params["backbone"], cfg).items()}
    for port in classifier_head_ports(cfg, num_labels):
        value = np.asarray(_get_path(params, port.flax), dtype=np.float32)
        out[_HEAD_HF_NAMES[port.hf[0]]] = np.ascontiguousarray(port.to_hf(value)[0])
    return out
