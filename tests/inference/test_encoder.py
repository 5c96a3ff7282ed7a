"""`SentenceEncoder` on tiny random BERTs: parity with sentence-transformers, round trips,
batch independence, compile counts, bf16.

Heavy tests pass `devices=one_device` (the suite sees 8 fake CPU devices; multi-device is
tests/inference/test_multidevice.py) and small bucket sets, because every (rows, length) shape is a
compilation and compiles dominate the run time on a 2-core machine.
"""

import os

import numpy as np
import pytest
from helpers import ZH_SENTENCES, random_zh_sentences

from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.models import tokenization

pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")

# Real sentences, mixed Chinese/Latin, surrounding whitespace (stripped by both), and random
# ones up to 150 characters so some are truncated at max_seq_length=128.
SENTENCES = ZH_SENTENCES + ["  前后有空格  ", "", "A man is playing a GUITAR."] + \
    random_zh_sentences(14, 1, 150, seed=1)

PARITY_CONFIGS = {
    "h60-5heads-1layer-gelu-cls": dict(hidden=60, heads=5, layers=1, pooling="cls"),
    "h60-5heads-3layers-relu-max": dict(hidden=60, heads=5, layers=3, hidden_act="relu",
                                        pooling="max"),
    "h48-3heads-3layers-gelu-mean-norm": dict(hidden=48, heads=3, layers=3, pooling="mean",
                                              normalize=True),
    "h48-3heads-1layer-relu-cls-norm": dict(hidden=48, heads=3, layers=1, hidden_act="relu",
                                            pooling="cls", normalize=True),
    "h32-4heads-2layers-gelu-max-norm": dict(pooling="max", normalize=True),
    "h32-plain-hf-folder": dict(),  # no modules.json: mean pooling, as sentence-transformers
}


def _st(path):
    return st.SentenceTransformer(path, device="cpu")


