"""`train_and_evaluate`: the siamese fine-tuning loop (UER-py's run_classifier_siamese.py recipe).

Per epoch: reshuffled bucketed batches (one compiled step per bucket), dev evaluation (accuracy,
per-label P/R/F1, optional STS Spearman), best-by-dev checkpoint, end-of-epoch checkpoint. A
SIGTERM saves at the next step boundary and returns; a NaN/inf stops with `TrainingDiverged`
before anything is saved. At the end the best params are evaluated on the test set and exported.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax import sharding
from sbert_flax.config import PoolingConfig
from sbert_flax.encoder import SentenceEncoder
from sbert_flax.files import write_json
from sbert_flax.training import data, metrics, optim, siamese
from sbert_flax.training.checkpointing import RunCheckpoints
from sbert_flax.training.pretrained import Pretrained, load_pretrained
from sbert_flax.training.reporting import MetricsWriter, log, progress, setup_logging
from sbert_flax.training.state import StateLayout, create_train_state, state_layout
from sbert_flax.training.step import TraceCounter, make_eval_step, make_train_step
from sbert_flax.training.train_config import TrainConfig


class TrainingDiverged(RuntimeError):
    """The loss (or the gradients / params) became NaN or inf; the message names the step."""


class _Preemption:
    """SIGTERM -> a flag read at step boundaries (the handler itself does no work)."""

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


def _read(path: str, cfg: TrainConfig, num_labels: int | None = None) -> data.PairData:
    names = {n: i for i, n in enumerate(cfg.label_names)} if cfg.label_names else None
    d = data.read_pair_tsv(path, skip_bad_lines=cfg.skip_bad_lines, label_names=names,
                           num_labels=num_labels, columns=cfg.columns, has_header=cfg.has_header)
    if d.skipped_lines:
        log.warning("%s: skipped %d malformed line(s), first: %s", path, len(d.skipped_lines),
                    ", ".join(str(n) for n in d.skipped_lines[:5]))
    return d


class Evaluator:
    """Dev/test classification metrics and STS Spearman for the current params."""

    def __init__(self, cfg: TrainConfig, pre: Pretrained, mdef: siamese.ModelDef, layout: StateLayout,
                 num_labels: int):
        self.cfg, self.pre, self.layout, self.num_labels = cfg, pre, layout, num_labels
        self.counter = TraceCounter()
        self.step = make_eval_step(mdef.graphdef, layout, self.counter)
        self.batch = cfg.eval_batch_size or cfg.batch_size
        self._encoder: SentenceEncoder | None = None

    def classify(self, params: Any, pairs: data.TokenizedPairs) -> np.ndarray:
        preds = np.full(len(pairs), -1, np.int64)
        for b in data.eval_batches(pairs, global_batch=self.batch, seq_length=self.cfg.seq_length,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()):
            out = self.step(params, sharding.put_batch(b, self.layout.mesh))
            idx, logits = np.asarray(out["index"]), np.asarray(out["logits"])
            keep = idx >= 0
            preds[idx[keep]] = np.argmax(logits[keep], axis=-1)
        return preds

    def report(self, params: Any, pairs: data.TokenizedPairs, name: str) -> dict[str, Any]:
        preds = self.classify(params, pairs)
        prf = metrics.per_label_prf(preds, pairs.labels, self.num_labels)
        log.info("%s:\n%s", name, metrics.format_report(preds, pairs.labels, self.num_labels))
        out: dict[str, Any] = {"accuracy": metrics.accuracy(preds, pairs.labels),
                               "macro_f1": float(prf["macro_f1"])}
        for i in range(self.num_labels):
            out[f"f1_{i}"] = float(prf["f1"][i])
            out[f"precision_{i}"] = float(prf["precision"][i])
            out[f"recall_{i}"] = float(prf["recall"][i])
        return out

    def encoder(self, params: Any) -> SentenceEncoder:
        """A SentenceEncoder holding the backbone of `params` (host copy; collective)."""
        backbone = sharding.host_tree(params, self.layout.mesh)["backbone"]
        if self._encoder is None:
            self._encoder = SentenceEncoder.from_parts(self.pre.config, backbone, self.pre.tokenizer,
                                            PoolingConfig(self.pre.pooling), self.cfg.seq_length)
        else:  # reuse its compiled functions; only the weights change
            enc = self._encoder
            state = jax.tree.map(lambda x: x, enc.params)
            nnx.replace_by_pure_dict(state, {"backbone": backbone})
            enc.params = jax.device_put(state, NamedSharding(enc.mesh, P()))
        return self._encoder

    def sts(self, params: Any) -> float:
        from sbert_flax.evaluation import evaluate_sts

        res = evaluate_sts(self.encoder(params), self.cfg.sts_dev_path, batch_size=self.batch)
        return float(res["spearman"])


def train_and_evaluate(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run; returns a summary (also `output_dir/results.json`).

    Raises:
      data.DataError: malformed data (file:line), before any training.
      TrainingDiverged: NaN/inf loss; the last checkpoint on disk is the last good one.
      FileExistsError: `output_dir` has checkpoints and `resume` is off.
    """
    is_main = jax.process_index() == 0
    os.makedirs(cfg.output_dir, exist_ok=True)
    setup_logging(cfg.output_dir, is_main)
    if is_main:
        write_json(os.path.join(cfg.output_dir, "config.json"), cfg.to_dict())

    # ---- data (fails on malformed lines before anything heavy) ----
    train_raw = _read(cfg.train_path, cfg, cfg.labels_num)
    dev_raw = _read(cfg.dev_path, cfg, cfg.labels_num) if cfg.dev_path else None
    num_labels = cfg.labels_num or max(train_raw.num_labels, dev_raw.num_labels if dev_raw else 0)
    pre = load_pretrained(cfg.pretrained_model_path, vocab_path=cfg.vocab_path,
                          config_path=cfg.config_path, pooling=cfg.pooling, seq_length=cfg.seq_length)
    train = data.tokenize_pairs(train_raw, pre.tokenizer, cfg.seq_length)
    dev = data.tokenize_pairs(dev_raw, pre.tokenizer, cfg.seq_length) if dev_raw else None
    log.info("train %d pairs (%s), dev %s, %d labels, pooling %s", len(train), cfg.train_path,
             len(dev) if dev else "-", num_labels, pre.pooling)

    # ---- mesh, optimizer, state ----
    n_dev = jax.device_count()
    fsdp = cfg.mesh_fsdp or (n_dev if cfg.param_sharding == "fsdp" else 1)
    mesh = sharding.make_mesh(-1, fsdp)
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the {n_dev} devices")
    spe = data.steps_per_epoch(train, cfg.batch_size, cfg.seq_length)
    total = spe * cfg.epochs_num
    mdef = siamese.model_def(pre.config, num_labels, pre.pooling,
                             jnp.bfloat16 if cfg.bf16 else jnp.float32)
    tx = optim.make_optimizer(cfg.learning_rate, total, warmup_ratio=cfg.warmup,
                              weight_decay=cfg.weight_decay, uer_adamw=cfg.uer_adamw,
                              params_for_mask=mdef.abstract_params, max_grad_norm=cfg.max_grad_norm)
    lr_at = optim.warmup_linear_schedule(cfg.learning_rate, total, cfg.warmup)
    layout = state_layout(mdef, tx, mesh, sharding.rules_for(cfg.param_sharding))
    ckpts = RunCheckpoints(cfg.output_dir, cfg.max_to_keep)
    meta: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "history": [],
                            "steps_per_epoch": spe, "total_steps": total}
    if ckpts.latest_step() is not None and not cfg.resume:
        raise FileExistsError(f"{cfg.output_dir} already has checkpoints; pass --resume to continue "
                              "that run or choose another --output_dir")
    if cfg.resume and ckpts.latest_step() is not None:
        state, meta = ckpts.restore(layout)
        if (meta["steps_per_epoch"], meta["total_steps"]) != (spe, total):
            raise ValueError(f"cannot resume: the checkpoint has {meta['steps_per_epoch']} steps/epoch and "
                             f"{meta['total_steps']} in all, this config {spe} and {total} (data, "
                             "batch size or epochs changed)")
        log.info("resumed from step %d (epoch %d, batch %d)", meta["step"], meta["epoch"], meta["batch"])
    else:
        if cfg.resume:
            log.warning("--resume: no checkpoint in %s; starting from scratch", cfg.output_dir)
        host = siamese.initial_params(pre.params, pre.config, num_labels, cfg.seed)
        state = create_train_state(host, tx, layout)
    log.info("mesh %s, params %s, %d steps/epoch x %d epochs, global batch %d",
             dict(mesh.shape), cfg.param_sharding, spe, cfg.epochs_num, cfg.batch_size)

    counter = TraceCounter()
    train_step = make_train_step(mdef.graphdef, tx, layout, seed=cfg.seed,
                                 debug_nan_at_step=cfg.debug_nan_at_step, counter=counter)
    evaluator = Evaluator(cfg, pre, mdef, layout, num_labels)
    writer = MetricsWriter(cfg.output_dir, is_main)
    summary: dict[str, Any] = {"preempted": False}

    def position(epoch: int, batch: int) -> dict[str, Any]:
        return {**meta, "step": int(meta["step"]), "epoch": epoch, "batch": batch}

    def check(m: dict, step: int, epoch: int, batch: int) -> dict:
        host_m = jax.device_get(m)
        if not bool(host_m["finite"]):
            ckpts.wait()
            last = ckpts.latest_step()
            raise TrainingDiverged(
                f"loss is {float(host_m['loss'])} (grad norm {float(host_m['grad_norm'])}) at step "
                f"{step} (epoch {epoch + 1}, batch {batch}): training stopped. The last good "
                f"checkpoint is {'step ' + str(last) if last is not None else 'none'} in "
                f"{os.path.join(cfg.output_dir, 'checkpoints')}; lower --learning_rate or check the data")
        return host_m

    try:
        with _Preemption() as preempt:
            for epoch in range(meta["epoch"], cfg.epochs_num):
                batches = data.epoch_batches(train, global_batch=cfg.batch_size,
                                             seq_length=cfg.seq_length, seed=cfg.seed, epoch=epoch,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
                start = meta["batch"] if epoch == meta["epoch"] else 0
                bar = progress(spe, start, f"epoch {epoch + 1}/{cfg.epochs_num}",
                               is_main and cfg.progress_bar)
                t0, sents, m = time.perf_counter(), 0.0, None
                for i, local in enumerate(data.skip_batches(batches, start), start=start):
                    state, m = train_step(state, sharding.put_batch(local, mesh))
                    meta["step"] += 1
                    step = meta["step"]
                    sents += 2.0 * float(np.sum(local["weights"])) * jax.process_count()
                    save_due = cfg.save_every_steps and step % cfg.save_every_steps == 0 and i + 1 < spe
                    if step % cfg.nan_check_every == 0 or save_due or step % cfg.log_every_steps == 0:
                        hm = check(m, step, epoch, i + 1)
                        rate = sents / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{float(hm['loss']):.4f}", lr=f"{float(lr_at(step - 1)):.2e}",
                                        sent_s=f"{rate:.0f}")
                        if step % cfg.log_every_steps == 0:
                            writer.write("train", step, {"loss": float(hm["loss"]),
                                                         "accuracy": float(hm["accuracy"]),
                                                         "grad_norm": float(hm["grad_norm"]),
                                                         "lr": float(lr_at(step - 1)),
                                                         "sentences_per_s": rate, "epoch": epoch + 1})
                    bar.update(1)
                    if save_due:
                        ckpts.save(state, position(epoch, i + 1))
                    if cfg.debug_step_delay:
                        time.sleep(cfg.debug_step_delay)
                    if preempt.requested():
                        check(m, step, epoch, i + 1)
                        ckpts.save(state, position(epoch, i + 1))
                        ckpts.wait()
                        bar.close()
                        log.warning("SIGTERM: saved checkpoint at step %d (epoch %d, batch %d/%d) in %s; "
                                    "exiting. Continue with --resume.", step, epoch + 1, i + 1, spe,
                                    os.path.join(cfg.output_dir, "checkpoints"))
                        summary.update(preempted=True, step=step)
                        return summary
                bar.close()
                if m is not None:  # never evaluate or save a NaN state
                    check(m, meta["step"], epoch, spe)
                _end_of_epoch(cfg, epoch, state, meta, evaluator, dev, ckpts, writer, spe)
                meta.update(epoch=epoch + 1, batch=0)
                ckpts.save(state, position(epoch + 1, 0))
            summary.update(_finish(cfg, state, meta, evaluator, ckpts, layout, pre, num_labels, is_main))
            summary["params"] = state.params  # the final global arrays (for callers / tests)
            summary["train_step_traces"] = counter.count
            summary["eval_step_traces"] = evaluator.counter.count
            return summary
    finally:
        ckpts.wait()
        ckpts.close()
        writer.close()


