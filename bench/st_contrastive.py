"""sentence-transformers' contrastive training as a plain loop: the reference side of
train_contrastive_vs_st.py.

`SentenceTransformerTrainer` needs the `datasets` package (not installed here), so this is the
loop `SentenceTransformer.old_fit` and the HF Trainer run, written out so every step can be timed:
a random sampler seeded by `seed` (no drop_last), per-batch tokenization padded to the batch's
longest text (`model.preprocess`, truncated at `max_seq_length`), the sentence-transformers loss
module (`MultipleNegativesRankingLoss` / `CoSENTLoss`, scale 20) on top of the model in train mode
(dropout on), `clip_grad_norm_(max_grad_norm)` (1.0, both trainers' default), torch AdamW
(eps 1e-8, weight decay 0.01 except biases and LayerNorm, as `old_fit` groups them), and the
linear warmup/decay schedule with ceil(warmup_ratio * steps) warmup steps (HF Trainer).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

Rows = tuple[list[list[str]], list[float] | None]  # (per-row texts, per-row scores or None)

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def read_rows(path: str, *, header: bool, columns: int, score_scale: float | None) -> Rows:
    """Reads a TSV: the first `columns` fields are texts; with `score_scale`, the next is a score.

    Returns:
      (texts per row, scores / score_scale per row or None).
    """
    texts: list[list[str]] = []
    scores: list[float] = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if (header and i == 0) or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            texts.append(fields[:columns])
            if score_scale is not None:
                scores.append(float(fields[columns]) / score_scale)
    return texts, (scores if score_scale is not None else None)


def train_st(model_dir: str, loss_name: str, rows: Rows, *, batch_size: int, lr: float, epochs: int,
             seq_length: int, warmup: float, scale: float, seed: int, max_steps: int | None,
             max_grad_norm: float | None, weight_decay: float = 0.01, device: str = "cpu",
             autocast_dtype: torch.dtype | None = None):
    """Trains a SentenceTransformer on `rows`; returns (model, stats).

    stats: "steps", "step_end" (perf_counter after each optimizer step, index 0 = loop start),
    "step_sentences" (texts embedded in each step), "train_seconds". `autocast_dtype` (e.g.
    torch.bfloat16 on a GPU) runs the forward and loss under `torch.autocast`, float32 master
    weights, as the HF Trainer's `bf16=True` does.
    """
    from sentence_transformers import SentenceTransformer, losses
    from transformers import get_linear_schedule_with_warmup, set_seed

    set_seed(seed)
    model = SentenceTransformer(model_dir, device=device)
    model.max_seq_length = seq_length
    if loss_name == "mnrl":
        loss_model = losses.MultipleNegativesRankingLoss(model, scale=scale)
    elif loss_name == "cosent":
        loss_model = losses.CoSENTLoss(model, scale=scale)
    else:
        raise ValueError(f"loss {loss_name!r}: expected mnrl | cosent")

    texts, scores = rows
    n = len(texts)
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    if max_steps:
        total = min(total, max_steps)
    named = list(loss_model.named_parameters())
    opt = torch.optim.AdamW([
        {"params": [p for k, p in named if not any(nd in k for nd in NO_DECAY)], "weight_decay": weight_decay},
        {"params": [p for k, p in named if any(nd in k for nd in NO_DECAY)], "weight_decay": 0.0},
    ], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(warmup * total), total)
    gen = torch.Generator().manual_seed(seed)  # RandomSampler's generator

    loss_model.train()
    step, step_end, step_sentences = 0, [time.perf_counter()], []
    while step < total:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            if step >= total:
                break
            idx = order[start:start + batch_size]
            batch = [texts[i] for i in idx]
            features = [model.preprocess([row[c] for row in batch]) for c in range(len(batch[0]))]
            labels = (torch.tensor([scores[i] for i in idx], dtype=torch.float32) if scores is not None
                      else torch.zeros(len(idx)))
            features = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()}
                        for f in features]
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                value = loss_model(features, labels.to(device))
            value.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(loss_model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            # Read the loss (a device sync on a GPU) only when logging, as the HF Trainer does;
            # before the step's time, so the times of logged steps (the windows) are synced.
            logged = step % 10 == 0 or step == total
            if logged:
                last_loss = value.detach().item()
            step_end.append(time.perf_counter())
            step_sentences.append(len(idx) * len(batch[0]))
            if logged:
                print(f"step {step}/{total} loss {last_loss:.4f} "
                      f"{sum(step_sentences) / (step_end[-1] - step_end[0]):.1f} sentences/s", flush=True)
                if not math.isfinite(last_loss):
                    raise RuntimeError(f"loss is {last_loss} at step {step}")
    model.eval()
    stats = {"steps": step, "step_end": step_end, "step_sentences": step_sentences,
             "train_seconds": step_end[-1] - step_end[0], "final_loss": last_loss}
    return model, stats


def window_rate(step_end: list[float], step_sentences: list[int], first: int, last: int) -> float:
    """Sentences/s over steps first+1..last (step_end[k] = time after step k, [0] = loop start)."""
    sent = float(np.sum(step_sentences[first:last]))
    return sent / max(step_end[last] - step_end[first], 1e-9)
