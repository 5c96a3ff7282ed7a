"""Test hooks for training runs, injected from outside: a NaN loss at a chosen step, a pause
after every step, a SIGTERM after a step, a SIGKILL right after a best checkpoint. Production code
has no such options.

The trainer builds its step with `trainer.make_train_step`; `installed()` wraps that function so
the step it returns (a) reports a NaN loss and `finite=False` at one 1-based step, as a diverging
run does, (b) sleeps after each step, so a test can kill a run between checkpoints, and (c) sends
the process a SIGTERM after one step, as a scheduler's preemption does. It also wraps
`RunCheckpoints.save_best` to (d) SIGKILL the process once the best checkpoint of one step is on
disk, before the latest checkpoint of that step is written (a hard kill between the two saves).

In-process:
    with train_hooks.installed(nan_at_step=5):
        cli.main([...])

In a subprocess, as `sbert-flax train` (`sbert_flax.cli.train.main`) with the hooks on:
    python tests/train_hooks.py --step_delay 0.4 -- --pretrained_model_path M --train_path T ...
    python tests/train_hooks.py --kill_after_best 8 -- --pretrained_model_path M ...
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp


def _hooked(make_train_step: Callable, nan_at_step: int | None, step_delay: float,
            sigterm_after_step: int | None) -> Callable:
    def make(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def step(state, batch):
            number = int(jax.device_get(state.step)) + 1  # read before the step donates `state`
            state, metrics = step_fn(state, batch)
            if number == nan_at_step:
                metrics = {**metrics, "loss": jnp.full_like(metrics["loss"], jnp.nan),
                           "finite": jnp.zeros_like(metrics["finite"])}
            if step_delay:
                time.sleep(step_delay)
            if number == sigterm_after_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics

        return step

    return make


def _killing(save_best: Callable, step: int) -> Callable:
    def save(self, params, meta):
        save_best(self, params, meta)
        if int(meta["step"]) == step:
            self.best.wait_until_finished()  # on disk, renamed into place: then the "power cut"
            os.kill(os.getpid(), signal.SIGKILL)

    return save


@contextlib.contextmanager
def installed(nan_at_step: int | None = None, step_delay: float = 0.0,
              sigterm_after_step: int | None = None,
              kill_after_best: int | None = None) -> Iterator[None]:
    """Trainers built inside the block run their steps (and best saves) through the hooks.
    `kill_after_best` SIGKILLs this process: use it in a subprocess (`main`)."""
    from sbert_flax.training import run_checkpoints as checkpointing
    from sbert_flax.training import trainer

    real, real_save_best = trainer.make_train_step, checkpointing.RunCheckpoints.save_best
    trainer.make_train_step = _hooked(real, nan_at_step, step_delay, sigterm_after_step)
    if kill_after_best is not None:
        checkpointing.RunCheckpoints.save_best = _killing(real_save_best, kill_after_best)
    try:
        yield
    finally:
        trainer.make_train_step = real
        checkpointing.RunCheckpoints.save_best = real_save_best


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: train_hooks.py [--nan_at_step K] [--step_delay S] -- TRAIN_ARGS...")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="train_hooks.py")
    p.add_argument("--nan_at_step", type=int, help="the loss of this 1-based step is NaN")
    p.add_argument("--step_delay", type=float, default=0.0, help="seconds to sleep after each step")
    p.add_argument("--sigterm_after_step", type=int, help="SIGTERM this process after that step")
    p.add_argument("--kill_after_best", type=int,
                   help="SIGKILL this process once the best checkpoint of that step is saved")
    args = p.parse_args(argv[:split])

    from sbert_flax.cli import train as cli

    with installed(args.nan_at_step, args.step_delay, args.sigterm_after_step,
                   args.kill_after_best):
        return cli.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
