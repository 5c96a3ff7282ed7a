"""Cross-encoder weights and folders: the sequence-classification map against transformers' own
state dict, strict key errors, UER-py run_classifier checkpoints, the activation as
sentence-transformers resolves it, new heads, and the export loaded back by sentence-transformers
and transformers.

The UER checkpoint is written out here by hand from UER-py's
scripts/convert_bert_text_classification_from_uer_to_huggingface.py (legacy key names) and from
its newer embedding names, independently of `checkpoints.uer.uer_key_map`.
"""

from __future__ import annotations

import json
import os
import shutil

import cross_encoder_helpers as ceh
import helpers
import numpy as np
import pytest

from sbert_flax.checkpoints import uer as uer_maps
from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.checkpoints.cross_encoder_folder import read_cross_encoder_folder
from sbert_flax.checkpoints.cross_encoder_loading import load_cross_encoder
from sbert_flax.inference.cross_encoder import CrossEncoder
from sbert_flax.models.config import BertConfig, ConfigError

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
LAYERS = 2


@pytest.fixture(scope="module")
def ce_dirs(tmp_path_factory, zh_vocab) -> dict[int, str]:
    return {n: ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp(f"ce{n}")),
                                               num_labels=n, seed=10 + n, max_position=64,
                                               vocab_file=zh_vocab)
            for n in (1, 3)}


@pytest.fixture(scope="module")
def pairs(zh_vocab) -> list[tuple[str, str]]:
    return ceh.make_pairs(9, seed=11, max_len=25)


def _state(path: str) -> dict[str, np.ndarray]:
    return weights.read_weights(weights.find_weights_file(path))


