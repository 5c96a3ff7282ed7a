"""`TrainConfig`: every knob of a fine-tuning run (siamese softmax or contrastive), one frozen
dataclass.

Field names follow UER-py's `run_classifier_siamese.py` flags where one exists. The resolved config
is written to `output_dir/config.json`; `sbert-flax train --config FILE key=value ...` reads one.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from sbert_flax.common.files import read_json
from sbert_flax.training import fingerprint

# The losses by name: the one list the CLI, the config and `losses.make_loss` take (here, not in
# losses.py, so that parsing a command line imports no JAX).
# Cross-encoder losses (issue 25): a `SequenceClassifier` trained on (query, document) pairs,
# built by `cross_encoder_losses.make_cross_encoder_loss`.
CROSS_ENCODER_LOSSES = ("ce-bce", "ce-softmax", "ce-listwise")
LOSSES = ("softmax", "mnrl", "cached-mnrl", "cosent", *CROSS_ENCODER_LOSSES)
# The losses with a label column: their --dev_path / --test_path are classification sets.
CLASSIFICATION_LOSSES = ("softmax", "ce-bce", "ce-softmax")
POOLINGS = ("first", "cls", "mean", "max")
DATA_FORMATS = ("auto", "tsv", "csv", "jsonl")
PARAM_SHARDINGS = ("replicated", "fsdp")
# Fields that take one of a fixed set of names: the CLI's argparse choices and __post_init__'s
# check both read this, so a config file and a command line refuse the same values.
CHOICES: dict[str, tuple[str, ...]] = {"pooling": POOLINGS, "loss": LOSSES,
                                       "data_format": DATA_FORMATS,
                                       "param_sharding": PARAM_SHARDINGS}
BEST_METRICS = ("accuracy", "macro_f1", "sts_spearman")
# Retrieval metrics --best_metric also takes (of the first --ir-dev folder): every name
# `retrieval.evaluate_retrieval` reports with its default cut-offs, spelled out here so that
# parsing a command line imports nothing heavy.
RETRIEVAL_BEST_METRICS = (*(f"accuracy@{k}" for k in (1, 3, 5, 10)),
                          *(f"{m}@{k}" for m in ("precision", "recall") for k in (1, 3, 5, 10, 100)),
                          "mrr@10", "ndcg@10", "map@100")
# The resume plan's data: every TrainConfig field is in exactly one of these two tables, with why
# (tests/training/test_resume_plan.py fails on a field in neither, so a new field cannot be forgotten).
#
# What `--resume` refuses to change (without --force): the run would no longer be the one
# checkpointed. Each is recorded in the checkpoint's meta and compared before anything is written.
RESUME_REFUSED: dict[str, str] = {
    "pooling": "how token states become the embedding; compared as the resolved mode (the "
               "flag, else the UER config's, else the model folder's)",
    "loss": "the objective, and the columns and batches it reads",
    "scale": "the cosine multiplier: the loss and its gradients",
    "symmetric": "adds a loss term",
    "mini_batch_size": "cached-mnrl: the packing groups and dropout keys of each forward pass",
    "matryoshka_dims": "adds loss terms on truncated embeddings",
    "train_path": "the training examples (by path; their content is checked through train_data, "
                  "their count through total_steps)",
    "data_format": "how the training file is parsed",
    "labels_num": "the softmax head's shape",
    "label_names": "which label id each raw label becomes",
    "columns": "which fields are anchor / positive / label",
    "has_header": "whether the first line trains",
    "score_scale": "cosent's targets",
    "group_by_length": "which examples share a batch",
    "no_duplicates": "which examples share a batch",
    "pack": "the batches' shapes and attention (packed rows vs padded)",
    "learning_rate": "the update size",
    "epochs_num": "the schedule's length (total_steps is checked too)",
    "max_steps": "the schedule's length (total_steps is checked too)",
    "batch_size": "the batches, the schedule's length",
    "seq_length": "truncation: the tokens each sentence trains on",
    "warmup": "the learning-rate schedule",
    "weight_decay": "the update rule",
    "uer_adamw": "the update rule",
    "max_grad_norm": "the update rule (clipping)",
    "adam_eps": "the update rule",
    "clip_head": "the update rule (what the clipping norm covers)",
    "seed": "head init, data order and dropout keys",
    "bf16": "the precision of every forward and backward pass",
}
# What `--resume` may change: the trajectory (params after each step) stays the checkpointed one.
RESUME_NEUTRAL: dict[str, str] = {
    "pretrained_model_path": "a location: the model is compared by content (model_sha256)",
    "vocab_path": "a location: the vocab is compared by content (vocab_sha256)",
    "config_path": "a location: its pooling is compared resolved, its architecture is part of "
                   "model_sha256",
    "dev_path": "evaluated only (a softmax head size it implies is compared as num_labels); "
                "other content behind the best metric starts the best over",
    "test_path": "evaluated once at the end",
    "sts_dev_paths": "evaluated only; other content in the first (the best metric's) starts the "
                     "best over",
    "sts_dev_path": "evaluated only (folded into sts_dev_paths)",
    "ir_dev_paths": "BEIR folders, evaluated only; other content in the first (a retrieval best "
                    "metric's) starts the best over",
    "ir_dev_split": "which qrels of the BEIR folders are evaluated",
    "eval_steps": "evaluation cadence: when dev sets are scored, not what trains",
    "skip_bad_lines": "the run that saved the checkpoint had no bad lines or skipped them; "
                      "without it a bad line stops the run, it never trains on other records",
    "data_threads": "prefetch threads; the order and the saved iterator state do not depend on it",
    "eval_batch_size": "evaluation only: the token budget of its packed batches, the same "
                       "results per example",
    "param_sharding": "the layout of the same params; the restore reshards them",
    "mesh_fsdp": "the layout of the same params; the restore reshards them",
    "remat": "recomputes the same activations in the backward pass",
    "scan_layers": "the same layers as one lax.scan; the params are stored the same way",
    "windowed_einsum": "how XLA schedules the same computation's collectives",
    "peak_flops": "the MFU figure in the logs",
    "output_dir": "where the run is: the checkpoint is read from it",
    "save_every_steps": "how often the state is saved, not what it is",
    "max_to_keep": "how many checkpoints stay on disk",
    "best_metric": "which evaluation picks the exported model, not the params (a changed "
                   "metric starts the best over)",
    "resume": "how this invocation starts",
    "force": "how this invocation starts",
    "export": "what is written at the end",
    "log_every_steps": "logging cadence",
    "nan_check_every": "how often the host reads the finite flag; a NaN stops the run either way",
    "progress_bar": "display",
}
# The refused fields' names (what a checkpoint's meta records).
RESUME_FIELDS = tuple(RESUME_REFUSED)
# The value a checkpoint's saved config implies for a field it predates (it trained that way;
# group_by_length / no_duplicates were not recorded: their default is the likely value).
RESUME_DEFAULTS = {"pack": False, "group_by_length": False, "no_duplicates": False}
# What the plan compares besides the fields: facts of the run derived from the files, recorded
# in the checkpoint's meta; each with how a refusal names it and what a change means.
RESUME_FACTS: dict[str, tuple[str, str]] = {
    "model_sha256": ("pretrained model content (model_sha256)",
                     "other weights or architecture, wherever the model lies"),
    "vocab_sha256": ("vocab content (vocab_sha256)", "sentences become other token ids"),
    "num_labels": ("softmax classes (num_labels)", "another head"),
    "total_steps": ("total_steps", "epochs_num, max_steps, batch_size or the training data changed"),
    "length_buckets": ("length buckets of --group_by_length",
                       "this version groups other records into a batch"),
    "train_data": ("training data content (train_data)",
                   "the checkpoint's iterator position would continue over other rows: a "
                   "rewritten file (re-mined negatives) is a new run"),
}
# Facts that are file fingerprints (`fingerprint.file_fingerprint`), compared by content (a
# copied or touched file is the same data), with the field that names the file.
FINGERPRINT_FACTS: dict[str, str] = {"train_data": "train_path"}
# Fields older config.json files carry with these (inert) values; read and ignored. Other values
# are refused as unknown fields: they were test hooks, now injected by the tests themselves.
RETIRED_FIELDS: dict[str, Any] = {"debug_nan_at_step": None, "debug_step_delay": 0.0}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # ---- model ----
    pretrained_model_path: str = ""  # HF / sentence-transformers dir, sbert-flax dir, or UER .bin
    #   (required)
    vocab_path: str | None = None  # vocab file (needed for a UER .bin; overrides a folder's tokenizer)
    config_path: str | None = None  # UER model config json (heads_num, pooling, ...) or HF config.json
    pooling: str | None = None  # "first"/"cls" | "mean" | "max"; None: UER config's, else softmax
    #   "cls" (UER's default) and the embedding losses the model folder's own pooling
    # ---- loss ----
    loss: str = "softmax"  # "softmax" (UER siamese) | "mnrl" | "cached-mnrl" | "cosent" |
    #   cross-encoders: "ce-bce" (pairs, label 0/1) | "ce-softmax" (pairs, classes) | "ce-listwise"
    #   (anchor, positive, negatives); they pad each pair (--pack does not apply)
    scale: float = 20.0  # cosine multiplier of mnrl / cached-mnrl / cosent
    symmetric: bool = False  # mnrl: add the positive -> anchor term
    mini_batch_size: int | None = None  # cached-mnrl: sentences per forward pass (GradCache)
    matryoshka_dims: tuple[int, ...] | None = None  # train truncated dims too (embedding losses)
    # ---- data ----
    train_path: str = ""  # TSV / CSV with a header, or JSONL (required)
    dev_path: str | None = None  # softmax: evaluated after every epoch (accuracy + per-label P/R/F1)
    test_path: str | None = None  # softmax: evaluated once at the end with the best model
    sts_dev_paths: tuple[str, ...] = ()  # s1 \t s2 \t score files: Spearman of cosine, each epoch
    sts_dev_path: str | None = None  # one more STS file (the old single-file field; merged above)
    ir_dev_paths: tuple[str, ...] = ()  # BEIR folders: retrieval metrics at each evaluation
    #   (`retrieval.evaluate_retrieval`); --best_metric ndcg@10 etc. reads the first
    ir_dev_split: str = "dev"  # qrels split of the --ir-dev folders (qrels/<split>.tsv); "dev"
    #   falls back to "test" for a folder without qrels/dev.tsv, with a warning
    data_format: str = "auto"  # "auto" (by extension) | "tsv" | "csv" | "jsonl"
    labels_num: int | None = None  # classes; None: max label in train/dev + 1
    label_names: tuple[str, ...] | None = None  # label strings in id order (raw files), e.g. NLI names
    columns: tuple[str | int, ...] | None = None  # field names in order (no header), or indices of
    #   the loss's columns in order (UER style: text_a, text_b, label)
    has_header: bool = True  # first line is a header naming the columns
    skip_bad_lines: bool = False  # skip (and count) malformed lines instead of stopping
    score_scale: float = 1.0  # cosent: gold scores are divided by it (5 for STS-B's 0..5)
    group_by_length: bool = False  # batches of similar length (less padding, not random samples)
    no_duplicates: bool = False  # no text twice in a batch (sentence-transformers' sampler)
    pack: bool = True  # pack the batch's texts (every column) into shared rows (block-diagonal
    #   attention); False pads each text to its column's bucket (softmax: [a; b] to one length)
    data_threads: int = 2  # grain threads reading / tokenizing / padding ahead of the device
    # ---- optimisation (UER defaults) ----
    learning_rate: float = 2e-5  # peak lr
    epochs_num: int = 3  # passes over the training data
    max_steps: int | None = None  # stop after this many steps (the schedule spans them)
    batch_size: int = 64  # global batch (all devices, all processes)
    seq_length: int = 128  # max tokens per sentence incl. [CLS]/[SEP]
    warmup: float = 0.1  # warmup fraction of all steps, then linear decay to 0
    weight_decay: float = 0.01  # AdamW decay, not on biases / LayerNorm
    uer_adamw: bool = False  # UER's AdamW without bias correction (decay after the step)
    max_grad_norm: float | None = None  # global-norm clipping; None = off (UER: off)
    adam_eps: float = 1e-6  # AdamW epsilon: UER's 1e-6; torch / sentence-transformers' is 1e-8
    clip_head: bool = True  # softmax: the clipping norm covers the classifier head too (old
    #   sentence-transformers fit); False clips the encoder only, as sentence-transformers' Trainer
    seed: int = 7  # head init, data order and dropout
    eval_batch_size: int | None = None  # None: batch_size
    eval_steps: int | None = None  # evaluate every N steps too (and at each epoch end and the end)
    # ---- scale ----
    param_sharding: str = "replicated"  # "replicated" (data parallel) | "fsdp"
    mesh_fsdp: int | None = None  # fsdp axis size; None: 1 (replicated) or all devices (fsdp)
    bf16: bool = False  # bfloat16 compute; params and optimizer state stay float32
    remat: bool = False  # rematerialise each layer in the backward pass
    scan_layers: bool = False  # the layers as one lax.scan (compile time independent of depth)
    windowed_einsum: bool = True  # TPU: XLA overlaps fsdp's weight all-gathers with the matmuls
    #   ("windowed einsum"), holding more activations; off trades that overlap for memory
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: known TPU/GPU peaks
    # ---- output, checkpoints ----
    output_dir: str = "./runs/siamese"
    save_every_steps: int = 0  # periodic checkpoint every N steps (0: end of epoch only)
    max_to_keep: int = 3  # periodic / epoch checkpoints kept in output_dir/checkpoints
    best_metric: str | None = None  # "accuracy" | "macro_f1" | "sts_spearman" (first STS file) |
    #   a retrieval metric, "ndcg@10" etc. (first --ir-dev folder); None: accuracy with dev_path
    #   (softmax), else sts_spearman with an STS file, else ndcg@10 with an --ir-dev, else the last
    resume: bool = False  # continue from the latest checkpoint in output_dir/checkpoints
    force: bool = False  # resume even if seed / data / loss / batch / lr differ from the checkpoint
    export: bool = True  # write best_model (sbert-flax) and best_model_pytorch at the end
    log_every_steps: int = 10  # metrics.jsonl / TensorBoard cadence
    nan_check_every: int = 10  # read the loss on the host every N steps to stop on NaN/inf
    progress_bar: bool = True  # tqdm on process 0

    def __post_init__(self) -> None:
        if self.sts_dev_path:  # fold the single-file field into the list (config.json round-trips)
            paths = (*self.sts_dev_paths, self.sts_dev_path)
            object.__setattr__(self, "sts_dev_paths", tuple(dict.fromkeys(paths)))
            object.__setattr__(self, "sts_dev_path", None)
        for name in ("sts_dev_paths", "ir_dev_paths"):  # a lone path from a config file
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        for name, allowed in CHOICES.items():
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise ValueError(f"{name}={v!r}; expected one of {' | '.join(allowed)}")
        if self.best_metric is not None and self.best_metric not in (*BEST_METRICS,
                                                                     *RETRIEVAL_BEST_METRICS):
            raise ValueError(f"best_metric={self.best_metric!r}; expected accuracy | macro_f1 | "
                             f"sts_spearman | a retrieval metric ({', '.join(RETRIEVAL_BEST_METRICS)})")
        if self.best_metric in RETRIEVAL_BEST_METRICS and not self.ir_dev_paths:
            raise ValueError(f"best_metric={self.best_metric} is a retrieval metric: it needs a "
                             "BEIR dev folder (--ir-dev DIR)")
        if self.best_metric == "sts_spearman" and not self.sts_dev_paths:
            raise ValueError("best_metric=sts_spearman needs an STS dev file (--sts-dev)")
        if self.best_metric in ("accuracy", "macro_f1") and not (
                self.loss in CLASSIFICATION_LOSSES and self.dev_path):
            raise ValueError(f"best_metric={self.best_metric} needs a classification loss "
                             f"({' | '.join(CLASSIFICATION_LOSSES)}) and --dev_path")
        if self.loss not in CLASSIFICATION_LOSSES and (self.dev_path or self.test_path):
            raise ValueError(f"dev_path / test_path are classification sets of the "
                             f"{' / '.join(CLASSIFICATION_LOSSES)} losses; with loss={self.loss} "
                             "evaluate with --sts-dev")
        if self.loss in CROSS_ENCODER_LOSSES:  # ---- cross-encoders (issue 25) ----
            self._check_cross_encoder()
        for name in ("epochs_num", "batch_size", "nan_check_every", "log_every_steps", "max_to_keep",
                     "data_threads"):
            if getattr(self, name) < (0 if name == "data_threads" else 1):
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_batch_size", "max_steps", "mini_batch_size", "eval_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name}={v} must be >= 1")
        if self.seq_length < 2:
            raise ValueError(f"seq_length={self.seq_length} must be >= 2")
        if self.save_every_steps < 0:
            raise ValueError(f"save_every_steps={self.save_every_steps} must be >= 0")
        if self.score_scale <= 0:
            raise ValueError(f"score_scale={self.score_scale} must be > 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops={self.peak_flops} must be > 0")
        if self.group_by_length and self.no_duplicates:
            raise ValueError("group_by_length and no_duplicates cannot be combined")

    @property
    def resolved_best_metric(self) -> str | None:
        """The dev metric that picks the best model (None: the last evaluation wins)."""
        if self.best_metric:
            return self.best_metric
        if self.loss in CLASSIFICATION_LOSSES and self.dev_path:
            return "accuracy"
        if self.sts_dev_paths:
            return "sts_spearman"
        return "ndcg@10" if self.ir_dev_paths else None

    def _check_cross_encoder(self) -> None:
        """What a cross-encoder run cannot take: the embedding losses' options, BEIR folders
        (a reranker needs a retriever: `sbert-flax eval --rerank-model`), and STS files with a
        multi-class head (no single score to correlate)."""
        for name in ("symmetric", "mini_batch_size", "matryoshka_dims", "pooling"):
            if getattr(self, name):
                raise ValueError(f"{name} is an option of the embedding losses; a cross-encoder "
                                 f"(loss={self.loss}) scores the pair's [CLS] through its pooler")
        if self.ir_dev_paths:
            raise ValueError(f"--ir-dev evaluates embeddings; a cross-encoder (loss={self.loss}) "
                             "is evaluated on BEIR folders with `sbert-flax eval --retrieval DIR "
                             "--model BI_ENCODER --rerank-model RUN/best_model`")
        if self.loss == "ce-softmax" and self.sts_dev_paths:
            raise ValueError("--sts-dev correlates one score per pair; the ce-softmax head gives "
                             "several (use --dev_path, or ce-bce for a score)")

    def resume_mismatches(self, saved: dict[str, Any], resolved: dict[str, Any] | None = None
                          ) -> list[str]:
        """`field: checkpoint value -> this value` for each refused field that differs.

        `resolved` overrides a field's value by what the run resolved it to (`pooling`: None ->
        the model folder's mode). A field the checkpoint did not record is taken as unchanged
        (RESUME_DEFAULTS aside); `resume_plan` lists those.
        """
        out = []
        for f in RESUME_FIELDS:
            now = (resolved or {}).get(f, getattr(self, f))
            was = _json_like(saved.get(f, RESUME_DEFAULTS.get(f, now)))
            if was != _json_like(now):
                out.append(f"{f}: {was!r} -> {now!r}")
        return out

    def resume_record(self, facts: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint records for a later resume: the refused fields (resolved by `facts`
        where it names them) and the facts."""
        return {**{f: _json_like(getattr(self, f)) for f in RESUME_FIELDS},
                **{k: _json_like(v) for k, v in facts.items()}}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # The config.json of a run from before the test hooks left TrainConfig lists them unset.
        d = {k: v for k, v in d.items() if not (k in RETIRED_FIELDS and v == RETIRED_FIELDS[k])}
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


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What resuming a checkpoint with this config would change, decided before anything is
    written: `refused` (the run would not be the one checkpointed) and `unrecorded` (what an
    older checkpoint did not record, so could not be checked)."""

    refused: tuple[str, ...]
    unrecorded: tuple[str, ...]


def resume_plan(cfg: TrainConfig, meta: dict[str, Any], facts: dict[str, Any],
                legacy: dict[str, Any] | None = None) -> ResumePlan:
    """Compares a checkpoint's meta with this run: every RESUME_REFUSED field and every fact.

    Args:
      cfg: this run's config.
      meta: the checkpoint's meta (`config`: what `resume_record` wrote; `total_steps`).
      facts: this run's derived values, keyed like RESUME_FACTS (`total_steps`, `model_sha256`,
        ...), plus resolved field values (`pooling`). A fact left out is not compared.
      legacy: the value a checkpoint that predates a fact implies for it (`length_buckets`: the
        first grid); a fact without one is reported unrecorded instead.
    """
    saved = {**meta.get("config", {}), "total_steps": meta.get("total_steps")}
    if saved["total_steps"] is None:
        del saved["total_steps"]
    refused = cfg.resume_mismatches(saved, resolved=facts)
    unrecorded = [f for f in RESUME_FIELDS if f not in saved and f not in RESUME_DEFAULTS]
    for k, now in facts.items():
        if k not in RESUME_FACTS:
            continue
        if k in saved or k in (legacy or {}):
            was = _json_like(saved.get(k, (legacy or {}).get(k)))
            label, why = RESUME_FACTS[k]
            if k in FINGERPRINT_FACTS:
                diff = fingerprint.change(was, now)
                if diff:
                    refused.append(f"{label}: {getattr(cfg, FINGERPRINT_FACTS[k])} changed since "
                                   f"the checkpoint: {diff} ({why})")
            elif was != _json_like(now):
                refused.append(f"{label}: {_short(was)} -> {_short(now)} ({why})")
        else:
            unrecorded.append(k)
    return ResumePlan(tuple(refused), tuple(unrecorded))


def _json_like(v: Any) -> Any:
    """Tuples as lists: a checkpoint's JSON meta gives back lists."""
    if isinstance(v, tuple | list):
        return [_json_like(x) for x in v]
    return v


def _short(v: Any) -> str:
    # A sha256 in full buries the message; 12 hex digits still tell two models apart.
    if isinstance(v, str) and len(v) == 64:
        return f"{v[:12]}..."
    return repr(tuple(v) if isinstance(v, list) else v)


def _coerce(value: Any, hint: Any) -> Any:
    """JSON lists -> tuples for tuple-typed fields; a comma string too (`columns=1,2,3`)."""
    if isinstance(value, list) and "tuple" in str(hint):
        return tuple(value)
    if isinstance(value, str) and "tuple" in str(hint):
        items = [x.strip() for x in value.split(",") if x.strip()]
        return tuple(int(x) if x.lstrip("-").isdigit() and "int" in str(hint) else x for x in items)
    return value
