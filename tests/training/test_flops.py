"""`training/flops.py` against a hand count for BERT-base, and its MFU arithmetic.

The hand count starts from BERT-base's published size, not from the formula under test:
bert-base-uncased has 109,482,240 parameters (checked below on a HF `BertModel` built on the
meta device). Of those, the matmul weights of the encoder are what a token pays 2 FLOPs each
for in the forward pass; embeddings are lookups, biases and LayerNorms are O(D) per token, and
the pooler is not part of sentence embeddings. Attention adds, per layer and per token of a
sequence of S, the scores Q K^T (S x D multiply-adds) and the weighted sum A V (S x D again).
A train step is forward + backward = 3 forward passes, so per token
    6 x (encoder matmul parameters) + 3 x 2 x 2 x L x S x D = 6 N + 12 L S D.
"""

from __future__ import annotations

import pytest

from sbert_flax.models.config import BertConfig
from sbert_flax.training import flops

D, FFN, L, VOCAB, POSITIONS, TYPES = 768, 3072, 12, 30522, 512, 2
BERT_BASE_PARAMS = 109_482_240  # bert-base-uncased, as `BertModel(...).num_parameters()` reports

# Everything in BERT-base that is not an encoder matmul weight.
EMBEDDINGS = (VOCAB + POSITIONS + TYPES) * D + 2 * D  # three tables + their LayerNorm
POOLER = D * D + D
PER_LAYER_BIASES_AND_NORMS = (4 * D + FFN + D) + 2 * (2 * D)  # q, k, v, o, ffn-in, ffn-out; 2 LNs
MATMUL_PARAMS = BERT_BASE_PARAMS - EMBEDDINGS - POOLER - L * PER_LAYER_BIASES_AND_NORMS

BERT_BASE = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L,
                       num_attention_heads=12, intermediate_size=FFN,
                       max_position_embeddings=POSITIONS, type_vocab_size=TYPES)


def test_published_size_splits_as_the_hand_count_says():
    assert MATMUL_PARAMS == 84_934_656  # 12 layers x (4 x 768^2 + 2 x 768 x 3072)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=12,
            intermediate_size=FFN, max_position_embeddings=POSITIONS, type_vocab_size=TYPES))
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == BERT_BASE_PARAMS
    matmuls = sum(p.numel() for n, p in params.items()
                  if n.startswith("encoder.") and n.endswith(".weight") and p.dim() == 2)
    assert matmuls == MATMUL_PARAMS


@pytest.mark.parametrize("seq_len", [32, 128, 512])
def test_bert_base_flops_per_token(seq_len):
    attention_fwd = 2 * 2 * L * seq_len * D  # Q K^T and A V, 2 FLOPs a multiply-add
    assert flops.forward_flops_per_token(BERT_BASE, seq_len) == 2 * MATMUL_PARAMS + attention_fwd
    want = 6 * MATMUL_PARAMS + 12 * L * seq_len * D
    assert flops.train_flops_per_token(BERT_BASE, seq_len) == want
    if seq_len == 128:
        assert want == 523_763_712  # 509,607,936 matmul + 14,155,776 attention


def test_flops_do_not_depend_on_the_vocabulary():
    # The Chinese vocab (21128) changes the embedding table, which costs no matmul FLOPs.
    zh = BertConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=12, intermediate_size=FFN)
    assert zh.vocab_size == 21128
    assert flops.train_flops_per_token(zh, 128) == flops.train_flops_per_token(BERT_BASE, 128)


def test_mfu_and_peaks():
    # 5e14 model FLOP/s on 4 chips of 197e12 peak each (TPU v5e): 63.5%.
    assert flops.mfu(5e14, 197e12, 4) == pytest.approx(5e14 / (4 * 197e12))
    assert flops.mfu(5e14, None, 4) is None
    assert flops.known_peak_flops(["TPU v5 lite"] * 4) == 197e12
    assert flops.known_peak_flops(["NVIDIA H200"]) == 989e12
    assert flops.known_peak_flops(["TPU v4", "TPU v5 lite"]) is None  # mixed: no single peak
    assert flops.known_peak_flops(["cpu"]) is None
