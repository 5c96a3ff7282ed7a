"""The model card's recipe in PyTorch: sentence-transformers' SoftmaxLoss with UER's head
([u, v, |u-v|, u*v]), trained as sentence-transformers' Trainer trains it.

The reference side of train_vs_pytorch.py and siamese_divergence.py. The loop is written out
(the Trainer itself needs the `datasets` package and its own sampler), with every piece as the
Trainer (`SentenceTransformerTrainer`, which `fit` runs) does it:
- the model: `SentenceTransformer(dir)` (mean pooling for a plain HF folder), `max_seq_length`;
  texts tokenized per column by `model.tokenize` (each column padded to its longest);
- the loss: `SoftmaxLoss(model, dim, num_labels, concatenation_sent_multiplication=True)`, its
  `nn.Linear` head initialised by torch's default (kaiming-uniform) under `torch.manual_seed`;
- the optimizer: torch's AdamW with HF's `adam_epsilon` 1e-8, weight decay on the names
  `Trainer.get_decay_parameter_names` keeps (not biases, not LayerNorm), over the loss's
  params (the encoder and the head);
- the schedule: `get_linear_schedule_with_warmup` with ceil(warmup_ratio * steps) warmup steps,
  stepped after each update (the first update runs at lr 0);
- clipping: `clip_grad_norm_(model.parameters(), max_grad_norm)`: the encoder's params only (the
  Trainer clips `model`, and SoftmaxLoss's head lives in the loss, not the model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch


class SoftmaxRecipe:
    """One sentence-transformers model + SoftmaxLoss + optimizer + schedule, stepped by hand.

    Args:
      model_dir: HF / sentence-transformers folder.
      num_labels: classes.
      seq_length: max tokens per text (`max_seq_length`).
      lr, weight_decay, warmup_ratio, max_grad_norm: the Trainer's arguments of the same names.
      total_steps: the schedule's length.
      seed: `torch.manual_seed` before the head is built (its init).
      dropout: False sets every dropout probability to 0 (step-by-step comparisons).
    """

    def __init__(self, model_dir: str, num_labels: int, *, seq_length: int, lr: float, total_steps: int,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.1, max_grad_norm: float | None = 1.0,
                 seed: int = 7, dropout: bool = True):
        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from sentence_transformers.sentence_transformer.losses import SoftmaxLoss
        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(seed)
        self.model = SentenceTransformer(model_dir, device="cpu")
        self.model.max_seq_length = seq_length
        if not dropout:
            for m in self.model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.loss = SoftmaxLoss(self.model, dim(), num_labels, concatenation_sent_multiplication=True)
        # The Trainer's own rule (it reads no instance state): decay all but biases and LayerNorm.
        decay = set(SentenceTransformerTrainer.get_decay_parameter_names(None, self.loss))
        named = list(self.loss.named_parameters())
        self.opt = torch.optim.AdamW(
            [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
             {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
            lr=lr, eps=1e-8)
        self.sched = get_linear_schedule_with_warmup(self.opt, math.ceil(total_steps * warmup_ratio),
                                                     total_steps)
        self.max_grad_norm = max_grad_norm

    def features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.model.tokenize(list(texts))

    def step(self, a: Sequence[str], b: Sequence[str], labels: np.ndarray) -> tuple[float, float]:
        """One update on the pairs (a, b, labels); returns (loss, pre-clip gradient norm over every
        trained param, head included)."""
        self.model.train()
        loss = self.loss([self.features(a), self.features(b)], torch.as_tensor(labels, dtype=torch.long))
        self.opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.loss.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        return float(loss.detach()), norm

    @torch.inference_mode()
    def predict(self, a: Sequence[str], b: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Predicted labels of the pairs (eval mode)."""
        self.model.eval()
        out = []
        for s in range(0, len(a), batch_size):
            u = self.model(self.features(a[s:s + batch_size]))["sentence_embedding"]
            v = self.model(self.features(b[s:s + batch_size]))["sentence_embedding"]
            logits = self.loss.classifier(torch.cat([u, v, (u - v).abs(), u * v], 1))
            out.append(logits.argmax(-1).numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        self.model.eval()
        return np.concatenate([self.model(self.features(texts[s:s + batch_size]))["sentence_embedding"]
                               .float().numpy() for s in range(0, len(texts), batch_size)])


def train_torch(recipe: SoftmaxRecipe, a: Sequence[str], b: Sequence[str], labels: np.ndarray,
                batches: Sequence[np.ndarray]) -> dict:
    """Runs `batches` (record indices per step); returns speed stats and the per-step losses."""
    t0, seen, losses = time.perf_counter(), 0, []
    for idx in batches:
        loss, _ = recipe.step([a[i] for i in idx], [b[i] for i in idx], labels[idx])
        losses.append(loss)
        seen += len(idx)
    elapsed = time.perf_counter() - t0
    return {"train_seconds": elapsed, "pairs_per_s": seen / elapsed, "losses": losses}
