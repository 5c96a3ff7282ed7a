"""Tiny random cross-encoder folders (HF `BertForSequenceClassification`, `save_pretrained`, no
network) and pair data, shared by the cross-encoder tests of models/, checkpoints/, inference/
and cli/.

Every tensor is perturbed (biases, LayerNorm, pooler and classifier included), so a mis-mapped
or transposed tensor, or a swapped token type, changes the scores.
"""

from __future__ import annotations

import os

import helpers


def make_tiny_cross_encoder_dir(path: str, *, num_labels: int = 1, hidden: int = 32,
                                layers: int = 2, heads: int = 4, intermediate: int = 37,
                                max_position: int = 128, seed: int = 0, std: float = 0.1,
                                vocab_file: str | None = None) -> str:
    """Writes a random `BertForSequenceClassification` folder (weights, config, tokenizer)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    vocab_file = vocab_file or helpers.zh_vocab_file()
    if vocab_file is None:
        raise FileNotFoundError("the Chinese vocab (shared/data/vocab/google_zh_vocab.txt) is absent")
    tok = helpers.wordpiece_tokenizer(vocab_file, model_max_length=max_position)
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_position,
                     type_vocab_size=2, num_labels=num_labels)
    # Built on the meta device and filled here: HF's own initialisation of a BERT-base-sized
    # model costs five times the rest, and every tensor is overwritten anyway. (Its buffers stay
    # unset: they are not saved, and the folder is only ever loaded afresh.)
    with torch.device("meta"):
        model = BertForSequenceClassification(cfg)
    model = model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, std)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_pairs(n: int, seed: int = 0, max_len: int = 40) -> list[tuple[str, str]]:
    """Seven fixed pairs (real sentences, mixed scripts, whitespace, an empty text), then `n`
    pairs of random Chinese texts of 1..max_len characters."""
    fixed = [(helpers.ZH_SENTENCES[i], helpers.ZH_SENTENCES[i + 1]) for i in range(0, 10, 2)]
    fixed += [("  今天天气很好 ", "Hello 世界"), ("", "猫")]
    texts = helpers.random_zh_sentences(2 * n, 1, max_len, seed=seed)
    return fixed + list(zip(texts[:n], texts[n:], strict=True))
