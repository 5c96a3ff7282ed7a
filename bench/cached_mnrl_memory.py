"""Benchmark: cached-mnrl (GradCache) memory is flat in the global batch size; mnrl's is not.

Compiles (never runs) the loss's `value_and_grad` for an m3e-small-sized model (4 layers, hidden
512, vocab 21128; random weights are not needed: the inputs are abstract) on (anchor, positive)
batches of `--seq` tokens, and reads XLA's `memory_analysis()` of the compiled executable: the
temporary buffers (activations kept for the backward pass, workspaces) and the arguments/outputs
(params, batch, gradients). On CPU this is the host-memory plan; on GPU/TPU it is HBM.

    python bench/cached_mnrl_memory.py                       # batches 64 and 1024, mini-batch 32
    python bench/cached_mnrl_memory.py --batches 64,256,1024 --mini_batch_size 32 --plain
    python bench/cached_mnrl_memory.py --packed --plain        # packed batches (the default)

`--packed` gives the batch in the pipeline's packed layout (each mini-batch's texts share rows of
`--seq` tokens), sized at `--texts_per_row` texts a row (2 by default; random nli-zh batches put
3.6 in a 64-token row).

"Flat" means the temp bytes of cached-mnrl at 1024 are close to those at 64: only the [B, D]
embeddings, their gradient and the [B, B] score matrix grow with B, not the activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

M3E_SMALL = dict(vocab_size=21128, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                 intermediate_size=2048, max_position_embeddings=512)


def measure(name: str, batch: int, seq: int, mini: int | None, packed: bool = False,
            texts_per_row: int = 2) -> dict:
    import jax
    import jax.numpy as jnp

    from sbert_flax.models.config import BertConfig
    from sbert_flax.training import losses

    loss = losses.make_loss(name, mini_batch_size=mini)
    mdef = loss.model_def(BertConfig(**M3E_SMALL), "mean")
    cols = loss.text_columns(False)
    if packed:
        groups = batch // mini if mini else 1
        rows = groups * -(-(batch // groups) * len(cols) // texts_per_row)
        spec = {f"packed_{k}": jax.ShapeDtypeStruct((rows, seq), jnp.int32)
                for k in ("ids", "segments", "positions")}
        spec.update({f"{c}_{k}": jax.ShapeDtypeStruct((batch,), jnp.int32) for c in cols
                     for k in ("row", "slot")})
    else:
        spec = {f"{c}_{k}": jax.ShapeDtypeStruct((batch, seq), jnp.int32) for c in cols
                for k in ("ids", "mask")}
    spec["weights"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    fn = jax.jit(lambda p, b, k: loss.value_and_grad(mdef.graphdef, p, b, k)[:2])
    t0 = time.perf_counter()
    compiled = fn.lower(mdef.abstract_params, spec, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    mib = 2.0 ** 20
    return {"loss": name, "global_batch": batch, "mini_batch_size": mini, "seq": seq,
            "packed_rows": spec["packed_ids"].shape[0] if packed else None,
            "temp_mib": round(mem.temp_size_in_bytes / mib, 1),
            "argument_mib": round(mem.argument_size_in_bytes / mib, 1),
            "output_mib": round(mem.output_size_in_bytes / mib, 1),
            "compile_s": round(time.perf_counter() - t0, 1), "backend": jax.default_backend()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64,1024", help="global batch sizes, comma-separated")
    p.add_argument("--mini_batch_size", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--plain", action="store_true", help="also measure plain mnrl (grows with B)")
    p.add_argument("--packed", action="store_true", help="packed batches (the pipeline's default)")
    p.add_argument("--texts_per_row", type=int, default=2, help="with --packed: texts per packed row")
    args = p.parse_args()
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        runs = [("cached-mnrl", args.mini_batch_size)] + ([("mnrl", None)] if args.plain else [])
        for name, mini in runs:
            r = measure(name, b, args.seq, mini, args.packed, args.texts_per_row)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| loss | global batch | mini-batch | packed rows | temp MiB | args MiB | output MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['global_batch']} | {r['mini_batch_size'] or '-'} | "
              f"{r['packed_rows'] or '-'} | {r['temp_mib']} | {r['argument_mib']} | {r['output_mib']} |")


if __name__ == "__main__":
    main()