def _end_of_epoch(cfg, epoch, state, meta, evaluator, dev, ckpts, writer, spe) -> None:
    res: dict[str, Any] = {"epoch": epoch + 1, "step": int(meta["step"])}
    if dev is not None:
        res.update(evaluator.report(state.params, dev, f"dev after epoch {epoch + 1}"))
    if cfg.sts_dev_path:
        res["sts_spearman"] = evaluator.sts(state.params)
        log.info("dev STS Spearman (cosine) after epoch %d: %.4f", epoch + 1, res["sts_spearman"])
    writer.write("dev", int(meta["step"]), res)
    meta["history"].append(res)
    value = res.get(cfg.best_metric)
    best = meta["best"]
    # Without dev data the latest epoch counts as the best.
    if value is None or best is None or value > best["value"]:
        meta["best"] = {"metric": cfg.best_metric, "value": value, "epoch": epoch + 1,
                        "step": int(meta["step"])}
        ckpts.save_best(state.params, {**meta, "epoch": epoch + 1, "batch": 0})
        if value is not None:
            log.info("new best %s %.4f at epoch %d", cfg.best_metric, value, epoch + 1)


def _finish(cfg, state, meta, evaluator, ckpts, layout, pre, num_labels, is_main) -> dict[str, Any]:
    ckpts.wait()
    restored = ckpts.restore_best(layout)
    params = restored[0] if restored is not None else state.params
    out: dict[str, Any] = {"step": int(meta["step"]), "best": meta["best"], "history": meta["history"]}
    if cfg.test_path:
        test = data.tokenize_pairs(_read(cfg.test_path, cfg, num_labels), pre.tokenizer, cfg.seq_length)
        out["test"] = evaluator.report(params, test, "test (best model)")
    if cfg.export:
        host = sharding.host_tree(params, layout.mesh)  # collective: every process takes part
        if is_main:
            enc = SentenceEncoder.from_parts(pre.config, host["backbone"], pre.tokenizer, PoolingConfig(pre.pooling),
                                  cfg.seq_length, devices=jax.local_devices()[:1])
            enc.save(os.path.join(cfg.output_dir, "best_model"), overwrite=True)
            enc.export_pytorch(os.path.join(cfg.output_dir, "best_model_pytorch"), overwrite=True)
            log.info("exported the best model to %s/best_model and best_model_pytorch", cfg.output_dir)
    if is_main:
        write_json(os.path.join(cfg.output_dir, "results.json"), out)
    return out
