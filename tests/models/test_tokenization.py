"""`Tokenizer.encode`: the ids of the HF tokenizer's own call, and safe from several threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import ZH_SENTENCES, random_zh_sentences

from sbert_flax.models.tokenization import Tokenizer, load_tokenizer

TEXTS = [*ZH_SENTENCES, "", "   ", "Hello WORLD, héllo naïve café 123.45", "\t混合 text 与 English\n",
         "a " * 300]


def hf_call(tok: Tokenizer, texts: list[str], max_length: int | None, side: str) -> list[list[int]]:
    """What the HF tokenizer returns for the same texts: the contract `encode` keeps."""
    texts = [t.strip() for t in texts]
    if tok.lowercase_text:
        texts = [t.lower() for t in texts]
    hf = tok.hf
    if max_length is None:
        return hf(texts, add_special_tokens=True, truncation=False)["input_ids"]
    hf.truncation_side = side
    return hf(texts, add_special_tokens=True, truncation="longest_first",
              max_length=max_length)["input_ids"]


@pytest.fixture(params=["zh_vocab", "m3e_dir", "minilm_dir"])
def tokenizer(request) -> Tokenizer:
    # A bare vocab.txt, a Chinese model folder, and an English one that lowercases.
    return load_tokenizer(request.getfixturevalue(request.param))


@pytest.mark.parametrize("lowercase", [False, True])
def test_encode_gives_the_hf_call_ids(tokenizer, lowercase):
    tok = Tokenizer(tokenizer.hf, lowercase_text=lowercase)
    texts = TEXTS + random_zh_sentences(40, 0, 200, seed=1)
    # 1 and 2 leave no room for text: HF still keeps [CLS] and [SEP], so must we.
    for max_length in (None, 1, 2, 3, 8, 64, 512):
        for side in ("right", "left"):
            got = tok.encode(texts, max_length, truncation_side=side)
            want = hf_call(tok, texts, max_length, side)
            assert len(got) == len(want)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                assert g.dtype == np.int32 and g.tolist() == list(w), (max_length, side, i)


def test_encode_ids_is_encode_in_one_buffer(tokenizer):
    texts = TEXTS + random_zh_sentences(40, 0, 200, seed=3)
    for max_length, side in ((None, "right"), (8, "left"), (64, "right")):
        want = tokenizer.encode(texts, max_length, side)
        for chunk in (tokenizer.chunk, 7, 1):  # one encode_batch call, pieces of 7 (and a rest), 1
            tokenizer.chunk = chunk
            got = tokenizer.encode_ids(texts, max_length, side)
            assert len(got) == len(want) and got.flat.dtype == np.int32, chunk
            assert got.offsets.dtype == np.int64 and got.offsets[0] == 0, chunk
            assert got.lengths.tolist() == [len(w) for w in want], chunk
            assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)), chunk
    assert len(tokenizer.encode_ids([], 8)) == 0


def test_eight_threads_with_mixed_sides_give_the_serial_result(zh_vocab):
    tok = load_tokenizer(zh_vocab)
    texts = random_zh_sentences(64, 20, 120, seed=2)
    settings = [(16, "right"), (16, "left"), (24, "left"), (None, "right")]
    serial = {s: tok.encode(texts, *s) for s in settings}
    # The test means something only if the sides differ on these texts.
    assert all(not np.array_equal(a, b) for a, b in zip(serial[16, "right"], serial[16, "left"],
                                                         strict=True))

    rounds = 40
    start = threading.Barrier(8)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait()
            out = []
            for r in range(rounds):
                s = settings[(i + r) % len(settings)]  # every thread changes side and length
                out.append((s, tok.encode(texts, *s)))
            results[i] = out
        except BaseException as e:  # reported below, with the thread's own error
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == list(range(8))
    for i, out in results.items():
        for r, (s, ids) in enumerate(out):
            assert all(np.array_equal(a, b) for a, b in zip(ids, serial[s], strict=True)), (i, r, s)


def test_tokenizer_pickles(zh_vocab):
    # The lock and the backend copies are rebuilt after unpickling.
    import pickle

    tok = load_tokenizer(zh_vocab)
    want = tok.encode(ZH_SENTENCES, 8, "left")
    back = pickle.loads(pickle.dumps(tok))
    assert [a.tolist() for a in back.encode(ZH_SENTENCES, 8, "left")] == [a.tolist() for a in want]
