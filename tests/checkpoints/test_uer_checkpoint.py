"""convert/convert_sbert_from_uer_to_huggingface.py: UER-py's output, key by key, and its errors.

The expected output is written out here from UER-py's scripts/convert_sbert_from_uer_to_huggingface.py
(independently of `checkpoints.uer.uer_key_map`, which the library uses): tower 0, HF names without
`bert.`, the segment table without row 0, in that script's order.
"""

import collections
import importlib.util
import os
import subprocess
import sys

import helpers
import numpy as np
import pytest

from sbert_flax.checkpoints.uer_sbert_to_hf import (
    convert_sbert_from_uer_to_huggingface,
    sbert_uer_to_hf,
)
from sbert_flax.checkpoints.weight_maps import WeightsError

torch = pytest.importorskip("torch")

REPO = helpers.REPO
SCRIPT = os.path.join(REPO, "convert", "convert_sbert_from_uer_to_huggingface.py")
LAYERS = 2

# UER-py's embedding and TransformerLayer names -> HF names, in the order its script writes them.
UER_EMB = [
    ("word.embedding.weight", "embeddings.word_embeddings.weight"),
    ("pos.embedding.weight", "embeddings.position_embeddings.weight"),
    ("seg.embedding.weight", "embeddings.token_type_embeddings.weight"),
    ("layer_norm.gamma", "embeddings.LayerNorm.weight"),
    ("layer_norm.beta", "embeddings.LayerNorm.bias"),
]


def expected_pairs(layers: int, tower: int = 0) -> list[tuple[str, str]]:
    """(UER key, HF key) in UER-py's output order."""
    pairs = [(f"embedding.embedding_{tower}.{u}", h) for u, h in UER_EMB]
    for i in range(layers):
        pairs += [(f"encoder.encoder_{tower}.transformer.{i}.{u}", f"encoder.layer.{i}.{h}")
                  for u, h in helpers.UER_LAYER_BY_HAND]
    return pairs


@pytest.fixture(scope="module")
def hf_model(tiny_bert):
    """A tiny random HF BertModel (every tensor perturbed) whose weights become tower 0."""
    from transformers import BertModel

    return BertModel.from_pretrained(tiny_bert(hidden=48, heads=3, layers=LAYERS)).eval()


@pytest.fixture(scope="module")
def uer_state(hf_model) -> dict:
    """A UER-py sbert checkpoint: two tied towers, a 3-row segment table (row 0 distinct: the
    padding segment) and the siamese classifier, as run_classifier_siamese.py saves it."""
    sd = hf_model.state_dict()
    out: dict = {}
    for t in (0, 1):
        for uk, hk in expected_pairs(LAYERS, t):
            w = sd[hk].clone()
            if hk == "embeddings.token_type_embeddings.weight":
                w = torch.cat([torch.full_like(w[:1], 0.5), w])
            out[uk] = w
    d = sd["embeddings.word_embeddings.weight"].shape[1]
    out["classifier.weight"] = torch.randn(3, 4 * d)
    out["classifier.bias"] = torch.randn(3)
    return out


def _save(state: dict, path) -> str:
    torch.save(state, str(path))
    return str(path)


