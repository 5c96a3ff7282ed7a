"""Weight maps (HF <-> Flax, UER -> HF) and strict config / key / shape errors."""

import json
import os
import shutil

import helpers
import numpy as np
import pytest

from sbert_flax.checkpoints import uer as uer_maps
from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.models.config import BertConfig, ConfigError

torch = pytest.importorskip("torch")


def _load(folder):
    cfg = BertConfig.from_json_file(os.path.join(folder, "config.json"))
    sd = weights.read_weights(weights.find_weights_file(folder))
    return cfg, sd


def _mapped(sd):
    """The keys of a HF state dict that are model weights (not pooler / buffers / heads)."""
    sd = weights.canonical_hf_keys(sd)
    return {k: v for k, v in sd.items() if not any(r.search(k) for r in weights.HF_IGNORED)}


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    return _load(tiny_bert(hidden=48, heads=3, layers=2))


@pytest.fixture(scope="module")
def m3e(m3e_dir):
    return _load(m3e_dir)


# ---- HF <-> Flax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "m3e"])
def test_hf_flax_round_trip_is_exact(which, request):
    cfg, sd = request.getfixturevalue(which)
    back = weights.flax_to_hf(weights.hf_to_flax(sd, cfg), cfg)
    want = _mapped(sd)
    assert set(back) == set(want)
    for k, v in want.items():
        assert back[k].dtype == np.float32 and back[k].flags["C_CONTIGUOUS"], k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_fused_qkv_layout(tiny):
    """The fused kernel's [D, 3, H, Dh] axes are (in, q/k/v, head, dim): q of head 1 is
    rows Dh..2Dh of torch's query weight, transposed."""
    cfg, sd = tiny
    p = weights.hf_to_flax(sd, cfg)
    hd = cfg.head_dim
    qkv = p["layers"][1]["attention"]["qkv_kernel"]
    assert qkv.shape == (cfg.hidden_size, 3, cfg.num_attention_heads, hd)
    wk = sd["encoder.layer.1.attention.self.key.weight"]
    np.testing.assert_array_equal(qkv[:, 1, 1, :], wk[hd:2 * hd].T)
    np.testing.assert_array_equal(p["layers"][1]["attention"]["qkv_bias"][2, 0],
                                  sd["encoder.layer.1.attention.self.value.bias"][:hd])


