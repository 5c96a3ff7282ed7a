"""Test hooks for training runs, injected from outside: a NaN loss at a chosen step, a pause
after every step. Production code has no such options.

The trainer builds its step with `trainer.make_train_step`; `installed()` wraps that function so
the step it returns (a) reports a NaN loss and `finite=False` at one 1-based step, as a diverging
run does, and (b) sleeps after each step, so a test can kill a run between checkpoints.

In-process:
    with train_hooks.installed(nan_at_step=5):
        cli.main([...])

In a subprocess, as `sbert-flax train` (`sbert_flax.training.cli.main`) with the hooks on:
    python tests/train_hooks.py --step_delay 0.4 -- --pretrained_model_path M --train_path T ...
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp


def _hooked(make_train_step: Callable, nan_at_step: int | None, step_delay: float) -> Callable:
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
            return state, metrics

        return step

    return make


@contextlib.contextmanager
def installed(nan_at_step: int | None = None, step_delay: float = 0.0) -> Iterator[None]:
    """Trainers built inside the block run their steps through the hooks."""
    from sbert_flax.training import trainer

    real = trainer.make_train_step
    trainer.make_train_step = _hooked(real, nan_at_step, step_delay)
    try:
        yield
    finally:
        trainer.make_train_step = real


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: train_hooks.py [--nan_at_step K] [--step_delay S] -- TRAIN_ARGS...")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="train_hooks.py")
    p.add_argument("--nan_at_step", type=int, help="the loss of this 1-based step is NaN")
    p.add_argument("--step_delay", type=float, default=0.0, help="seconds to sleep after each step")
    args = p.parse_args(argv[:split])

    from sbert_flax.training import cli

    with installed(args.nan_at_step, args.step_delay):
        return cli.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
