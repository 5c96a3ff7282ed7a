"""Bad input, one case per test: odd text, wrong types, broken model folders, failed conversions."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from sbert_flax import SentenceEncoder
from sbert_flax.checkpoints import orbax_params as checkpoint
from sbert_flax.checkpoints.weight_maps import WeightsError
from sbert_flax.cli import main as cli
from sbert_flax.inference import encoder
from sbert_flax.models.config import ConfigError


@pytest.fixture(scope="module")
def tiny(tiny_bert) -> str:
    return tiny_bert()


@pytest.fixture(scope="module")
def enc(tiny, one_device) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(tiny, devices=one_device)


@pytest.fixture(scope="module")
def st_model(tiny):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny, device="cpu")


def _same_as_st(enc: SentenceEncoder, st_model, texts: list[str]) -> None:
    """Finite, float32, and equal to sentence-transformers' embeddings of the same strings (an
    encoder that returned one vector for all odd input would pass a shape check)."""
    emb = enc.encode(texts)
    _finite(emb, len(texts), enc.dim)
    np.testing.assert_allclose(emb, st_model.encode(texts, convert_to_numpy=True), rtol=0,
                               atol=2e-5)


@pytest.fixture
def broken(tiny, tmp_path):
    """A private copy of the tiny model folder to damage."""
    return shutil.copytree(tiny, tmp_path / "model")


def _finite(emb: np.ndarray, n: int, dim: int) -> None:
    assert emb.shape == (n, dim) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb))


# ---- text ------------------------------------------------------------------------------------

def test_single_string_is_a_list_of_one(enc):
    emb = enc.encode("那个人很开心")
    _finite(emb, 1, enc.dim)
    np.testing.assert_array_equal(emb, enc.encode(["那个人很开心"]))


def test_empty_list(enc):
    assert enc.encode([]).shape == (0, enc.dim)
    assert enc.encode([], output="token") == []


def test_empty_and_whitespace_only_strings(enc, st_model):
    _same_as_st(enc, st_model, ["", " ", "\t\n", "\u3000", "那个人很开心"])


def test_emoji(enc, st_model):
    _same_as_st(enc, st_model, ["😀🎉👍🏽", "开心😀", "👨‍👩‍👧"])


def test_control_characters(enc, st_model):
    _same_as_st(enc, st_model, ["\x00", "a\x00b", "\x1b[31m红色\x1b[0m", "\u200b", "零\u200b宽"])


def test_100k_char_text_is_truncated(enc):
    emb = enc.encode(["长" * 100_000, "短"])
    _finite(emb, 2, enc.dim)
    assert max(length for _, length in enc.last_stats.shapes) == enc.max_seq_length
    tokens = enc.encode(["长" * 100_000], output="token")[0]
    assert tokens.shape == (enc.max_seq_length, enc.dim)


@pytest.mark.parametrize("bad, type_name", [(None, "NoneType"), (3, "int"), (b"bytes", "bytes")])
def test_non_string_item_raises_type_error_naming_index(enc, bad, type_name):
    with pytest.raises(TypeError, match=rf"sentences\[2\] is {type_name}, expected str"):
        enc.encode(["好", "好", bad])


# ---- model folders ---------------------------------------------------------------------------

def test_missing_weights_file(broken):
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{broken}: no weights file found .*model.safetensors"):
        SentenceEncoder.from_pretrained(str(broken))


def test_corrupt_safetensors(broken):
    (broken / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"model\.safetensors: cannot read safetensors file: it is corrupt"):
        SentenceEncoder.from_pretrained(str(broken))


def test_corrupt_pytorch_bin(broken):
    os.remove(broken / "model.safetensors")
    (broken / "pytorch_model.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin: cannot read PyTorch checkpoint: "
                                           r"it is corrupt") as e:
        SentenceEncoder.from_pretrained(str(broken))
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_config_weights_shape_mismatch(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model\.safetensors: key 'encoder\.layer\.0\.intermediate"
                                           r"\.dense\.weight' has shape \(37, 32\) but the config needs \(40, 32\)"):
        SentenceEncoder.from_pretrained(str(broken))


def test_invalid_config(broken):
    (broken / "config.json").write_text('{"hidden_size": 32, "num_attention_heads": 5}')
    with pytest.raises(ConfigError, match=r"config\.json: hidden_size=32 is not divisible"):
        SentenceEncoder.from_pretrained(str(broken))


def test_missing_tokenizer(broken):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (broken / name).exists():
            os.remove(broken / name)
    with pytest.raises(FileNotFoundError, match=rf"{broken}: no tokenizer found \(need tokenizer.json or vocab.txt\)"):
        SentenceEncoder.from_pretrained(str(broken))


def test_missing_uer_vocab_file(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer not found: .*missing_vocab\.txt"):
        SentenceEncoder.from_uer(str(tmp_path / "model.bin"), str(tmp_path / "missing_vocab.txt"),
                                 os.path.join(tiny, "config.json"))


def test_hub_id_when_offline_says_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="offline: pass a local directory"):
        SentenceEncoder.from_pretrained("some-org/some-model")


# ---- conversion never leaves half-written output ---------------------------------------------

def test_convert_into_non_empty_dest_without_overwrite(tiny, tmp_path, capsys, one_device):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert cli.main(["convert", tiny, str(dest)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(dest) == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="overwrite=True"):  # the library refuses too
        SentenceEncoder.from_pretrained(tiny, devices=one_device).save(str(dest))
    assert os.listdir(dest) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["dest"]


@pytest.mark.parametrize("to", ["flax", "pytorch"])
def test_conversion_failing_midway_leaves_nothing(tiny, tmp_path, capsys, monkeypatch, to):
    def fail_after(real):
        def wrapped(directory, *args, **kwargs):
            real(directory, *args, **kwargs)  # something is written, then the disk "fills up"
            assert os.listdir(directory)
            raise OSError(28, "No space left on device")
        return wrapped

    monkeypatch.setattr(checkpoint, "save_params", fail_after(checkpoint.save_params))
    monkeypatch.setattr(encoder, "write_st_folder", fail_after(encoder.write_st_folder))
    out = tmp_path / "out"
    out.mkdir()
    rc = cli.main(["convert", tiny, str(out / "dest"), "--to", to])
    assert rc == 2 and "No space left on device" in capsys.readouterr().err
    assert os.listdir(out) == []  # no dest, no .dest.tmp-* dir
