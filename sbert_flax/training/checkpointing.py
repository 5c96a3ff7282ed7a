"""orbax checkpoints of a training run: the latest few in `checkpoints/`, the best in `best/`.

A checkpoint holds the train state (params, opt_state, step) and a JSON `meta` with the data
position (`epoch`, `batch`: the next batch of that epoch), the best dev result so far and the
epoch history, so `--resume` continues with the same data order and dropout keys. orbax writes a
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
            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(
            os.path.join(root, BEST_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_names=("params", "meta"))

    # ---- latest ----

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> bool:
        """Saves the state at its step (asynchronously); False if that step is already saved."""
        step = int(meta["step"])
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, layout: StateLayout, step: int | None = None) -> tuple[TrainState, dict]:
        """The state (placed by `layout`'s shardings) and meta of `step` (default the latest)."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.latest.directory}")
        out = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(layout.abstract), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    # ---- best ----

    def save_best(self, params: Any, meta: dict[str, Any]) -> None:
        step = int(meta["step"])
        if step in self.best.all_steps():
            return
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
