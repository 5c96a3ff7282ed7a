"""One process of the multi-host test: `python tests/multihost_driver.py PORT PROC_ID OUT_DIR CFG_JSON`.

Sets up 4 fake CPU devices with gloo collectives, joins a 2-process JAX cluster on loopback,
trains with `train_and_evaluate`, and (process 0) writes the final params to OUT_DIR/params.npz.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["SBERT_FLAX_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 4)


def flat(tree) -> dict:
    import numpy as np

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def main() -> None:
    port, pid, out_dir, cfg_json = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from sbert_flax.training.cli import init_distributed

    init_distributed(f"127.0.0.1:{port}", 2, pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    import numpy as np
    from jax.experimental import multihost_utils

    from sbert_flax.training.loop import train_and_evaluate
    from sbert_flax.training.train_config import TrainConfig

    with open(cfg_json) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    summary = train_and_evaluate(cfg)
    params = multihost_utils.process_allgather(summary["params"], tiled=True)
    if pid == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **flat(params))
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump(summary["history"], f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
