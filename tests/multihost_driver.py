"""One process of the multi-host tests, 4 fake CPU devices with gloo collectives, joining a
2-process JAX cluster on loopback; process 0 writes the final params to OUT_DIR/params.npz.

    python tests/multihost_driver.py PORT PROC_ID OUT_DIR [CFG_JSON] [--mnrl]

CFG_JSON runs `train_and_evaluate(config)` (params.npz, history.json); `--mnrl` then runs
`mnrl_run`, the mnrl step (mnrl_params.npz, losses.json): one cluster start covers both.

`mnrl_run` is also what the test runs in one process on 8 devices (importing this file sets no
JAX config; running it does).
"""

import json
import os
import sys

import jax

MNRL_ROWS, MNRL_LEN, MNRL_PAD = 16, 12, (6, 7, 14, 15)  # each process pads its local half


def mnrl_run(steps: int = 3):
    """mnrl (anchor, positive, negative; packed) on a data=4 x fsdp=2 mesh of all devices, SGD:
    each process feeds its contiguous half of a fixed global batch. Returns (losses, host params)."""
    import numpy as np
    import optax

    from sbert_flax.common import sharding
    from sbert_flax.inference.packing import TrainPacking
    from sbert_flax.models.config import BertConfig
    from sbert_flax.training import losses
    from sbert_flax.training.state import create_train_state, state_layout
    from sbert_flax.training.step import make_train_step

    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    loss = losses.make_loss("mnrl")
    mdef = loss.model_def(cfg, "mean")
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
                        + (1.0 if x.ndim == 1 else 0.0), mdef.abstract_params)
    batch = {}
    for c in loss.text_columns(True):
        mask = (np.arange(MNRL_LEN)[None] < rng.integers(2, MNRL_LEN + 1, MNRL_ROWS)[:, None])
        batch[f"{c}_ids"] = rng.integers(1, 128, (MNRL_ROWS, MNRL_LEN)).astype(np.int32) * mask
        batch[f"{c}_mask"] = mask.astype(np.int32)
    # Packed, as the pipeline feeds the embedding losses: every process packs the whole global
    # batch the same way and feeds its contiguous share of the rows and of the texts.
    names = loss.text_columns(True)
    texts = [[batch[f"{c}_ids"][r, : batch[f"{c}_mask"][r].sum()] for r in range(MNRL_ROWS)] for c in names]
    p = TrainPacking(16, 1, row_multiple=8).pack(texts)
    batch = {f"packed_{k}": p[k] for k in ("ids", "segments", "positions")}
    for k, c in enumerate(names):
        batch[f"{c}_row"], batch[f"{c}_slot"] = p["row"][k], p["slot"][k]
    batch["weights"] = np.ones(MNRL_ROWS, np.float32)
    batch["weights"][list(MNRL_PAD)] = 0.0
    n, i = jax.process_count(), jax.process_index()
    local = {k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in batch.items()}

    mesh = sharding.make_mesh(4, 2)
    tx = optax.sgd(0.5)
    layout = state_layout(mdef, tx, mesh, sharding.FSDP_RULES)
    state = create_train_state(host, tx, layout)
    step = make_train_step(mdef.graphdef, loss, tx, layout, seed=7)
    seen = []
    for _ in range(steps):
        state, m = step(state, sharding.put_batch(local, mesh))
        seen.append(float(m["loss"]))
    return seen, sharding.host_tree(state.params, mesh)


def flat(tree) -> dict:
    import numpy as np

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    port, pid, out_dir, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    from sbert_flax.common.distributed import init_distributed

    init_distributed(f"127.0.0.1:{port}", 2, pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    import numpy as np

    cfg_json = next((j for j in jobs if j != "--mnrl"), None)
    if cfg_json is not None:
        from jax.experimental import multihost_utils

        from sbert_flax.training.train_config import TrainConfig
        from sbert_flax.training.trainer import train_and_evaluate

        with open(cfg_json) as f:
            cfg = TrainConfig.from_dict(json.load(f))
        summary = train_and_evaluate(cfg)
        params = multihost_utils.process_allgather(summary["params"], tiled=True)
        if pid == 0:
            np.savez(os.path.join(out_dir, "params.npz"), **flat(params))
            with open(os.path.join(out_dir, "history.json"), "w") as f:
                json.dump(summary["history"], f)
    if "--mnrl" in jobs:
        seen, params = mnrl_run()
        if pid == 0:
            np.savez(os.path.join(out_dir, "mnrl_params.npz"), **flat(params))
            with open(os.path.join(out_dir, "losses.json"), "w") as f:
                json.dump(seen, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
