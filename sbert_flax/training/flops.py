"""Model FLOPs and MFU of a BERT train step (host arithmetic, nothing on the device).

Per token of a sequence padded to S, one forward pass of a BERT encoder costs
    2 * layers * (4 D^2 + 2 D I)      the Q, K, V, output and two feed-forward matmuls
  + 2 * layers * 2 S D                attention scores (Q K^T) and the weighted sum (A V)
FLOPs (a multiply-add is 2 FLOPs; embeddings, LayerNorm, softmax and pooling are noise). A train
step is forward + backward = 3 x forward. MFU = model FLOPs of the real (non-padding) tokens per
second / (peak FLOP/s per device x devices): padding and GradCache's extra forward pass count as
waste, as in the PaLM paper's definition.
"""

from __future__ import annotations

from collections.abc import Sequence

from sbert_flax.models.config import BertConfig

# Dense bf16 peak FLOP/s per device (vendor figures), matched against `device_kind` lowercase.
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("v4", 275e12), ("v3", 123e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12),
)


def forward_flops_per_token(cfg: BertConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a sequence padded to `seq_len` (see the module docstring)."""
    d, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return 2.0 * n * (4 * d * d + 2 * d * i) + 4.0 * n * seq_len * d


def train_flops_per_token(cfg: BertConfig, seq_len: int) -> float:
    """Forward + backward: 3 x the forward FLOPs."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def known_peak_flops(device_kinds: Sequence[str]) -> float | None:
    """The per-device bf16 peak of these devices (all alike), or None when not in the table."""
    kinds = {k.lower() for k in device_kinds}
    if len(kinds) != 1:
        return None
    (kind,) = kinds
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(train_flops_per_s: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a peak."""
    if not peak_per_device:
        return None
    return train_flops_per_s / (peak_per_device * devices)