def _copy_with(src: str, dest: str, state: dict[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    shutil.copytree(src, dest)
    save_file(state, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return dest


def _ours(path: str, one_device, **kw) -> CrossEncoder:
    return CrossEncoder(path, devices=one_device, max_batch_tokens=256, **kw)


# ---- the HF map -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3])
def test_seq_cls_map_round_trips_transformers_state(ce_dirs, n):
    """transformers' own state dict -> ours -> back: every key, bit for bit; the head transposed."""
    ref = transformers.BertForSequenceClassification.from_pretrained(ce_dirs[n])
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    cfg = BertConfig.from_json_file(os.path.join(ce_dirs[n], "config.json"))
    params = weights.seq_cls_hf_to_flax(state, cfg, n)
    np.testing.assert_array_equal(params["pooler"]["kernel"], state["bert.pooler.dense.weight"].T)
    np.testing.assert_array_equal(params["classifier"]["kernel"], state["classifier.weight"].T)
    back = weights.seq_cls_flax_to_hf(params, cfg, n)
    assert set(back) == set(state) - {"bert.embeddings.position_ids"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_strict_key_errors_name_the_key(ce_dirs, tmp_path):
    state = _state(ce_dirs[1])
    cfg = BertConfig.from_json_file(os.path.join(ce_dirs[1], "config.json"))
    for key in ("classifier.weight", "bert.pooler.dense.bias"):
        bad = {k: v for k, v in state.items() if k != key}
        with pytest.raises(weights.WeightsError, match=key.replace(".", r"\.")):
            weights.seq_cls_hf_to_flax(bad, cfg, 1, source="x.safetensors")
    wide = {**state, "classifier.weight": np.zeros((1, cfg.hidden_size + 1), np.float32)}
    with pytest.raises(weights.WeightsError, match=r"'classifier\.weight' has shape \(1, 33\)"):
        weights.seq_cls_hf_to_flax(wide, cfg, 1)
    with pytest.raises(weights.WeightsError, match=r"unexpected.*bert\.extra|extra"):
        weights.seq_cls_hf_to_flax({**state, "bert.extra.weight": np.zeros(2)}, cfg, 1)
    # Through the loader: the folder's file is named, and how to start a new head is said.
    folder = _copy_with(ce_dirs[1], str(tmp_path / "no_head"),
                        {k: v for k, v in state.items() if not k.startswith("classifier.")})
    with pytest.raises(weights.WeightsError, match=r"model\.safetensors.*classifier\.weight.*"
                                                   r"new_head=True"):
        load_cross_encoder(folder)
    with pytest.raises(weights.WeightsError, match="num_labels=2"):
        load_cross_encoder(ce_dirs[1], num_labels=2)


def test_new_head_on_a_bert_model_keeps_its_pooler(tiny_bert):
    path = tiny_bert(hidden=32, heads=4, max_position=64)
    pooler = _state(path)["pooler.dense.weight"]
    loaded = load_cross_encoder(path, new_head=True, num_labels=2, seed=3)
    assert loaded.num_labels == 2 and loaded.activation is None
    np.testing.assert_array_equal(loaded.params["pooler"]["kernel"], pooler.T)
    kernel = loaded.params["classifier"]["kernel"]
    assert kernel.shape == (32, 2) and 0.005 < kernel.std() < 0.04  # normal(0, 0.02), HF's init
    assert not loaded.params["classifier"]["bias"].any()
    with pytest.raises(weights.WeightsError, match="new_head=True"):
        load_cross_encoder(path)


# ---- activation and length as sentence-transformers reads them --------------------------------

def _variant(src: str, dest: str, edit) -> str:
    shutil.copytree(src, dest)
    p = os.path.join(dest, "config.json")
    with open(p, encoding="utf-8") as f:
        d = json.load(f)
    edit(d)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(d, f)
    return dest


def test_activation_and_max_length_resolve_as_sentence_transformers(ce_dirs, tmp_path):
    identity, tanh = "torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh"
    saved = str(tmp_path / "st_saved")
    st.CrossEncoder(ce_dirs[1], max_length=20, activation_fn=torch.nn.Tanh()).save(saved)
    cases = {
        "plain1": ce_dirs[1], "plain3": ce_dirs[3], "st_saved": saved,
        "v4": _variant(ce_dirs[1], str(tmp_path / "v4"), lambda d: d.update(
            sentence_transformers={"activation_fn": identity, "version": "4.0.1"})),
        "v3": _variant(ce_dirs[1], str(tmp_path / "v3"), lambda d: d.update(
            sbert_ce_default_activation_function=tanh)),
    }
    for name, path in cases.items():
        ref = st.CrossEncoder(path)
        ours = load_cross_encoder(path)
        want = type(ref.activation_fn).__name__.lower()
        got = ours.activation or ("sigmoid" if ours.num_labels == 1 else "identity")
        assert (name, got) == (name, want)
        assert (name, ours.max_length) == (name, ref.max_seq_length)
    bad = _variant(ce_dirs[1], str(tmp_path / "bad"), lambda d: d.update(
        sentence_transformers={"activation_fn": "my.module.Custom"}))
    with pytest.raises(ConfigError, match=r"config\.json.*my\.module\.Custom"):
        read_cross_encoder_folder(bad)


# ---- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,activation", [(1, "identity"), (3, None)])
def test_export_loads_in_sentence_transformers_and_transformers(ce_dirs, pairs, one_device,
                                                                tmp_path, n, activation):
    ours = _ours(ce_dirs[n], one_device, max_length=24, activation_fn=activation)
    out = str(tmp_path / "export")
    ours.export_pytorch(out)
    ref = st.CrossEncoder(out)
    assert ref.max_seq_length == 24 and ref.num_labels == n
    assert type(ref.activation_fn).__name__.lower() == ours.activation_name
    np.testing.assert_allclose(ours.predict(pairs), ref.predict(pairs), rtol=0, atol=TOL)
    original = st.CrossEncoder(ce_dirs[n], max_length=24,
                               activation_fn=torch.nn.Identity() if activation else None)
    np.testing.assert_allclose(ref.predict(pairs), original.predict(pairs), rtol=0, atol=TOL)
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True)
    assert type(hf).__name__ == "BertForSequenceClassification" and hf.config.num_labels == n
    assert not info["missing_keys"] and not info["unexpected_keys"]
    back = CrossEncoder(out, devices=one_device)
    assert back.max_length == 24 and back.activation_name == ours.activation_name
    mine, theirs = _leaves(ours.param_dict()), _leaves(back.param_dict())
    assert set(mine) == set(theirs)
    for path, a in mine.items():
        np.testing.assert_array_equal(a, theirs[path], err_msg=path)
    with pytest.raises(FileExistsError):
        ours.save(out)


def _leaves(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---- UER-py run_classifier ---------------------------------------------------------------------

UER_EMB = {  # layout -> (UER embedding key, HF key), from UER-py's conversion scripts
    "single_legacy": [("embedding.word_embedding.weight", "embeddings.word_embeddings.weight"),
                      ("embedding.position_embedding.weight", "embeddings.position_embeddings.weight"),
                      ("embedding.segment_embedding.weight", "embeddings.token_type_embeddings.weight"),
                      ("embedding.layer_norm.gamma", "embeddings.LayerNorm.weight"),
                      ("embedding.layer_norm.beta", "embeddings.LayerNorm.bias")],
    "single": [("embedding.word.embedding.weight", "embeddings.word_embeddings.weight"),
               ("embedding.pos.embedding.weight", "embeddings.position_embeddings.weight"),
               ("embedding.seg.embedding.weight", "embeddings.token_type_embeddings.weight"),
               ("embedding.layer_norm.gamma", "embeddings.LayerNorm.weight"),
               ("embedding.layer_norm.beta", "embeddings.LayerNorm.bias")],
}
UER_HEAD = [("output_layer_1.weight", "pooler.dense.weight"),
            ("output_layer_1.bias", "pooler.dense.bias"),
            ("output_layer_2.weight", "classifier.weight"),
            ("output_layer_2.bias", "classifier.bias")]


def _uer_state(hf_dir: str, layout: str) -> dict[str, np.ndarray]:
    """A run_classifier checkpoint by hand: HF names -> UER's, a padding row 0 on the segments."""
    hf = {k.removeprefix("bert."): v for k, v in _state(hf_dir).items()}
    out = {}
    for uk, hk in UER_EMB[layout]:
        w = hf[hk]
        if hk == "embeddings.token_type_embeddings.weight":
            w = np.concatenate([np.full_like(w[:1], 0.5), w])
        out[uk] = w
    for i in range(LAYERS):
        for uk, hk in helpers.UER_LAYER_BY_HAND:
            out[f"encoder.transformer.{i}.{uk}"] = hf[f"encoder.layer.{i}.{hk}"]
    for uk, hk in UER_HEAD:
        out[uk] = hf[hk]
    return out


@pytest.mark.parametrize("layout", ["single_legacy", "single"])
def test_uer_classifier_checkpoint_scores_as_the_hf_one(ce_dirs, pairs, one_device, zh_vocab,
                                                        tmp_path, layout):
    state = _uer_state(ce_dirs[3], layout)
    # The library's inverse map writes the same checkpoint (the zero padding row aside).
    inverse = uer_maps.hf_to_uer_classifier(_state(ce_dirs[3]), layout, LAYERS)
    assert set(inverse) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(inverse[k][1:] if "seg" in k else inverse[k],
                                      v[1:] if "seg" in k else v, err_msg=k)
    ckpt = str(tmp_path / "classifier_model.bin")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, ckpt)
    uer_cfg = str(tmp_path / "bert_config.json")
    with open(uer_cfg, "w", encoding="utf-8") as f:
        json.dump({"emb_size": 32, "hidden_size": 32, "feedforward_size": 37, "heads_num": 4,
                   "layers_num": LAYERS, "dropout": 0.1, "max_seq_length": 64}, f)
    ours = CrossEncoder.from_uer(ckpt, zh_vocab, uer_cfg, max_length=64, devices=one_device,
                                 max_batch_tokens=256)
    assert ours.num_labels == 3 and ours.activation_name == "identity"
    ref = st.CrossEncoder(ce_dirs[3])
    np.testing.assert_allclose(ours.predict(pairs), ref.predict(pairs), rtol=0, atol=TOL)


def test_uer_classifier_errors_name_the_key(ce_dirs):
    state = _uer_state(ce_dirs[1], "single")
    with pytest.raises(weights.WeightsError, match=r"output_layer_2\.bias"):
        uer_maps.uer_classifier_to_hf({k: v for k, v in state.items() if k != "output_layer_2.bias"})
    with pytest.raises(weights.WeightsError, match=r"output_layer_3\.weight"):
        uer_maps.uer_classifier_to_hf({**state, "output_layer_3.weight": np.zeros((2, 2))})
    with pytest.raises(weights.WeightsError, match=r"encoder\.transformer\.1\.layer_norm_2\.beta"):
        uer_maps.uer_classifier_to_hf({k: v for k, v in state.items()
                                      if k != "encoder.transformer.1.layer_norm_2.beta"})
