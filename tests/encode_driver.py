"""One process of the multi-host encode test: `python tests/encode_driver.py PORT PROC_ID ARGS...`.

Sets up 4 fake CPU devices with gloo collectives, then runs `sbert-flax encode ARGS` as process
PROC_ID of a 2-process JAX cluster on loopback (the CLI joins it from the flags).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["SBERT_FLAX_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 4)


def main() -> int:
    port, pid, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    from sbert_flax.cli.main import main as cli_main

    return cli_main(["encode", *args, "--coordinator_address", f"127.0.0.1:{port}",
                     "--num_processes", "2", "--process_id", pid, "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