def _load_convert_main():
    spec = importlib.util.spec_from_file_location("convert_sbert_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_model_card_command_writes_uer_py_output(uer_state, hf_model, tmp_path):
    """The model card's command, unchanged, in a subprocess; then the file key by key."""
    from transformers import BertModel

    (tmp_path / "models").mkdir()
    _save(uer_state, tmp_path / "models" / "finetuned_model.bin")
    cmd = [sys.executable, SCRIPT, "--input_model_path", "models/finetuned_model.bin",
           "--output_model_path", "pytorch_model.bin", "--layers_num", str(LAYERS)]
    # This tree's sbert_flax, whatever the editable install points at.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "pytorch_model.bin", map_location="cpu", weights_only=True)

    pairs = expected_pairs(LAYERS)
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == [h for _, h in pairs]  # every key, no other, in UER-py's order
    assert not any(k.startswith("bert.") for k in got)
    for uk, hk in pairs:
        want = uer_state[uk]
        if hk == "embeddings.token_type_embeddings.weight":
            assert want.shape[0] == 3 and got[hk].shape[0] == 2
            want = want[1:]  # UER's padding segment is gone; A/B are token types 0/1
            # Dropped from the file too, not only hidden behind a view's storage offset.
            assert got[hk].untyped_storage().nbytes() == want.numel() * want.element_size()
        assert got[hk].dtype == want.dtype and got[hk].shape == want.shape, hk
        assert torch.equal(got[hk], want), hk

    # Hugging Face loads it: only the pooler is missing (UER-py writes none either).
    cfg = hf_model.config
    full = BertModel(cfg)
    res = full.load_state_dict(got, strict=False)
    assert sorted(res.missing_keys) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert res.unexpected_keys == []
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.load_state_dict(got, strict=True)
    ids = torch.tensor([[101, 791, 1921, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_half_precision_kept_and_classifier_ignored(uer_state):
    half = {k: v.half() for k, v in uer_state.items()}
    got = sbert_uer_to_hf(half, LAYERS)
    assert all(v.dtype == torch.float16 for v in got.values())
    assert not any("classifier" in k for k in got)


def test_untied_towers_warn_and_take_tower_0(uer_state):
    state = dict(uer_state)
    key = "encoder.encoder_1.transformer.1.feed_forward.linear_2.bias"
    state[key] = state[key] + 1
    with pytest.warns(UserWarning, match=key.replace(".", r"\.")):
        got = sbert_uer_to_hf(state, LAYERS)
    assert torch.equal(got["encoder.layer.1.output.dense.bias"],
                       uer_state["encoder.encoder_0.transformer.1.feed_forward.linear_2.bias"])


def test_numpy_state_dict_works(uer_state):
    got = sbert_uer_to_hf({k: v.numpy() for k, v in uer_state.items()}, LAYERS)
    np.testing.assert_array_equal(got["embeddings.token_type_embeddings.weight"],
                                  uer_state["embedding.embedding_0.seg.embedding.weight"][1:].numpy())


# ---- bad input: a clear error naming the key / file, nothing written ------------------------------

def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def _bad_cases(state: dict) -> list[tuple[str, dict, int, str]]:
    seg = "embedding.embedding_0.seg.embedding.weight"
    ff = "encoder.encoder_0.transformer.1.feed_forward.linear_1.weight"
    single = {k.replace("embedding.embedding_0.", "embedding.").replace("encoder.encoder_0.", "encoder."): v
              for k, v in state.items() if "_0." in k}
    return [
        ("missing key", _without(state, "encoder.encoder_0.transformer.1.layer_norm_2.beta"), LAYERS,
         r"encoder\.encoder_0\.transformer\.1\.layer_norm_2\.beta"),
        ("layers_num too large", state, LAYERS + 1,
         r"missing 16 key\(s\) for --layers_num 3.*encoder\.encoder_0\.transformer\.2\.self_attn"),
        ("layers_num too small", state, 1, r"has 2 transformer layers but --layers_num is 1"),
        ("layers_num zero", state, 0, r"--layers_num must be a positive integer"),
        ("wrong shape", {**state, ff: state[ff][:, :-1]}, LAYERS, ff.replace(".", r"\.")),
        ("segment table without padding row", {**state, seg: state[seg][:1]}, LAYERS,
         r"embedding_0\.seg\.embedding\.weight' has shape \(1, 48\)"),
        ("unknown key", {**state, "encoder.encoder_2.transformer.0.x": state[ff]}, LAYERS,
         r"encoder\.encoder_2\.transformer\.0\.x"),
        ("single-tower checkpoint", single, LAYERS, r"single-tower UER-py checkpoint"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_checkpoint_is_named_and_nothing_is_written(uer_state, tmp_path, case):
    name, state, layers, pattern = _bad_cases(uer_state)[case]
    src = _save(state, tmp_path / "in.bin")
    out = tmp_path / "pytorch_model.bin"
    out.write_bytes(b"old")  # an existing output survives a failed conversion
    with pytest.raises(WeightsError, match=pattern):
        convert_sbert_from_uer_to_huggingface(src, out, layers)
    assert out.read_bytes() == b"old", name
    assert sorted(os.listdir(tmp_path)) == ["in.bin", "pytorch_model.bin"], name  # no temp left


def test_script_errors_name_the_file(uer_state, tmp_path, capsys):
    main = _load_convert_main()
    missing = str(tmp_path / "models" / "finetuned_model.bin")
    assert main(["--input_model_path", missing, "--output_model_path", str(tmp_path / "o.bin")]) == 2
    assert f"UER checkpoint not found: {missing}" in capsys.readouterr().err

    (tmp_path / "corrupt.bin").write_bytes(b"not a checkpoint")
    assert main(["--input_model_path", str(tmp_path / "corrupt.bin"),
                 "--output_model_path", str(tmp_path / "o.bin")]) == 2
    assert "corrupt.bin: cannot read PyTorch checkpoint" in capsys.readouterr().err

    src = _save(uer_state, tmp_path / "ok.bin")
    assert main(["--input_model_path", src, "--output_model_path",
                 str(tmp_path / "no_such_dir" / "o.bin"), "--layers_num", "2"]) == 2
    assert "output directory does not exist" in capsys.readouterr().err


def test_defaults_are_uer_py_s(capsys):
    main = _load_convert_main()
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--input_model_path", "models/input_model.bin"),
                          ("--output_model_path", "models/output_model.bin"), ("--layers_num", "12")):
        assert flag in text and f"(default: {default})" in text