def test_ignored_keys_prefix_and_legacy_names_are_accepted(tiny):
    cfg, sd = tiny
    ref = weights.hf_to_flax(sd, cfg)
    # BertForPreTraining-style: bert. prefix, TF-era gamma/beta, heads and buffers.
    odd = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        odd["bert." + k] = v
    odd["bert.embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
    odd["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)
    got = weights.hf_to_flax(odd, cfg)
    for a, b in zip(_leaves(ref), _leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_sharded_and_half_precision_checkpoints(tiny_bert, tmp_path):
    import transformers

    src = tiny_bert(hidden=48, heads=3, layers=2)
    cfg, sd = _load(src)
    ref = weights.hf_to_flax(sd, cfg)
    model = transformers.BertModel.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    wfile = weights.find_weights_file(tmp_path / "sharded")
    assert wfile.endswith(".index.json")
    for a, b in zip(_leaves(ref), _leaves(weights.hf_to_flax(weights.read_weights(wfile), cfg)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    half = weights.read_weights(weights.find_weights_file(tmp_path / "bf16"))
    got = weights.hf_to_flax(half, cfg)
    for a, b in zip(_leaves(ref), _leaves(got), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2 ** -8)  # bf16 rounding of the stored values


# ---- strict errors -------------------------------------------------------------------------------

def test_missing_key_is_named(tiny):
    cfg, sd = tiny
    key = "encoder.layer.1.attention.self.key.bias"
    bad = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(weights.WeightsError, match=key.replace(".", r"\.")):
        weights.hf_to_flax(bad, cfg, source="x.safetensors")


def test_wrong_shape_is_named(tiny):
    cfg, sd = tiny
    key = "encoder.layer.0.intermediate.dense.weight"
    bad = dict(sd, **{key: sd[key].T.copy()})
    with pytest.raises(weights.WeightsError, match=key.replace(".", r"\.")) as e:
        weights.hf_to_flax(bad, cfg, source="x.safetensors")
    assert "x.safetensors" in str(e.value)


@pytest.mark.parametrize("key", ["encoder.layer.2.attention.self.query.weight", "classifier.weight"])
def test_unexpected_key_is_named(tiny, key):
    cfg, sd = tiny
    bad = dict(sd, **{key: np.zeros((3, 3), np.float32)})
    with pytest.raises(weights.WeightsError, match=key.replace(".", r"\.")):
        weights.hf_to_flax(bad, cfg)


def test_config_from_other_model_is_a_shape_error_on_load(tiny_bert, tmp_path):
    """A config.json that does not belong to the weights fails loudly, naming the key."""
    src = tiny_bert(hidden=48, heads=3, layers=2)
    dst = str(tmp_path / "m")
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["intermediate_size"] = 40
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    with pytest.raises(weights.WeightsError, match=r"intermediate\.dense\.weight"):
        SentenceEncoder.from_pretrained(dst)


@pytest.mark.parametrize("field,value", [
    ("model_type", "gpt2"),
    ("model_type", "roberta"),
    ("position_embedding_type", "relative_key"),
    ("position_embedding_type", "relative_key_query"),
    ("hidden_act", "silu"),
    ("architectures", ["GPT2Model"]),
    ("is_decoder", True),
])
def test_unsupported_config_is_rejected_naming_the_field(field, value):
    d = BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                   intermediate_size=16, max_position_embeddings=8).to_hf_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=field):
        BertConfig.from_hf_dict(d)


def test_heads_must_divide_hidden():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        BertConfig.from_hf_dict({"hidden_size": 50, "num_attention_heads": 3})


def test_unsupported_config_folder_fails_before_loading_weights(tiny_bert, tmp_path):
    dst = str(tmp_path / "m")
    shutil.copytree(tiny_bert(hidden=48, heads=3, layers=2), dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg["position_embedding_type"] = "relative_key"
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ConfigError, match="position_embedding_type") as e:
        SentenceEncoder.from_pretrained(dst)
    assert path in str(e.value)


def test_hf_config_round_trip():
    cfg = BertConfig(vocab_size=99, hidden_size=60, num_hidden_layers=3, num_attention_heads=5,
                     intermediate_size=37, hidden_act="relu", max_position_embeddings=77,
                     layer_norm_eps=1e-7)
    assert BertConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    import transformers

    hf = transformers.BertConfig(**cfg.to_hf_dict())
    assert BertConfig.from_hf_dict(hf.to_dict()) == cfg


# ---- UER-py layouts ------------------------------------------------------------------------------



def uer_sbert_by_hand(hf: dict, layers: int, towers=(0, 1)) -> dict:
    """A UER-py sbert (siamese) state dict with tied towers, built by explicit renames."""
    out = {}
    for t in towers:
        e, enc = f"embedding.embedding_{t}.", f"encoder.encoder_{t}.transformer."
        out[e + "word.embedding.weight"] = hf["embeddings.word_embeddings.weight"]
        out[e + "pos.embedding.weight"] = hf["embeddings.position_embeddings.weight"]
        seg = hf["embeddings.token_type_embeddings.weight"]
        # UER's segment ids are 1/2 with 0 for padding: one extra row in front.
        out[e + "seg.embedding.weight"] = np.concatenate([np.full_like(seg[:1], 0.5), seg])
        out[e + "layer_norm.gamma"] = hf["embeddings.LayerNorm.weight"]
        out[e + "layer_norm.beta"] = hf["embeddings.LayerNorm.bias"]
        for i in range(layers):
            for uk, hk in helpers.UER_LAYER_BY_HAND:
                out[f"{enc}{i}.{uk}"] = hf[f"encoder.layer.{i}.{hk}"]
    return out


def _torch_save(state: dict, path: str) -> str:
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def m3e_hf(m3e):
    cfg, sd = m3e
    return cfg, _mapped(sd)


@pytest.mark.parametrize("layout", ["sbert", "single", "single_legacy"])
def test_uer_layouts_round_trip_real_weights(m3e_hf, layout):
    cfg, hf = m3e_hf
    uer = uer_maps.hf_to_uer(hf, layout, cfg.num_hidden_layers)
    assert uer_maps.detect_uer_layout(uer) == layout
    back = uer_maps.uer_to_hf(uer)
    assert set(back) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(back[k], hf[k], err_msg=k)


def test_hand_built_sbert_matches_library_map(m3e_hf):
    cfg, hf = m3e_hf
    by_hand = uer_sbert_by_hand(hf, cfg.num_hidden_layers, towers=(0,))
    ours = uer_maps.hf_to_uer(hf, "sbert", cfg.num_hidden_layers)
    assert set(by_hand) == set(ours)
    back = uer_maps.uer_to_hf(by_hand)
    for k in hf:
        np.testing.assert_array_equal(back[k], hf[k], err_msg=k)


# Chinese-only sentences: a bare vocab file builds a lowercasing tokenizer (UER-py's default),
# m3e's tokenizer.json does not; the two agree on text without Latin letters.
UER_SENTENCES = ["今天天气很好。", "一个男人在弹吉他。", "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
                 "猫", "这家餐厅的服务非常糟糕，我再也不会来了！"]
UER_CFG = {  # UER-py models/bert/small_config.json style (what m3e-small's base was trained with)
    "emb_size": 512, "feedforward_size": 2048, "hidden_size": 512, "hidden_act": "gelu",
    "heads_num": 8, "layers_num": 4, "max_seq_length": 512, "dropout": 0.1,
    "data_processor": "bert", "embedding": ["word", "pos", "seg"], "encoder": "transformer",
    "mask": "fully_visible", "target": ["mlm", "sp"], "tie_weights": True,
}


@pytest.fixture(scope="module")
def m3e_cls_reference(m3e_dir, zh_vocab):
    enc = SentenceEncoder.from_pretrained(m3e_dir, pooling="cls", max_seq_length=64,
                                          buckets=(64,), devices=_one())
    return enc.encode(UER_SENTENCES)


def _one():
    import jax

    return jax.devices()[:1]


def test_uer_config_matches_hf_config(m3e_hf):
    cfg, hf = m3e_hf
    uer = uer_maps.hf_to_uer(hf, "sbert", cfg.num_hidden_layers)
    got = uer_maps.config_from_uer(UER_CFG, uer, source="uer.bin")
    assert got == cfg
    with pytest.raises(weights.WeightsError, match="heads_num"):
        uer_maps.config_from_uer({k: v for k, v in UER_CFG.items() if k != "heads_num"}, uer, "uer.bin")


@pytest.mark.parametrize("layout,config", [
    ("sbert_by_hand", "hf"), ("sbert_by_hand", "uer"), ("single", "hf"), ("single_legacy", "uer"),
])
def test_from_uer_checkpoint_equals_hf_layout(m3e_dir, m3e_hf, m3e_cls_reference, zh_vocab,
                                              tmp_path, layout, config):
    cfg, hf = m3e_hf
    if layout == "sbert_by_hand":
        state = uer_sbert_by_hand(hf, cfg.num_hidden_layers)
        # Pre-training heads ride along in real UER checkpoints and are ignored.
        state["target.mlm.linear_1.weight"] = np.ones((4, 4), np.float32)
    else:
        state = uer_maps.hf_to_uer(hf, layout, cfg.num_hidden_layers)
    ckpt = _torch_save(state, str(tmp_path / "model.bin"))
    if config == "hf":
        cfg_path = os.path.join(m3e_dir, "config.json")
    else:
        cfg_path = str(tmp_path / "uer_config.json")
        json.dump(UER_CFG, open(cfg_path, "w"))
    enc = SentenceEncoder.from_uer(ckpt, zh_vocab, cfg_path, pooling="cls", max_seq_length=64,
                                   buckets=(64,), devices=_one())
    assert enc.config == cfg
    np.testing.assert_allclose(enc.encode(UER_SENTENCES), m3e_cls_reference, rtol=0, atol=1e-6)


def test_uer_untied_towers_are_refused_unless_one_is_chosen(m3e_hf):
    cfg, hf = m3e_hf
    state = uer_sbert_by_hand(hf, cfg.num_hidden_layers)
    key = "encoder.encoder_1.transformer.2.feed_forward.linear_1.bias"
    state[key] = state[key] + 1.0
    with pytest.raises(weights.WeightsError, match=r"encoder_1\.transformer\.2\.feed_forward") as e:
        uer_maps.uer_to_hf(state, source="uer.bin")
    assert "tower=0 or tower=1" in str(e.value)
    # The error's advice works: an explicit tower loads that tower, ignoring the other.
    hk = "encoder.layer.2.intermediate.dense.bias"
    np.testing.assert_array_equal(uer_maps.uer_to_hf(state, tower=0)[hk], hf[hk])
    np.testing.assert_array_equal(uer_maps.uer_to_hf(state, tower=1)[hk], hf[hk] + 1.0)
    assert uer_maps.config_from_uer(UER_CFG, state, "uer.bin", tower=1) == cfg


def test_uer_missing_and_unexpected_keys_are_named(m3e_hf):
    cfg, hf = m3e_hf
    state = uer_sbert_by_hand(hf, cfg.num_hidden_layers, towers=(0,))
    missing = "encoder.encoder_0.transformer.1.layer_norm_2.beta"
    with pytest.raises(weights.WeightsError, match=missing.replace(".", r"\.")):
        uer_maps.uer_to_hf({k: v for k, v in state.items() if k != missing})
    extra = "encoder.layer_norm.gamma"  # a pre-LN model's final norm: different maths
    with pytest.raises(weights.WeightsError, match=extra.replace(".", r"\.")):
        uer_maps.uer_to_hf(dict(state, **{extra: np.ones(512, np.float32)}))
    with pytest.raises(weights.WeightsError, match="not a UER-py checkpoint"):
        uer_maps.uer_to_hf(hf)
