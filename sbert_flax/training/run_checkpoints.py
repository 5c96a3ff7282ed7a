"""orbax checkpoints of a training run: the latest few in `checkpoints/`, the best in `best/`.

A checkpoint holds the train state (params, opt_state, step), the grain iterator state of the
input pipeline (`data`: one JSON file per process, the next batch to read) and a JSON `meta` with
the epochs done, the best dev result so far, the evaluation history and the config fields a resume
must not change, so `--resume` continues with the next batch and the same dropout keys. orbax writes a
step to a temporary folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest; it is multi-host aware (every process calls save/restore).

`best/` must hold the params of the best that the latest checkpoint records, whatever happened
after it. A run killed between a best save and the next latest save leaves a best step newer than
the latest checkpoint, from a stretch of training that a resume redoes; and orbax's `save()`
writes nothing (returns False) for a step at or below the newest step in its directory. So a run
starts by dropping the best steps above the step it starts from, and an older best is deleted only
once a finished latest checkpoint records a newer one (not by orbax's max_to_keep, which would
delete it as soon as the newer best is written).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sbert_flax.training.state import StateLayout, TrainState

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


class BestCheckpointMismatch(RuntimeError):
    """`best/` does not hold the best the run recorded; the message names both steps."""


class RunCheckpoints:
    """The two managers of a run directory.

    Args:
      output_dir: the run directory.
      max_to_keep: periodic / end-of-epoch checkpoints kept.
      start_step: the step the run starts from (the resumed checkpoint's, 0 for a fresh run):
        best steps above it are dropped.
      start_best: the best step the resumed checkpoint records (None: none); it is kept until a
        newer latest checkpoint records another.
    """

    def __init__(self, output_dir: str, max_to_keep: int = 3, start_step: int = 0,
                 start_best: int | None = None):
        root = os.path.abspath(output_dir)
        self.latest = ocp.CheckpointManager(
            os.path.join(root, CHECKPOINTS_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta", "data"))
        # No max_to_keep: `_prune_best` deletes an old best only when no resume can need it.
        self.best = ocp.CheckpointManager(
            os.path.join(root, BEST_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
            item_names=("params", "meta"))
        # The best step that the newest latest save records: kept by `_prune_best` once that save
        # is finished (until then the previous latest checkpoint, and its best, is the resume point).
        self._recorded_best = start_best
        if jax.process_count() > 1:
            # Every process lists best/ before any deletes from it: a process that listed after
            # the primary's delete would skip that delete's barrier, and the others would hang.
            multihost_utils.sync_global_devices("sbert_flax:best_listed")
        for step in self.best.all_steps():
            if step > start_step:  # saved after the resume point by a run that died: redone now
                self.best.delete(step)
        self._prune_best()

    # ---- latest ----

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any], data: Any) -> bool:
        """Saves the state at its step (asynchronously); False if that step is already saved.

        Args:
          state: the train state.
          meta: JSON-able run position and history (`meta["step"]` is the checkpoint's step).
          data: orbax args of the data iterator state (`TrainPipeline.checkpoint_item(it)`).
        """
        step = int(meta["step"])
        if step in self.latest.all_steps():
            return False
        self.best.wait_until_finished()  # one manager saving at a time: see save_best
        saved = self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), data=data))
        if saved:
            best = meta.get("best")
            self._recorded_best = int(best["step"]) if best else None
        return saved

    def restore_meta(self, step: int | None = None) -> dict:
        """The meta of `step` (default the latest) alone: cheap, for checks before a restore."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.latest.directory}")
        out = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, layout: StateLayout, data: Any, step: int | None = None
                ) -> tuple[TrainState, dict]:
        """The state (placed by `layout`'s shardings) and meta of `step` (default the latest);
        the data iterator state goes into `data` (`TrainPipeline.restore_item()`'s args)."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.latest.directory}")
        out = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(layout.abstract), meta=ocp.args.JsonRestore(), data=data))
        return out["state"], dict(out["meta"])

    # ---- best ----

    def save_best(self, params: Any, meta: dict[str, Any]) -> None:
        """Saves the best params at `meta["step"]` (asynchronously).

        Raises:
          BestCheckpointMismatch: orbax refused the step (a newer best step is in `best/`).
        """
        step = int(meta["step"])
        # Multi-host, each manager's background finalize meets the other processes at a barrier
        # whose key orbax does not scope by manager ("ThreadSaveMultiHostValueHolder:..."): two
        # managers finalizing at once fail with "Barrier ... is already ongoing" and the run hangs
        # at the next wait. So the other manager's save is finished before this one starts.
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self._prune_best()
        if not self.best.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))):
            raise BestCheckpointMismatch(
                f"the best params of step {step} were not saved: {self.best.directory} already "
                f"holds step(s) {self.best.all_steps()}, and orbax saves no step below its newest")

    def best_steps(self) -> list[int]:
        return list(self.best.all_steps())

    def restore_best(self, layout: StateLayout, step: int) -> tuple[Any, dict]:
        """The params and meta of the best checkpoint of `step`, the best the run recorded.

        Raises:
          BestCheckpointMismatch: `best/` has no such step, or its meta names another step.
        """
        self.best.wait_until_finished()
        if step not in self.best.all_steps():
            raise BestCheckpointMismatch(
                f"the run's best is step {step}, but {self.best.directory} holds step(s) "
                f"{self.best.all_steps()}: not exporting params of another step as that best")
        out = self.best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(layout.abstract.params), meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        if int(meta["step"]) != step:
            raise BestCheckpointMismatch(
                f"{self.best.directory}/{step} records step {meta['step']}, not the run's best "
                f"step {step}")
        return out["params"], meta

    def _prune_best(self) -> None:
        """Deletes the best checkpoints older than the one the finished latest checkpoints
        record: no resume can go back to them. Call with no latest save in flight."""
        keep = self._recorded_best
        if keep is None:
            return
        for step in self.best.all_steps():
            if step < keep:
                self.best.delete(step)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self._prune_best()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def read_meta(output_dir: str, step: int | None = None) -> dict:
    """The meta of `step` (default the latest) in `output_dir/checkpoints`, through a read-only
    manager: the resume plan reads it before deciding anything, so a refused resume leaves the
    run directory as it was."""
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(output_dir), CHECKPOINTS_DIR),
        options=ocp.CheckpointManagerOptions(create=False, read_only=True), item_names=("meta",))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])
    finally:
        manager.close()


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps saved in `output_dir/checkpoints`, read from the folder names (no manager created,
    so nothing is written to a run directory that is about to be refused)."""
    d = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())
