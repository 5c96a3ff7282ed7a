"""`CrossEncoder.predict` / `.rank` against sentence-transformers' `CrossEncoder` on the same folders.

Each case runs the reference itself (sentence-transformers 6.3 on torch, float32) on a random
`BertForSequenceClassification` saved with `save_pretrained`, every tensor perturbed: one label
with its default Sigmoid and with Identity (raw logits, the most sensitive comparison), three
labels with and without softmax, pairs longer than max_length (longest-first truncation), and one
BERT-base-sized model (12 layers, 768 hidden). Scores agree to 1e-5, never loosened.
"""

from __future__ import annotations

import cross_encoder_helpers as ceh
import numpy as np
import pytest

from sbert_flax.inference.cross_encoder import CrossEncoder

st = pytest.importorskip("sentence_transformers")
torch = pytest.importorskip("torch")

TOL = 1e-5


@pytest.fixture(scope="module")
def ce_dirs(tmp_path_factory, zh_vocab) -> dict[int, str]:
    """num_labels -> a tiny random cross-encoder folder. 64 positions: the pair length is 64 and
    every packed row is 64 tokens long, which keeps the compiled shapes few."""
    return {n: ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp(f"ce{n}")),
                                               num_labels=n, seed=n, max_position=64,
                                               vocab_file=zh_vocab)
            for n in (1, 3)}


@pytest.fixture(scope="module")
def pairs(zh_vocab) -> list[tuple[str, str]]:
    return ceh.make_pairs(25, seed=1, max_len=25)


def _ours(path: str, one_device, **kw) -> CrossEncoder:
    # A small token budget: batches of at most 4 rows of 64, so the tests share a few compiled
    # shapes (programs are shared process-wide); one test runs the default budget.
    return CrossEncoder(path, devices=one_device, **{"max_batch_tokens": 256, **kw})


@pytest.mark.parametrize("activation", [None, "identity"])
def test_one_label_matches_sentence_transformers(ce_dirs, pairs, one_device, activation):
    ref_kw = {} if activation is None else {"activation_fn": torch.nn.Identity()}
    ref = st.CrossEncoder(ce_dirs[1], **ref_kw)
    assert type(ref.activation_fn).__name__ == ("Sigmoid" if activation is None else "Identity")
    ours = _ours(ce_dirs[1], one_device, activation_fn=activation,
                 max_batch_tokens=256 if activation else 4096)
    want, got = ref.predict(pairs), ours.predict(pairs)
    assert got.shape == want.shape == (len(pairs),) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert ours.activation_name == ("sigmoid" if activation is None else "identity")


@pytest.mark.parametrize("apply_softmax", [False, True])
def test_three_labels_match_sentence_transformers(ce_dirs, pairs, one_device, apply_softmax):
    ref = st.CrossEncoder(ce_dirs[3])
    ours = _ours(ce_dirs[3], one_device)
    want = ref.predict(pairs, apply_softmax=apply_softmax)
    got = ours.predict(pairs, apply_softmax=apply_softmax)
    assert got.shape == want.shape == (len(pairs), 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    if apply_softmax:
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="num_labels=1"):
        ours.rank("查询", ["文档"])


def test_truncation_to_max_length_matches(ce_dirs, one_device):
    """Pairs of up to 60 + 60 tokens at max_length 24: both texts lose tokens (longest first)."""
    long_pairs = ceh.make_pairs(20, seed=2, max_len=60)
    ref = st.CrossEncoder(ce_dirs[1], max_length=24, activation_fn=torch.nn.Identity())
    ours = _ours(ce_dirs[1], one_device, max_length=24, activation_fn="identity")
    ids = ours.tokenize(long_pairs)
    assert ids.lengths.max() == 24 and (ids.lengths == 24).sum() > 10
    want = ref.tokenizer([list(p) for p in long_pairs], truncation="longest_first", max_length=24)
    for i in range(len(long_pairs)):  # the same ids and token types as the reference feeds
        assert ids.ids[i].tolist() == want["input_ids"][i]
        assert ids.token_types[ids.ids.offsets[i]:ids.ids.offsets[i + 1]].tolist() \
            == want["token_type_ids"][i]
    np.testing.assert_allclose(ours.predict(long_pairs), ref.predict(long_pairs), rtol=0, atol=TOL)


