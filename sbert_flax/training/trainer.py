"""`Trainer`: one fine-tuning run (softmax siamese, mnrl, cached-mnrl or cosent; or a cross-encoder,
ce-bce / ce-softmax / ce-listwise: `cross_encoder_*.py`), top to bottom.

    Trainer(cfg) -> data (validated first) -> model + loss -> mesh + data pipeline
                 -> resume plan (before config.json or a checkpoint is written) -> state layout
                 -> run(): step, log, check, evaluate (epoch ends, every --eval_steps, the end),
                    checkpoint -> best (across every evaluation) + export

The host never waits on the device inside a step: metrics stay on the device until they are
logged; NaN/inf and preemption are checked every `nan_check_every` steps (and before any save),
and a NaN is reported at the first step that produced it. A SIGTERM saves at the next check and
returns; a checkpoint holds the state, the grain iterator state and the run's meta, so `--resume`
continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sbert_flax.checkpoints.pretrained import load_pretrained, model_sha256, vocab_sha256
from sbert_flax.common import sharding
from sbert_flax.common.files import write_json
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.retrieval import ir_evaluation as retrieval
from sbert_flax.training import build, data, fingerprint, flops, optim
from sbert_flax.training import cross_encoder_start as ce_start
from sbert_flax.training.cross_encoder_batches import PairBatchBuilder
from sbert_flax.training.cross_encoder_eval import CrossEncoderEvaluator
from sbert_flax.training.cross_encoder_losses import make_cross_encoder_loss
from sbert_flax.training.dev_eval import Evaluator
from sbert_flax.training.reporting import MetricsWriter, log, progress, setup_logging
from sbert_flax.training.run_checkpoints import RunCheckpoints, checkpoint_steps, read_meta
from sbert_flax.training.state import create_train_state
from sbert_flax.training.step import TraceCounter, make_train_step
from sbert_flax.training.train_config import (
    CLASSIFICATION_LOSSES,
    CROSS_ENCODER_LOSSES,
    TrainConfig,
    resume_plan,
)


class TrainingDiverged(RuntimeError):
    """The loss (or the gradients / params) became NaN or inf; the message names the step."""


class ResumeMismatch(ValueError):
    """`--resume` with settings that differ from the checkpoint's; the message names them."""


class _Preemption:
    """SIGTERM -> a flag the loop polls; the previous handler is restored on exit."""

    def __init__(self) -> None:
        self.flag = False
        self._old = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        # Every process must stop at the same step: agree on "any process got SIGTERM".
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))


def _open(path: str, cfg: TrainConfig, schema: data.Schema, num_labels: int | None = None,
          hash_texts: bool = False) -> data.TextSource:
    names = {n: i for i, n in enumerate(cfg.label_names)} if cfg.label_names else None
    src = data.open_source(path, schema, data_format=cfg.data_format, has_header=cfg.has_header,
                           columns=cfg.columns, skip_bad_lines=cfg.skip_bad_lines, label_names=names,
                           num_labels=num_labels, score_scale=cfg.score_scale, hash_texts=hash_texts)
    if src.skipped_lines:
        log.warning("%s", src.skipped_summary())
    return src


