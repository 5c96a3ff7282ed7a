"""The UER-py siamese recipe as a plain PyTorch loop: the reference side of train_vs_pytorch.py.

Shared BERT towers, pooling ("first" = CLS by default, as UER's sbert config), features
[u, v, |u-v|, u*v] -> Linear(4*hidden, num_labels) -> cross-entropy; AdamW (weight decay 0.01,
none on bias / LayerNorm), 10% linear warmup then linear decay to 0, dropout 0.1 in training.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return hidden.masked_fill(m == 0, -1e9).max(1).values


class Siamese(nn.Module):
    def __init__(self, model_dir: str, num_labels: int, pooling: str):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False)
        self.pooling = pooling
        self.classifier = nn.Linear(4 * self.bert.config.hidden_size, num_labels)

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _pool(self.bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask, self.pooling)

    def forward(self, a_ids, a_mask, b_ids, b_mask) -> torch.Tensor:
        u, v = self.embed(a_ids, a_mask), self.embed(b_ids, b_mask)
        return self.classifier(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def train_torch(model_dir: str, train: tuple[list, list, np.ndarray], num_labels: int, *, pooling: str,
                epochs: int, batch_size: int, lr: float, seed: int) -> tuple[Siamese, dict]:
    """Trains on pre-tokenized (a_ids, b_ids, labels); returns the model and speed stats."""
    torch.manual_seed(seed)
    model = Siamese(model_dir, num_labels, pooling)
    model.train()
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-6)
    a, b, labels = train
    n = len(labels)
    steps = epochs * -(-n // batch_size)
    warmup = int(0.1 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    rng = np.random.default_rng(seed)
    t0, seen = time.perf_counter(), 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            a_ids, a_mask = _pad([a[i] for i in idx])
            b_ids, b_mask = _pad([b[i] for i in idx])
            logits = model(a_ids, a_mask, b_ids, b_mask)
            loss = nn.functional.cross_entropy(logits, torch.as_tensor(labels[idx], dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
    elapsed = time.perf_counter() - t0
    return model, {"train_seconds": elapsed, "pairs_per_s": seen / elapsed}


@torch.inference_mode()
def predict_torch(model: Siamese, a: list, b: list, batch_size: int = 128) -> np.ndarray:
    model.eval()
    preds = []
    for start in range(0, len(a), batch_size):
        a_ids, a_mask = _pad(a[start:start + batch_size])
        b_ids, b_mask = _pad(b[start:start + batch_size])
        preds.append(model(a_ids, a_mask, b_ids, b_mask).argmax(-1).numpy())
    return np.concatenate(preds)


@torch.inference_mode()
def embed_torch(model: Siamese, seqs: list, batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = _pad(seqs[start:start + batch_size])
        out.append(model.embed(ids, mask).float().numpy())
    return np.concatenate(out)
