"""orbax checkpoints of a training run: the latest few in `checkpoints/`, the best in `best/`.

A checkpoint holds the train state (params, opt_state, step), the grain iterator state of the
input pipeline (`data`: one JSON file per process, the next batch to read) and a JSON `meta` with
the epochs done, the best dev result so far, the evaluation history and the config fields a resume
must not change, so `--resume` continues with the next batch and the same dropout keys. orbax writes a
step to a temporary folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest; it is multi-host aware (every process calls save/restore).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from sbert_flax.training.state import StateLayout, TrainState

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


class RunCheckpoints:
    """The two managers of a run directory.

    Args:
      output_dir: the run directory.
      max_to_keep: periodic / end-of-epoch checkpoints kept.
    """

    def __init__(self, output_dir: str, max_to_keep: int = 3):
        root = os.path.abspath(output_dir)
        self.latest = ocp.CheckpointManager(
            os.path.join(root, CHECKPOINTS_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta", "data"))
        self.best = ocp.CheckpointManager(
            os.path.join(root, BEST_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_names=("params", "meta"))

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
        return self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), data=data))

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
        step = int(meta["step"])
        if step in self.best.all_steps():
            return
        # Multi-host, each manager's background finalize meets the other processes at a barrier
        # whose key orbax does not scope by manager ("ThreadSaveMultiHostValueHolder:..."): two
        # managers finalizing at once fail with "Barrier ... is already ongoing" and the run hangs
        # at the next wait. So the other manager's save is finished before this one starts.
        self.latest.wait_until_finished()
        self.best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def restore_best(self, layout: StateLayout) -> tuple[Any, dict] | None:
        step = self.best.latest_step()
        if step is None:
            return None
        out = self.best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(layout.abstract.params), meta=ocp.args.JsonRestore()))
        return out["params"], dict(out["meta"])

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

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