def _max_abs(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_parity_with_sentence_transformers(tiny_bert, one_device, name):
    path = tiny_bert(**PARITY_CONFIGS[name])
    ref = _st(path).encode(SENTENCES, batch_size=8)
    # One bucket and one batch: one compilation per config (bucketing is tested below).
    enc = SentenceEncoder.from_pretrained(path, devices=one_device, buckets=(128,))
    got = enc.encode(SENTENCES, batch_size=32)
    assert got.shape == ref.shape and got.dtype == np.float32
    print(f"{name}: max abs diff vs sentence-transformers {_max_abs(got, ref):.2e}")
    assert _max_abs(got, ref) <= 1e-5
    if PARITY_CONFIGS[name].get("normalize"):
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_tokenization_matches_sentence_transformers(tiny_bert):
    path = tiny_bert(pooling="mean")
    model = _st(path)
    enc_tok = tokenization.load_tokenizer(path)
    ours = enc_tok.encode(SENTENCES, model.max_seq_length)
    feats = model.tokenize(SENTENCES)
    for i, ids in enumerate(ours):
        n = int(feats["attention_mask"][i].sum())
        np.testing.assert_array_equal(ids, feats["input_ids"][i, :n].numpy(), err_msg=SENTENCES[i])
    assert max(len(x) for x in ours) == 128  # the long random ones were truncated
    assert not (np.concatenate(ours) == enc_tok.hf.unk_token_id).all()  # a real vocab


def test_token_output_matches_sentence_transformers(tiny_bert, one_device):
    path = tiny_bert(hidden=48, heads=3, layers=2, pooling="mean")
    ref = _st(path).encode(SENTENCES, output_value="token_embeddings", batch_size=8)
    enc = SentenceEncoder.from_pretrained(path, devices=one_device, buckets=(32, 128))
    got = enc.encode(SENTENCES, batch_size=16, output="token")
    assert len(got) == len(ref) == len(SENTENCES)
    want_lens = [len(x) for x in enc.tokenizer.encode(SENTENCES, enc.max_seq_length)]
    for g, r, n in zip(got, ref, want_lens, strict=True):
        assert g.shape == (n, 48) and g.dtype == np.float32
        assert _max_abs(g, r.numpy()) <= 1e-5


# ---- folder formats ------------------------------------------------------------------------------

def test_folder_saved_by_sentence_transformers(tiny_bert, one_device, tmp_path):
    """sentence-transformers >= 6 writes `"pooling_mode": "max"` and new module type names."""
    model = _st(tiny_bert(hidden=48, heads=3, layers=1, pooling="max", normalize=True))
    out = str(tmp_path / "saved")
    model.save(out)
    enc = SentenceEncoder.from_pretrained(out, devices=one_device, buckets=(128,))
    assert enc.pooling.mode == "max" and enc.pooling.normalize
    assert enc.max_seq_length == model.max_seq_length
    assert _max_abs(enc.encode(SENTENCES, batch_size=32), model.encode(SENTENCES)) <= 1e-5


def test_transformer_in_subfolder(tiny_bert, one_device, tmp_path):
    """Older sentence-transformers layout: the HF model under 0_Transformer/."""
    import json
    import shutil

    src = tiny_bert(hidden=60, heads=5, layers=1, pooling="cls")
    dst = tmp_path / "st"
    shutil.copytree(src, dst / "0_Transformer", ignore=shutil.ignore_patterns("modules.json", "1_*"))
    shutil.copytree(os.path.join(src, "1_Pooling"), dst / "1_Pooling")
    modules = json.load(open(os.path.join(src, "modules.json")))
    modules[0]["path"] = "0_Transformer"
    json.dump(modules, open(dst / "modules.json", "w"))
    enc = SentenceEncoder.from_pretrained(str(dst), devices=one_device, buckets=(128,))
    assert enc.pooling.mode == "cls"
    ref = _st(str(dst)).encode(SENTENCES)
    assert _max_abs(enc.encode(SENTENCES, batch_size=32), ref) <= 1e-5


def test_lowercase_text_and_truncation_override(tiny_bert, zh_vocab, one_device, tmp_path):
    """sentence_bert_config's do_lower_case lowercases the text even when the tokenizer keeps
    case; encode(max_seq_length=...) truncates like sentence-transformers' max_seq_length."""
    import json
    import shutil

    from helpers import wordpiece_tokenizer

    dst = tmp_path / "cased"
    shutil.copytree(tiny_bert(hidden=48, heads=3, layers=1, pooling="mean"), dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(dst / f)
    wordpiece_tokenizer(zh_vocab, do_lower_case=False, model_max_length=128).save_pretrained(dst)
    json.dump({"max_seq_length": 128, "do_lower_case": True},
              open(dst / "sentence_bert_config.json", "w"))
    sents = ["Hello WORLD", "HELLO world", "Machine Learning 机器学习", "GPU和CPU"] + SENTENCES
    enc = SentenceEncoder.from_pretrained(str(dst), devices=one_device, buckets=(16, 128))
    model = _st(str(dst))
    got = enc.encode(sents, batch_size=32)
    assert _max_abs(got, model.encode(sents)) <= 1e-5
    assert _max_abs(got[0], got[1]) == 0.0  # lowercased before tokenizing
    model.max_seq_length = 16
    short = enc.encode(sents, batch_size=32, max_seq_length=16)
    assert _max_abs(short, model.encode(sents)) <= 1e-5
    assert enc.last_stats.shapes == ((32, 16),)


# ---- round trips ---------------------------------------------------------------------------------

def _assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype, p
        np.testing.assert_array_equal(x, y, err_msg=str(p))


def test_save_and_reload_is_bit_exact(tiny_bert, one_device, tmp_path):
    path = tiny_bert(hidden=60, heads=5, layers=1, pooling="cls", normalize=True)
    enc = SentenceEncoder.from_pretrained(path, devices=one_device, buckets=(32, 128),
                                          max_seq_length=100)
    out = str(tmp_path / "flax")
    enc.save(out)
    back = SentenceEncoder.from_pretrained(out, devices=one_device, buckets=(32, 128))
    _assert_trees_equal(enc.param_dict(), back.param_dict())
    assert back.config == enc.config
    assert back.pooling == enc.pooling and back.pooling.normalize
    assert back.max_seq_length == 100
    # Same params, same program: the same bits.
    np.testing.assert_array_equal(back.encode(SENTENCES, batch_size=16),
                                  enc.encode(SENTENCES, batch_size=16))
    with pytest.raises(FileExistsError):
        enc.save(out)


def test_export_pytorch_loads_in_sentence_transformers(tiny_bert, one_device, tmp_path):
    path = tiny_bert(hidden=48, heads=3, layers=3, hidden_act="relu", pooling="max")
    enc = SentenceEncoder.from_pretrained(path, devices=one_device, buckets=(32, 128))
    out = str(tmp_path / "st")
    enc.export_pytorch(out)
    # The exported tensors are the original ones, bit for bit.
    orig = weights.read_weights(weights.find_weights_file(path))
    exported = weights.read_weights(os.path.join(out, "model.safetensors"))
    for k, v in exported.items():
        np.testing.assert_array_equal(v, orig[k], err_msg=k)
    ref = _st(out).encode(SENTENCES, batch_size=8)
    assert _max_abs(enc.encode(SENTENCES, batch_size=16), ref) <= 1e-5
    # And sentence-transformers reads back the same head: max pooling, same length.
    assert _st(out).max_seq_length == enc.max_seq_length


# ---- batch independence, order, compile count, dtype --------------------------------------------
# One encoder for all of these (default buckets, max_seq_length 256, one device), so the shapes
# the compile-count test compiles first ((64, bucket) for every bucket) are reused by the others.

@pytest.fixture(scope="module")
def tiny_enc(tiny_bert, one_device):
    path = tiny_bert(hidden=32, heads=4, layers=2, pooling="mean", max_position=256)
    return SentenceEncoder.from_pretrained(path, devices=one_device, max_seq_length=256)


# 64 sentences (one full batch), up to 126 characters (one bucket, 128).
BATCH64 = SENTENCES + random_zh_sentences(64 - len(SENTENCES), 1, 126, seed=5)


def test_compilations_bounded_by_packer_shapes(tiny_enc):
    enc = tiny_enc
    sents = random_zh_sentences(1000, 1, 200, seed=4)
    allowed = set(enc.packer(64 * 64).shapes())
    assert len({n for _, n in allowed}) > 2  # several row lengths up to max_seq_length 256
    before = enc.num_compiles
    first = enc.encode(sents, batch_size=64)
    assert set(enc.last_stats.shapes) <= allowed
    assert enc.num_compiles - before <= len(enc.last_stats.shapes)  # at most one per shape used
    # jax's own count of compiled executables, summed over every jitted function the encoder
    # holds, must equal its trace counter: a counter bumped per call, or a retrace that the
    # counter misses, fails here. `_cache_size` is private but present in the pinned jax; if an
    # upgrade drops it, this fails loudly rather than comparing the counter with itself.
    fns = [p.fn for p in enc._fns.values()]
    assert fns and all(hasattr(f, "_cache_size") for f in fns), "jax jit lost _cache_size()"

    def cache_size() -> int:
        return sum(p.fn._cache_size() for p in enc._fns.values())

    assert cache_size() == enc.num_compiles
    # Same lengths again (different order): same shapes, no new compilation, same embeddings.
    compiles, shapes = enc.num_compiles, enc.last_stats.shapes
    again = enc.encode(sents[::-1], batch_size=64)
    assert enc.last_stats.shapes == shapes
    assert enc.num_compiles == compiles and cache_size() == compiles
    assert _max_abs(again[::-1], first) <= 1e-5
    # Packing keeps padding low even on uniformly random lengths.
    assert enc.last_stats.padding_waste < 0.10, enc.last_stats


def test_alone_equals_inside_packed_batch(tiny_enc):
    batch = BATCH64[:44] + random_zh_sentences(20, 180, 200, seed=2)  # long ones: rows of 256
    full = tiny_enc.encode(batch, batch_size=64)
    stats = tiny_enc.last_stats
    assert max(n for _, n in stats.shapes) == 256
    assert stats.batches < len(batch) // 8  # many sentences share a row
    for i in (0, 5, 8):  # short sentences, packed beside others inside the batch
        alone = tiny_enc.encode(batch[i])
        assert alone.shape == (1, tiny_enc.dim)
        assert tiny_enc.last_stats.shapes == ((1, 64),)  # alone: one row of the shortest length
        assert _max_abs(alone[0], full[i]) <= 1e-5


def test_output_order_equals_input_order(tiny_enc):
    sents = random_zh_sentences(150, 1, 200, seed=3)  # three batches of mixed lengths
    base = tiny_enc.encode(sents, batch_size=64)
    # Distinct rows, so a permutation error could not hide.
    d = np.linalg.norm(base[:, None] - base[None], axis=-1) + np.eye(len(sents))
    assert d.min() > 1e-3
    perm = np.random.default_rng(0).permutation(len(sents))
    shuffled = tiny_enc.encode([sents[i] for i in perm], batch_size=64)
    assert _max_abs(shuffled, base[perm]) <= 1e-5
    # Against sentences encoded one at a time (the shortest: one small shape).
    for i in np.argsort([len(s) for s in sents])[:3]:
        assert _max_abs(tiny_enc.encode(sents[i])[0], base[i]) <= 1e-5


def test_bfloat16_close_to_float32(tiny_enc):
    f32 = tiny_enc.encode(BATCH64, batch_size=64)
    bf16 = tiny_enc.encode(BATCH64, batch_size=64, dtype="bfloat16")
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, f32)  # bf16 really ran
    cos = np.sum(f32 * bf16, -1) / np.linalg.norm(f32, axis=-1) / np.linalg.norm(bf16, axis=-1)
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per rounding); matmuls accumulate in f32
    # and softmax / LayerNorm statistics stay f32. Measured here: min cosine 0.999998 (m3e-small,
    # 4 layers: 0.99998). 0.9999 allows 1 - cos 50x the measured value; the old 0.99 allowed
    # 5000x, room for a real bf16 defect (a bf16 mask bias, bf16 LayerNorm variance) to hide.
    assert cos.min() >= 0.9999


def test_normalize_argument_and_empty_input(tiny_enc):
    raw = tiny_enc.encode(BATCH64, batch_size=64)
    e = tiny_enc.encode(BATCH64, batch_size=64, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(e, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert tiny_enc.encode([]).shape == (0, tiny_enc.dim)
    assert tiny_enc.encode([], output="token") == []
    sim = SentenceEncoder.similarity(raw[:2], raw[:5])
    assert sim.shape == (2, 5)
    np.testing.assert_allclose(np.diag(sim[:, :2]), 1.0, atol=1e-6)