def test_rank_matches_sentence_transformers(ce_dirs, one_device, zh_vocab):
    import helpers

    docs = helpers.random_zh_sentences(12, 1, 40, seed=3) + ["", "今天天气很好。"]
    query = "今天天气怎么样？"
    ref = st.CrossEncoder(ce_dirs[1])
    ours = _ours(ce_dirs[1], one_device)
    for kw in ({}, {"top_k": 5, "return_documents": True}):
        want, got = ref.rank(query, docs, **kw), ours.rank(query, docs, **kw)
        assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in want]
        assert len(got) == (5 if kw else len(docs))
        for g, w in zip(got, want, strict=True):
            assert set(g) == set(w) and abs(g["score"] - w["score"]) <= TOL
            assert g.get("text") == w.get("text")
            assert isinstance(g["score"], float)


def test_single_pair_empty_input_and_output_forms(ce_dirs, pairs, one_device):
    ref = st.CrossEncoder(ce_dirs[3])
    ours = _ours(ce_dirs[3], one_device)
    one = ours.predict(pairs[0])
    assert one.shape == (3,)
    np.testing.assert_allclose(one, ref.predict(pairs[0]), rtol=0, atol=TOL)
    assert ours.predict([]).shape == (0, 3)
    as_list = ours.predict(pairs[:4], convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 4 and as_list[0].shape == (3,)
    tensor = ours.predict(pairs[:4], convert_to_tensor=True)
    np.testing.assert_array_equal(np.asarray(tensor), np.stack(as_list))


def test_bad_pair_is_named(ce_dirs, one_device):
    ours = _ours(ce_dirs[1], one_device)
    with pytest.raises(TypeError, match=r"pairs\[2\]"):
        ours.predict([("a", "b"), ("c", "d"), ("only one",)])


def test_streaming_windows_and_compiles(ce_dirs, one_device, monkeypatch):
    """A generator read in several windows of several batches scores as one list does, in
    input order; after `warmup` (every packed shape of the budget) nothing compiles again."""
    import sbert_flax.inference.cross_encoder as mod

    many = ceh.make_pairs(300, seed=4, max_len=25)
    ours = _ours(ce_dirs[1], one_device)
    assert ours.warmup() == len(ours.packer().shapes()) == 3  # (1|2|4, 64)
    compiled = ours.num_compiles
    whole = ours.predict(many)
    monkeypatch.setattr(mod, "MIN_WINDOW", 64)  # windows of 64, 128, 256 pairs
    chunks = list(ours.logits_chunks(iter(many), chunk_size=100))
    assert [len(r) for r, _ in chunks] == [100, 100, 100, len(many) - 300]
    np.testing.assert_array_equal(np.concatenate([r for r, _ in chunks]), np.arange(len(many)))
    streamed = ours.activation_fn(np.concatenate([c for _, c in chunks]))[:, 0]
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)
    assert ours.num_compiles == compiled


@pytest.mark.slow
def test_bert_base_sized_matches_sentence_transformers(tmp_path_factory, one_device, zh_vocab):
    """12 layers, 768 hidden, 12 heads, 3072 intermediate: BERT-base's shape, random weights;
    16 pairs, three of them truncated to max_length 40, with return_documents. (Short pairs:
    the compute of a real-sized model is what makes this test slow.)"""
    import helpers

    path = ceh.make_tiny_cross_encoder_dir(
        str(tmp_path_factory.mktemp("ce_base")), hidden=768, layers=12, heads=12,
        intermediate=3072, max_position=512, std=0.02, vocab_file=zh_vocab)
    long = helpers.random_zh_sentences(6, 30, 40, seed=6)
    pairs16 = ceh.make_pairs(6, seed=5, max_len=8) + list(zip(long[:3], long[3:], strict=True))
    assert len(pairs16) == 16
    ref = st.CrossEncoder(path, max_length=40, activation_fn=torch.nn.Identity())
    ours = _ours(path, one_device, max_length=40, activation_fn="identity")
    assert (ours.tokenize(pairs16).lengths == 40).sum() == 3
    np.testing.assert_allclose(ours.predict(pairs16), ref.predict(pairs16), rtol=0, atol=TOL)
    docs = [b for _, b in pairs16]
    want = ref.rank(pairs16[0][0], docs, return_documents=True)
    got = ours.rank(pairs16[0][0], docs, return_documents=True)
    assert [(r["corpus_id"], r["text"]) for r in got] == [(r["corpus_id"], r["text"]) for r in want]
    assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want, strict=True)) <= TOL