class Trainer:
    """Everything a run holds: config, data, model, loss, mesh, state, evaluator, checkpoints.

    Construction validates and loads (data first, so malformed lines stop the run before anything
    heavy; then the model and the data pipeline; then the resume plan, before `config.json` or a
    checkpoint is written); `run()` trains.

    Raises (from the constructor):
      data.DataError: malformed data (file:line).
      FileExistsError: `output_dir` has checkpoints and `resume` is off.
      ResumeMismatch: `resume` with a RESUME_REFUSED field, the model, the vocab or the step
        count changed (without `force`).
    """

    def __init__(self, cfg: TrainConfig, devices: Sequence[jax.Device] | None = None):
        self.cfg = cfg
        # The mesh's devices: default every device of every process. A subset (one device of a
        # multi-device host, say) trains the same run on fewer chips; the global batch is unchanged.
        self.devices = list(devices) if devices is not None else jax.devices()
        self.is_main = jax.process_index() == 0
        os.makedirs(cfg.output_dir, exist_ok=True)
        setup_logging(cfg.output_dir, self.is_main)

        # ---- data: every file validated before anything heavy ----
        schema = data.schema_for(cfg.loss)
        self.train_src = _open(cfg.train_path, cfg, schema, cfg.labels_num,
                               hash_texts=cfg.no_duplicates)
        self.dev_src = _open(cfg.dev_path, cfg, schema, cfg.labels_num) if cfg.dev_path else None
        self.num_labels = None
        if cfg.loss in CLASSIFICATION_LOSSES:
            self.num_labels = cfg.labels_num or max(self.train_src.num_labels,
                                                    self.dev_src.num_labels if self.dev_src else 0)
        for p in cfg.sts_dev_paths:
            if not os.path.isfile(p):
                raise data.DataError(f"{p}: STS dev file not found")
        # Read and validated now (file:line errors), so a bad folder stops before any training.
        self.ir_folders = [retrieval.load_dev_beir(p, cfg.ir_dev_split) for p in cfg.ir_dev_paths]
        names = [f.name for f in self.ir_folders]  # the keys of the dev records' "retrieval"
        if len(set(names)) < len(names):
            raise data.DataError(f"--ir-dev folders {list(cfg.ir_dev_paths)} share a folder name; "
                                 "their metrics are recorded by name: rename one")

        # ---- is there a run to continue? (read only) ----
        steps = checkpoint_steps(cfg.output_dir)
        if steps and not cfg.resume:
            raise FileExistsError(f"{cfg.output_dir} already has checkpoints; pass --resume to "
                                  "continue that run or choose another --output_dir")
        self.resume_meta = read_meta(cfg.output_dir) if (cfg.resume and steps) else None

        # ---- model and loss ----
        self.cross_encoder = None  # cross-encoders (issue 25): backbone + pooler + classifier
        if cfg.loss in CROSS_ENCODER_LOSSES:
            head = make_cross_encoder_loss(cfg.loss, self.num_labels).num_labels  # labels first
            self.cross_encoder = ce_start.load_start(cfg, head)
            self.pre = self.cross_encoder.pre
        else:
            self.pre = load_pretrained(cfg.pretrained_model_path, vocab_path=cfg.vocab_path,
                                       config_path=cfg.config_path, pooling=cfg.pooling,
                                       seq_length=cfg.seq_length,
                                       default_pooling="cls" if cfg.loss == "softmax" else None)
        model, pooling, self.loss, self.mdef = build.model_and_loss(
            cfg, self.pre.config, self.pre.pooling_config, self.num_labels)
        self.pre = dataclasses.replace(self.pre, config=model)
        self.pooling = pooling
        want = self.loss.text_columns(tuple(c for c in self.train_src.columns
                                            if c.startswith("negative")))
        if tuple(self.train_src.columns) != tuple(want):
            raise data.DataError(f"{cfg.train_path}: has columns {self.train_src.columns}, the "
                                 f"{cfg.loss} loss reads {want}")

        # ---- mesh, data pipeline, optimizer, state layout ----
        n_dev = len(self.devices)
        build.check_batch_sizes(cfg, n_dev)
        self.mesh = build.mesh(cfg, self.devices)
        self.pipeline = data.TrainPipeline(self.train_src, self.pre.tokenizer, data.PipelineConfig(
            global_batch=cfg.batch_size, seq_length=cfg.seq_length, seed=cfg.seed,
            epochs=cfg.epochs_num, max_steps=cfg.max_steps, group_by_length=cfg.group_by_length,
            no_duplicates=cfg.no_duplicates, joint_length=self.loss.joint_length,
            pack=cfg.pack, row_multiple=n_dev,
            pack_groups=cfg.batch_size // cfg.mini_batch_size if cfg.mini_batch_size else 1,
            process_index=jax.process_index(),
            process_count=jax.process_count(), num_threads=cfg.data_threads),
            builder=PairBatchBuilder if self.cross_encoder else None)  # pairs: cross-encoders
        self.total_steps = self.pipeline.total_steps

        # ---- the resume plan: every check before config.json or a checkpoint is written ----
        self.facts = self._resume_facts()
        self.dev_data = self._dev_data()
        if self.resume_meta is not None:
            self._check_resume(self.resume_meta, self.facts)
        if self.is_main:
            write_json(os.path.join(cfg.output_dir, "config.json"), cfg.to_dict())
        start = self.resume_meta or {}
        self.ckpts = RunCheckpoints(cfg.output_dir, cfg.max_to_keep,
                                    start_step=int(start.get("step", 0)),
                                    start_best=(start.get("best") or {}).get("step"))

        self.tx, self.layout = build.optimizer_and_layout(cfg, self.mdef, self.mesh,
                                                          self.total_steps)
        self.lr_at = optim.warmup_linear_schedule(cfg.learning_rate, self.total_steps, cfg.warmup)
        self.counter = TraceCounter()
        self.train_step = make_train_step(self.mdef.graphdef, self.loss, self.tx, self.layout,
                                          seed=cfg.seed, windowed_einsum=cfg.windowed_einsum,
                                          counter=self.counter)
        if self.cross_encoder:  # scores pairs instead of embedding sentences
            self.evaluator = CrossEncoderEvaluator(
                self.mdef.graphdef, self.layout, self.pre.tokenizer, seq_length=cfg.seq_length,
                batch_size=cfg.eval_batch_size or cfg.batch_size,
                num_logits=self.loss.num_labels, sts_paths=cfg.sts_dev_paths)
        else:
            self.evaluator = Evaluator(self.mdef.graphdef, self.layout, self.pre.tokenizer,
                                       seq_length=cfg.seq_length,
                                       batch_size=cfg.eval_batch_size or cfg.batch_size,
                                       sts_paths=cfg.sts_dev_paths, classify=cfg.loss == "softmax")
        self.peak_flops = cfg.peak_flops or flops.known_peak_flops(
            [d.device_kind for d in self.devices])
        log.info("train %d examples (%s, columns %s), loss %s, pooling %s, %d steps (%s per epoch)",
                 len(self.train_src), cfg.train_path, ",".join(self.train_src.columns), cfg.loss,
                 pooling.mode, self.total_steps, "/".join(map(str, self.pipeline.steps_per_epoch)))

    # ---- setup helpers ----------------------------------------------------------------------

    def _resume_facts(self) -> dict[str, Any]:
        """This run's derived values the resume plan compares (and each checkpoint records): the
        resolved pooling, the model, vocab and training file by content, the step count, the
        head's classes and, for length-grouped batches, the bucket grid."""
        facts: dict[str, Any] = {"pooling": self.pooling.mode,
                                 "model_sha256": model_sha256(self.pre.config, self.pre.params),
                                 "vocab_sha256": vocab_sha256(self.pre.tokenizer),
                                 "total_steps": self.total_steps,
                                 "train_data": fingerprint.file_fingerprint(self.cfg.train_path)}
        if self.num_labels is not None:
            facts["num_labels"] = self.num_labels
        if self.cfg.group_by_length:  # which records share a batch depends on the length buckets
            facts["length_buckets"] = list(data.TRAIN_BUCKETS)
        return facts

    def _dev_data(self) -> dict[str, Any] | None:
        """The best metric and the fingerprints of the dev files it reads (each checkpoint records
        them): a resume on other content at those paths starts the best over. None without a
        best metric (the latest evaluation is the best)."""
        metric = self.cfg.resolved_best_metric
        if metric is None:
            return None
        if metric in ("accuracy", "macro_f1"):
            paths = [self.cfg.dev_path]
        elif metric == "sts_spearman":
            paths = [self.cfg.sts_dev_paths[0]]
        else:  # a retrieval metric: the first BEIR folder, the files `retrieval.load_beir` reads
            f = self.ir_folders[0]
            paths = [f.corpus_path, os.path.join(f.path, "queries.jsonl"),
                     os.path.join(f.path, "qrels", f"{f.split}.tsv")]
        return {"metric": metric, "paths": paths, "files": fingerprint.files_fingerprint(paths)}

    def _carried_best(self, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The resumed checkpoint's best, or None where it no longer stands (logged): its params
        are not in best/ (a checkpoint of an older sbert-flax, whose best/ kept only the newest
        step), or the dev data behind its value changed (a value measured on other data is no bar
        for the new scores). A changed best metric is started over by `_evaluate`."""
        best = meta.get("best")
        if best is None:
            return None
        step = int(best["step"])
        if step not in self.ckpts.best_steps():
            log.warning("the checkpoint's best (step %d) has no params in %s (it holds steps %s): "
                        "the best starts over at the next evaluation", step,
                        os.path.join(self.cfg.output_dir, "best"), self.ckpts.best_steps())
            return None
        was, now = meta.get("dev_data"), self.dev_data
        if now is None or best.get("metric") != now["metric"]:
            return best
        if was is None:
            log.warning("resuming a checkpoint that did not record its dev data: the best so far "
                        "(%s %s at step %d) is kept; make sure %s is the data it was measured on",
                        best["metric"], best["value"], step, ", ".join(now["paths"]))
            return best
        diff = fingerprint.files_change(was["files"], now["files"])
        if not diff:
            return best
        log.warning("the dev data of %s changed since the checkpoint (%s: %s): the best so far "
                    "(%s at step %d) was measured on other data; the best starts over at the next "
                    "evaluation", now["metric"], ", ".join(now["paths"]), diff, best["value"], step)
        return None

    def _check_resume(self, meta: dict[str, Any], facts: dict[str, Any] | None = None) -> None:
        """Refuses (ResumeMismatch) or, with --force, warns about what the resume would change.

        `facts`: `_resume_facts()`; None compares the config fields (and the bucket grid) alone.
        """
        facts = dict(facts or {})
        if self.cfg.group_by_length:
            facts.setdefault("length_buckets", list(data.TRAIN_BUCKETS))
        # A checkpoint that does not record its grid was trained on the first one.
        plan = resume_plan(self.cfg, meta, facts,
                           legacy={"length_buckets": list(data.FIRST_TRAIN_BUCKETS)})
        if plan.refused and not self.cfg.force:
            raise ResumeMismatch(
                f"cannot resume {self.cfg.output_dir}: the checkpoint was trained with other "
                f"settings ({'; '.join(plan.refused)}). Use the checkpoint's values, another "
                "--output_dir, or --force to continue anyway")
        if plan.refused:
            log.warning("--force: resuming although %s", "; ".join(plan.refused))
        if plan.unrecorded:
            log.warning("resuming a checkpoint from an older sbert-flax that did not record %s: "
                        "those are not checked; make sure they are the run's", ", ".join(plan.unrecorded))

    def _meta(self, step: int, epochs_done: int) -> dict[str, Any]:
        return {"step": step, "epoch": epochs_done, "best": self.best, "history": self.history,
                "dev_data": self.dev_data, "total_steps": self.total_steps,
                "steps_per_epoch": list(self.pipeline.steps_per_epoch),
                "config": {**self.cfg.resume_record(self.facts),
                           "length_buckets": list(data.TRAIN_BUCKETS)}}

    def _initial_state(self):
        meta = self.resume_meta
        if meta is None:
            if self.cfg.resume:
                log.warning("--resume: no checkpoint in %s; starting from scratch", self.cfg.output_dir)
            host = self.loss.initial_params(self.pre.params, self.pre.config, self.cfg.seed)
            return create_train_state(host, self.tx, self.layout), None, 0
        args, holder = self.pipeline.restore_item()
        state, meta = self.ckpts.restore(self.layout, args)
        self.best, self.history = self._carried_best(meta), list(meta.get("history", []))
        log.info("resumed from step %d (epoch %d done)", meta["step"], meta["epoch"])
        return state, holder.state, int(meta["epoch"])

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Trains to the end (or a SIGTERM); returns a summary (also `output_dir/results.json`).

        Raises:
          TrainingDiverged: NaN/inf; the last checkpoint on disk is the last good one.
        """
        cfg = self.cfg
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        state, data_state, epochs_done = self._initial_state()
        step = int(jax.device_get(state.step))
        writer = MetricsWriter(cfg.output_dir, self.is_main,
                               resume_step=step if self.resume_meta is not None else None)
        it = self.pipeline.iterator(data_state)
        bar = progress(self.total_steps, step, "train", self.is_main and cfg.progress_bar)
        pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked
        window = _Window(step)
        summary: dict[str, Any] = {"preempted": False}
        try:
            with _Preemption() as preempt:
                while step < self.total_steps:
                    epoch, _ = self.pipeline.plan.locate(step)
                    local = next(it)
                    state, m = self.train_step(state, sharding.put_batch(local, self.mesh))
                    step += 1
                    pending.append((step, m))
                    window.add(local, jax.process_count())
                    bar.update(1)
                    epoch_end = step == int(np.sum(self.pipeline.steps_per_epoch[: epoch + 1]))
                    run_end = step == self.total_steps
                    save_due = bool(cfg.save_every_steps) and step % cfg.save_every_steps == 0
                    if step % cfg.log_every_steps == 0:
                        self._log(writer, bar, step, epoch, m, window)
                    stop = False
                    if step % cfg.nan_check_every == 0 or save_due or epoch_end or run_end:
                        self._check_finite(pending)
                        pending.clear()
                        stop = preempt.requested()
                    # One evaluation per step, whichever reasons coincide (an epoch end that is
                    # also a multiple of eval_steps).
                    eval_due = bool(cfg.eval_steps) and step % cfg.eval_steps == 0
                    if epoch_end or run_end:  # evaluated before any stop: a resume skips it
                        epochs_done = epoch + 1 if epoch_end else epochs_done
                        self._evaluate(state, step, epoch + 1, writer)
                        self._save(state, step, epochs_done, it)
                    else:
                        if eval_due:
                            self._evaluate(state, step, epoch + 1, writer)
                        if save_due or stop:
                            self._save(state, step, epochs_done, it)
                    if stop and not run_end:
                        self.ckpts.wait()
                        log.warning("SIGTERM: saved checkpoint at step %d in %s; exiting. "
                                    "Continue with --resume.", step,
                                    os.path.join(cfg.output_dir, "checkpoints"))
                        summary.update(preempted=True, step=step)
                        return summary
                bar.close()
                summary.update(self._finish(state, step))
                summary["params"] = state.params  # the final global arrays (for callers / tests)
                summary["train_step_traces"] = self.counter.count
                summary["eval_step_traces"] = self.evaluator.counter.count
                return summary
        finally:
            self.ckpts.wait()
            self.ckpts.close()
            writer.close()
            it.close()

    def _log(self, writer: MetricsWriter, bar, step: int, epoch: int, m: dict, window: _Window) -> None:
        host = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
        rates = window.rates(step)
        rec = {**host, "lr": float(self.lr_at(step - 1)), "epoch": epoch + 1,
               "sentences_per_s": rates["sentences"], "tokens_per_s": rates["tokens"]}
        seq = rates["seq_len"]
        if seq:
            flops_s = flops.train_flops_per_token(self.pre.config, seq) * rates["tokens"]
            rec["train_tflops_per_s"] = flops_s / 1e12
            u = flops.mfu(flops_s, self.peak_flops, len(self.devices))
            if u is not None:
                rec["mfu"] = u
        writer.write("train", step, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                        sent_s=f"{rec['sentences_per_s']:.0f}")

    def _check_finite(self, pending: list[tuple[int, dict]]) -> None:
        if not pending:
            return
        flags = jax.device_get([m["finite"] for _, m in pending])
        bad = [i for i, f in enumerate(flags) if not bool(f)]
        if not bad:
            return
        step, m = pending[bad[0]]
        host = jax.device_get(m)
        self.ckpts.wait()
        last = self.ckpts.latest_step()
        raise TrainingDiverged(
            f"loss is {float(host['loss'])} (grad norm {float(host['grad_norm'])}) at step {step}: "
            f"training stopped. The last good checkpoint is "
            f"{'step ' + str(last) if last is not None else 'none'} in "
            f"{os.path.join(self.cfg.output_dir, 'checkpoints')}; lower --learning_rate or check "
            "the data")

    def _save(self, state, step: int, epochs_done: int, it) -> None:
        self.ckpts.save(state, self._meta(step, epochs_done), self.pipeline.checkpoint_item(it))

    def _evaluate(self, state, step: int, epoch: int, writer: MetricsWriter) -> None:
        res: dict[str, Any] = {"epoch": epoch, "step": step,
                               **self.evaluator.evaluate(state.params, self.dev_src, self.num_labels,
                                                         f"epoch {epoch}, step {step}")}
        if self.ir_folders:
            res["retrieval"] = self._retrieval(state.params)
        writer.write("dev", step, res)
        self.history.append(res)
        metric = self.cfg.resolved_best_metric
        value = res.get(metric) if metric else None
        if value is None and metric and self.ir_folders:  # a retrieval metric: the first folder's
            value = res["retrieval"][self.ir_folders[0].name].get(metric)
        # Without dev data the latest evaluation counts as the best.
        # A metric other than the best's (best_metric changed on resume) starts the best over:
        # two metrics' values do not compare.
        if (value is None or self.best is None or self.best.get("metric") != metric
                or value > self.best["value"]):
            self.best = {"metric": metric, "value": value, "epoch": epoch, "step": step}
            self.ckpts.save_best(state.params, {"step": step, "best": self.best})
            if value is not None:
                log.info("new best %s %.4f at step %d", metric, value, step)

    def _encoder(self, params) -> SentenceEncoder:
        """A one-device encoder over the host copy of `params` (what export and retrieval read)."""
        host = sharding.host_tree(params, self.mesh)  # collective: every process takes part
        return SentenceEncoder.from_parts(self.pre.config, host["embedder"]["backbone"],
                                          self.pre.tokenizer, self.pooling, self.cfg.seq_length,
                                          devices=jax.local_devices()[:1],
                                          prompts=self.pre.prompts)

    def _retrieval(self, params) -> dict[str, dict[str, float]]:
        """{folder name: metrics} of the --ir-dev folders on `params`.

        Every process computes them (on its first local device): the best-model choice they feed
        must be the same everywhere, since saving the best checkpoint is collective.
        """
        enc = self._encoder(params)
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        out: dict[str, dict[str, float]] = {}
        for f in self.ir_folders:
            m = retrieval.evaluate_retrieval(enc, f, batch_size=bs)
            out[f.name] = m
            log.info("retrieval %s: ndcg@10 %.4f, mrr@10 %.4f, recall@10 %.4f", f.name,
                     m["ndcg@10"], m["mrr@10"], m["recall@10"])
        return out

    def _finish(self, state, step: int) -> dict[str, Any]:
        cfg = self.cfg
        self.ckpts.wait()
        # The params of the best this run records, checked by step (never best/'s newest alone).
        params = (self.ckpts.restore_best(self.layout, int(self.best["step"]))[0]
                  if self.best is not None else state.params)
        out: dict[str, Any] = {"step": step, "best": self.best, "history": self.history}
        if cfg.test_path:
            test = _open(cfg.test_path, cfg, data.schema_for(cfg.loss), self.num_labels)
            out["test"] = self.evaluator.report(params, test, self.num_labels, "test (best model)")
        if cfg.export and self.cross_encoder:  # one folder: sentence-transformers' CrossEncoder
            host = sharding.host_tree(params, self.mesh)  # collective: every process takes part
            if self.is_main:
                ce_start.export(os.path.join(cfg.output_dir, "best_model"), self.cross_encoder,
                                host, cfg.seq_length, cfg.label_names)
                log.info("exported the best cross-encoder to %s/best_model", cfg.output_dir)
        elif cfg.export:
            enc = self._encoder(params)
            if self.is_main:
                enc.save(os.path.join(cfg.output_dir, "best_model"), overwrite=True)
                enc.export_pytorch(os.path.join(cfg.output_dir, "best_model_pytorch"), overwrite=True)
                log.info("exported the best model to %s/best_model and best_model_pytorch",
                         cfg.output_dir)
        if self.is_main:
            write_json(os.path.join(cfg.output_dir, "results.json"), out)
        return out


class _Window:
    """Host-side throughput since the last log: sentences and real tokens from the batches'
    weights and masks (numpy, no device sync), over wall time."""

    def __init__(self, step: int):
        self.t0, self.step0 = time.perf_counter(), step
        self.sentences = self.tokens = self.padded = 0.0
        self.rows = 0

    def add(self, local: data.Batch, process_count: int) -> None:
        w = float(np.sum(local["weights"])) * process_count
        packed = local.get("packed_segments")
        if packed is not None:  # packed rows: every text's attention spans its whole row
            widths = [packed.shape[1] for k in local if k.endswith("_row")]
            tokens = float(np.sum(packed > 0))
        else:
            masks = [v for k, v in local.items() if k.endswith("_mask")]
            widths = [m.shape[1] for m in masks]
            tokens = float(sum(np.sum(m) for m in masks))
        self.sentences += w * len(widths)
        self.tokens += tokens * process_count
        self.padded += w * sum(widths)
        self.rows += int(w) * len(widths)

    def rates(self, step: int) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"sentences": self.sentences / dt, "tokens": self.tokens / dt,
               "seq_len": self.padded / self.rows if self.rows else 0.0}
        self.__init__(step)
        return out


def train_and_evaluate(cfg: TrainConfig, devices: Sequence[jax.Device] | None = None
                       ) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run: `Trainer(cfg, devices).run()`.

    `devices` (default: all devices of all processes) are the mesh's devices.

    Raises:
      data.DataError: malformed data (file:line), before any training.
      TrainingDiverged: NaN/inf loss; the last checkpoint on disk is the last good one.
      FileExistsError: `output_dir` has checkpoints and `resume` is off.
      ResumeMismatch: `resume` with settings that differ from the checkpoint's (no `force`).
    """
    return Trainer(cfg, devices).run()
