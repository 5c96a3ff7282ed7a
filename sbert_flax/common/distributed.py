"""Joining a multi-process JAX job (`jax.distributed`), for the training and encode CLIs."""

from __future__ import annotations

import argparse
import os


def add_distributed_flags(p: argparse.ArgumentParser, underscore: bool = False) -> None:
    """`--coordinator-address/--num-processes/--process-id` (not needed on TPU pods / SLURM).

    Both spellings are accepted; `--help` shows the command's own style: hyphens, or with
    `underscore` the underscores of the training CLI (UER-py's flags are spelled so).
    """
    g = p.add_argument_group("multi-host (auto-detected on TPU pods and SLURM)")
    for name, kw in (("coordinator-address", {"help": "host:port of process 0"}),
                     ("num-processes", {"type": int}), ("process-id", {"type": int})):
        hyphen, under = f"--{name}", f"--{name.replace('-', '_')}"
        shown, alias = (under, hyphen) if underscore else (hyphen, under)
        g.add_argument(shown, alias, dest=name.replace("-", "_"), **kw)


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
    """`jax.distributed.initialize` from explicit flags, or auto-detected on TPU pods / SLURM.

    Must run before anything touches a JAX device.
    """
    import jax

    if coordinator or num_processes or process_id is not None:
        if not (coordinator and num_processes and process_id is not None):
            raise ValueError("multi-host needs all of --coordinator_address, --num_processes, "
                             "--process_id")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")
          or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        jax.distributed.initialize()  # JAX reads the cluster from the environment
