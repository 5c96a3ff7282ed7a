"""UER-py siamese (sbert) checkpoint -> Hugging Face `BertModel` state dict, as UER-py writes it.

The counterpart of UER-py's `scripts/convert_sbert_from_uer_to_huggingface.py`, the second
command of the uer/sbert-base-chinese-nli model card. Its output is that script's output:

- tower 0 only (`embedding.embedding_0.*`, `encoder.encoder_0.*`); tower 1, the classifier
  and any pre-training target are left out;
- HF `BertModel` key names *without* a `bert.` prefix, in UER-py's order;
- the segment table without UER's row 0 (the "padding segment"), so segments A/B become HF
  token types 0/1;
- no pooler (a siamese checkpoint has none: `BertModel` will report `pooler.dense.*` missing);
- tensors as stored (dtype unchanged), written with `torch.save` as an ordered dict.

Where UER-py's script would silently write something else, this one stops and names the key: a
`layers_num` smaller than the checkpoint's depth (UER-py drops the extra layers), missing keys,
shapes that do not fit one BERT, keys that belong to no tower. The output is written atomically.
The key table is `uer.uer_key_map`, the same one `sbert-flax convert` loads UER files with.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

from sbert_flax.checkpoints.uer import UER_IGNORED, detect_uer_layout, uer_key_map
from sbert_flax.checkpoints.weight_maps import WeightsError, _torch_load_reason, hf_ports
from sbert_flax.common.files import atomic_write
from sbert_flax.models.config import BertConfig

TOWER = 0  # UER-py's script always takes the first tower
_SEGMENT_KEY = "embeddings.token_type_embeddings.weight"
_LAYER_RE = re.compile(r"^encoder\.encoder_0\.transformer\.(\d+)\.")


def read_uer_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a UER-py `.bin` as torch tensors, dtypes untouched (the output keeps them).

    `weights.read_state_dict` turns tensors into float32 numpy, which would change an fp16
    checkpoint's output; here the tensors pass through as UER-py's script passes them.

    Raises:
      FileNotFoundError: no such file.
      WeightsError: not a torch-saved state dict (corrupt, truncated, or not a mapping of tensors).
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        hint = ""
        run_dir = path[:-4] if path.endswith(".bin") else ""
        if run_dir and os.path.isdir(os.path.join(run_dir, "best_model_pytorch")):
            # `train/run_classifier_siamese.py --output_model_path X.bin` writes the run folder X/.
            hint = (f"; {run_dir}/ is an sbert-flax training run: its best_model_pytorch/ already "
                    "holds the Hugging Face weights (model.safetensors)")
        raise FileNotFoundError(f"--input_model_path: UER checkpoint not found: {path}{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read PyTorch checkpoint: it is corrupt, truncated or not "
                           f"saved with torch.save ({type(e).__name__}: {_torch_load_reason(e)})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (mapping of name -> tensor), "
                           f"got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: key {k!r} is a {type(v).__name__}, not a tensor")
    return dict(obj)


def _shape_config(hf: Mapping[str, Any], layers_num: int, source: str) -> BertConfig:
    """A config holding only what fixes the tensor shapes, read off the weights themselves, so
    `weights.hf_ports` can assert every shape (the head count never changes a shape)."""
    for key, uer_key in (("embeddings.word_embeddings.weight",
                          "embedding.embedding_0.word.embedding.weight"),
                         ("encoder.layer.0.intermediate.dense.weight",
                          "encoder.encoder_0.transformer.0.feed_forward.linear_1.weight")):
        if len(hf[key].shape) != 2:
            raise WeightsError(f"{source}: key {uer_key!r} has shape {tuple(hf[key].shape)}; "
                               "expected a matrix")
    vocab, hidden = hf["embeddings.word_embeddings.weight"].shape
    return BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers_num, num_attention_heads=1,
        intermediate_size=hf["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=hf["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=hf[_SEGMENT_KEY].shape[0],
    )


def sbert_uer_to_hf(state: Mapping[str, Any], layers_num: int,
                    source: str = "checkpoint") -> collections.OrderedDict[str, Any]:
    """Tower 0 of a UER-py sbert state dict -> HF `BertModel` keys (no `bert.` prefix).

    Args:
      state: the UER-py state dict (torch tensors or numpy arrays).
      layers_num: transformer layers, as UER-py's `--layers_num`; must equal the checkpoint's.
      source: the file name, for error messages.

    Returns:
      An ordered dict in UER-py's key order; tensors are the input's, except the segment table,
      which is a copy without its first row (a copy, so the padding row is not saved with it).

    Raises:
      WeightsError: not an sbert checkpoint, a key missing, `layers_num` different from the
        checkpoint's depth, a shape inconsistent with the others, or a key of no known part.
    """
    if isinstance(layers_num, bool) or not isinstance(layers_num, int) or layers_num < 1:
        raise WeightsError(f"--layers_num must be a positive integer, got {layers_num!r}")
    layout = detect_uer_layout(state)  # raises, naming the keys it looked for
    if layout != "sbert":
        raise WeightsError(
            f"{source}: a single-tower UER-py checkpoint ({layout} layout: no "
            "'embedding.embedding_0.*' keys), not a siamese sbert one; UER-py converts those with "
            "scripts/convert_bert_from_uer_to_huggingface.py, sbert-flax with `sbert-flax convert`")
    found = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    depth = max(found) + 1 if found else 0
    table = uer_key_map("sbert", layers_num, TOWER)
    missing = [k for k in table if k not in state]
    if missing:
        raise WeightsError(
            f"{source}: missing {len(missing)} key(s) for --layers_num {layers_num}, first: "
            f"{missing[:5]} (the checkpoint has transformer layers {sorted(found)} under "
            "'encoder.encoder_0.transformer.')")
    if depth > layers_num:
        # UER-py's script would write a truncated model without a word; refuse instead.
        raise WeightsError(
            f"{source}: the checkpoint has {depth} transformer layers but --layers_num is "
            f"{layers_num}; layers {layers_num}..{depth - 1} (e.g. "
            f"'encoder.encoder_0.transformer.{layers_num}.self_attn.linear_layers.0.weight') "
            f"would be dropped. Pass --layers_num {depth}.")

    out: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for uer_key, hf_key in table.items():  # uer_key_map's order is UER-py's output order
        out[hf_key] = state[uer_key]
    seg = out[_SEGMENT_KEY]
    if len(seg.shape) != 2 or seg.shape[0] < 2:
        raise WeightsError(
            f"{source}: 'embedding.embedding_0.seg.embedding.weight' has shape {tuple(seg.shape)}; "
            "expected [1 + type_vocab_size, hidden] (row 0 is UER's padding segment)")
    out[_SEGMENT_KEY] = seg[1:].clone() if hasattr(seg, "clone") else seg[1:].copy()

    cfg = _shape_config(out, layers_num, source)
    for port in hf_ports(cfg):
        for hf_key, shape in zip(port.hf, port.hf_shapes, strict=True):
            if tuple(out[hf_key].shape) != shape:
                uer_key = next(u for u, h in table.items() if h == hf_key)
                raise WeightsError(
                    f"{source}: key {uer_key!r} has shape {tuple(out[hf_key].shape)}, but the "
                    f"other tensors of tower 0 make it {shape}")

    other = uer_key_map("sbert", layers_num, 1 - TOWER)
    unknown = sorted(k for k in state if k not in table and k not in other
                     and not any(r.search(k) for r in UER_IGNORED))
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} key(s) that belong to neither tower nor the "
                           f"classifier, first: {unknown[:5]}")
    untied = [k for k in other if k in state and not _equal(state[k], state[_tower0(k)])]
    if untied:
        warnings.warn(f"{source}: the two towers differ (first: {untied[0]!r}); tower 0 is "
                      "written, as UER-py's script does", stacklevel=2)
    return out


def _tower0(key: str) -> str:
    return key.replace("embedding.embedding_1.", "embedding.embedding_0.").replace(
        "encoder.encoder_1.", "encoder.encoder_0.")


def _equal(a: Any, b: Any) -> bool:
    import numpy as np

    if hasattr(a, "equal") and hasattr(b, "equal"):
        return a.shape == b.shape and a.dtype == b.dtype and bool(a.equal(b))
    return np.array_equal(np.asarray(a), np.asarray(b))


def convert_sbert_from_uer_to_huggingface(
        input_model_path: str | os.PathLike, output_model_path: str | os.PathLike,
        layers_num: int = 12) -> collections.OrderedDict[str, Any]:
    """Reads a UER-py sbert `.bin`, writes the HF state dict with `torch.save`, atomically.

    Nothing is written unless the whole conversion succeeds; an existing output is replaced only
    then. Returns the state dict written.
    """
    import torch

    src = os.fspath(input_model_path)
    hf = sbert_uer_to_hf(read_uer_checkpoint(src), layers_num, source=src)
    # A file object, not the temp name: torch.save names the archive's root folder after a path
    # it is given, which would leave the temp name inside the file.
    with atomic_write(os.fspath(output_model_path), "wb") as f:
        torch.save(hf, f)
    return hf
