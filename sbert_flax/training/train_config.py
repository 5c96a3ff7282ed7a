"""`TrainConfig`: every knob of a siamese fine-tuning run, one frozen dataclass.

Field names follow UER-py's `run_classifier_siamese.py` flags where one exists. The resolved config
is written to `output_dir/config.json`; `sbert-flax train --config FILE key=value ...` reads one.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from sbert_flax.files import read_json


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # ---- model ----
    pretrained_model_path: str = ""  # HF / sentence-transformers dir, sbert-flax dir, or UER .bin
    vocab_path: str | None = None  # vocab file (needed for a UER .bin; overrides a folder's tokenizer)
    config_path: str | None = None  # UER model config json (heads_num, pooling, ...) or HF config.json
    pooling: str | None = None  # "first"/"cls" | "mean" | "max"; None: the UER config's, else "cls"
    # ---- data (UER classifier TSV: header text_a, text_b, label) ----
    train_path: str = ""
    dev_path: str | None = None  # evaluated after every epoch (accuracy + per-label P/R/F1)
    test_path: str | None = None  # evaluated once at the end with the best model
    sts_dev_path: str | None = None  # s1 \t s2 \t score; adds Spearman of cosine to each dev eval
    labels_num: int | None = None  # classes; None: max label in train/dev + 1
    label_names: tuple[str, ...] | None = None  # label strings in id order (raw files), e.g. NLI names
    columns: tuple[int, int, int] | None = None  # (text_a, text_b, label) field indices
    has_header: bool = True  # first line is a header naming the columns
    skip_bad_lines: bool = False  # skip (and count) malformed lines instead of stopping
    # ---- optimisation (UER defaults) ----
    learning_rate: float = 2e-5  # peak lr
    epochs_num: int = 3
    batch_size: int = 64  # global batch (all devices, all processes)
    seq_length: int = 128  # max tokens per sentence incl. [CLS]/[SEP]
    warmup: float = 0.1  # warmup fraction of all steps, then linear decay to 0
    weight_decay: float = 0.01  # AdamW decay, not on biases / LayerNorm
    uer_adamw: bool = False  # UER's AdamW without bias correction (decay after the step)
    max_grad_norm: float | None = None  # global-norm clipping; None = off (UER: off)
    seed: int = 7  # head init, data order and dropout
    eval_batch_size: int | None = None  # None: batch_size
    # ---- scale ----
    param_sharding: str = "replicated"  # "replicated" (data parallel) | "fsdp"
    mesh_fsdp: int | None = None  # fsdp axis size; None: 1 (replicated) or all devices (fsdp)
    bf16: bool = False  # bfloat16 compute; params and optimizer state stay float32
    # ---- output, checkpoints ----
    output_dir: str = "./runs/siamese"
    save_every_steps: int = 0  # periodic checkpoint every N steps (0: end of epoch only)
    max_to_keep: int = 3  # periodic / epoch checkpoints kept in output_dir/checkpoints
    best_metric: str = "accuracy"  # "accuracy" | "macro_f1" | "sts_spearman" (dev) to keep the best
    resume: bool = False  # continue from the latest checkpoint in output_dir/checkpoints
    export: bool = True  # write best_model (sbert-flax) and best_model_pytorch at the end
    log_every_steps: int = 10  # metrics.jsonl / TensorBoard cadence
    nan_check_every: int = 1  # read the loss on the host every N steps to stop on NaN/inf
    progress_bar: bool = True  # tqdm on process 0
    # ---- test hooks (never needed in real runs) ----
    debug_nan_at_step: int | None = None  # TEST HOOK: the loss of this 1-based step becomes NaN
    debug_step_delay: float = 0.0  # TEST HOOK: sleep seconds after each step (kill/resume tests)

    def __post_init__(self) -> None:
        if self.param_sharding not in ("replicated", "fsdp"):
            raise ValueError(f"param_sharding={self.param_sharding!r}; expected replicated | fsdp")
        if self.best_metric not in ("accuracy", "macro_f1", "sts_spearman"):
            raise ValueError(f"best_metric={self.best_metric!r}; expected accuracy | macro_f1 | "
                             "sts_spearman")
        if self.best_metric == "sts_spearman" and not self.sts_dev_path:
            raise ValueError("best_metric=sts_spearman needs sts_dev_path")
        for name in ("epochs_num", "batch_size", "nan_check_every", "log_every_steps", "max_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.seq_length < 2:
            raise ValueError(f"seq_length={self.seq_length} must be >= 2")
        if self.save_every_steps < 0:
            raise ValueError(f"save_every_steps={self.save_every_steps} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig field(s) {unknown}; known: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_json(cls, path: str, overrides: dict[str, str] | None = None) -> TrainConfig:
        """A config file (JSON object of fields) plus `key=value` overrides (values parsed as JSON
        when possible, else taken as strings)."""
        d = read_json(path)
        for k, v in (overrides or {}).items():
            try:
                d[k] = json.loads(v)
            except json.JSONDecodeError:
                d[k] = v
        return cls.from_dict(d, source=path)


def _coerce(value: Any, hint: Any) -> Any:
    """JSON lists -> tuples for tuple-typed fields; everything else as given."""
    if isinstance(value, list) and "tuple" in str(hint):
        return tuple(value)
    return value
