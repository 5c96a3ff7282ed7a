"""The train part: the jitted MNRL train step, timed and profiled, per attention configuration.

On packed batches of nli-zh pairs (BERT-base, bf16, seq 128, global batch 256 / 1024): step
time, sentences/s, tokens/s, MFU, with the default attention (dropout 0.1: the einsum path) and,
at attention dropout 0, jax.nn.dot_product_attention with implementation "xla" vs "cudnn", with
threefry or unsafe_rbg dropout keys (`sizes.TRAIN_CONFIGS`); each profiled too (`profiling`).
Batches are placed on the device before timing: the step time excludes the host input pipeline.
`GPU_CHECK_TRAIN="xla:1,..."` (a rerun) runs only the configs named "name:batch index".
"""

from __future__ import annotations

import collections
import os
import sys
import time
import traceback

from gpu.profiling import profile_summary, traced
from gpu.result_file import Clock, close_item, error_text, update_json
from gpu.sizes import TRAIN_CONFIGS


def read_pairs(path: str) -> list[tuple[str, str]]:
    """The (anchor, positive) pairs of a TSV with a header (rows with an empty side skipped)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2 and cols[0].strip() and cols[1].strip():
                pairs.append((cols[0], cols[1]))
    return pairs


def packed_batches(tokenizer, pairs, batch: int, seq_length: int, row_multiple: int,
                   candidates: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Random batches of `batch` pairs packed as the trainer packs them (`BatchBuilder._packed`),
    keeping those of the most common packed shape (each other shape would be one more compile)."""
    import numpy as np

    from sbert_flax.inference.packing import TrainPacking, row_lengths
    from sbert_flax.models.tokenization import bucket_for

    rng = np.random.default_rng(seed)
    made = []
    for _ in range(candidates):
        idx = rng.choice(len(pairs), size=batch, replace=batch > len(pairs))
        ids = tokenizer.encode([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], seq_length)
        longest = max(len(x) for x in ids)
        packing = TrainPacking(bucket_for(longest, row_lengths(seq_length)), 1, row_multiple)
        p = packing.pack([ids[:batch], ids[batch:]], pad_id=tokenizer.pad_id)
        made.append({"packed_ids": p["ids"], "packed_segments": p["segments"],
                     "packed_positions": p["positions"], "anchor_row": p["row"][0],
                     "anchor_slot": p["slot"][0], "positive_row": p["row"][1],
                     "positive_slot": p["slot"][1], "weights": np.ones(batch, np.float32)})
    shapes = collections.Counter(b["packed_ids"].shape for b in made)
    shape = shapes.most_common(1)[0][0]
    kept = [b for b in made if b["packed_ids"].shape == shape]
    real = [int(np.sum(b["packed_segments"] > 0)) for b in kept]
    info = {"packed_shape": list(shape), "batches": len(kept), "candidates": candidates,
            "shapes_seen": {f"{r}x{c}": n for (r, c), n in shapes.items()},
            "real_tokens_per_batch": float(np.mean(real)),
            "padding_waste": 1.0 - float(np.mean(real)) / (shape[0] * shape[1])}
    return kept, info


def _peak_memory(dev) -> float | None:
    """The device's peak memory in use so far (GiB), where the backend reports it."""
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        return None
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


def train(args, sizes: dict) -> None:
    """The "train" section: one item per config of TRAIN_CONFIGS that fits the part's time."""
    clock = Clock(args.budget_s)
    import dataclasses

    import jax
    import jax.numpy as jnp

    from sbert_flax.checkpoints.pretrained import load_pretrained
    from sbert_flax.common import sharding
    from sbert_flax.common.devdata import data_path
    from sbert_flax.training import flops, optim
    from sbert_flax.training.losses import EmbeddingModel, make_loss
    from sbert_flax.training.siamese import abstract_model_def
    from sbert_flax.training.state import create_train_state, state_layout
    from sbert_flax.training.step import TraceCounter, make_train_step

    seq = sizes["seq_length"]
    pre = load_pretrained(args.model, seq_length=seq, default_pooling=None)
    pairs_path = data_path("contrastive", "nli-zh-pairs.tsv")
    if pairs_path is None:
        sys.exit("contrastive/nli-zh-pairs.tsv not found: set SBERT_FLAX_DATA")
    pairs = read_pairs(pairs_path)
    mesh = sharding.make_mesh(-1, 1)
    n_dev = jax.device_count()
    kind = jax.devices()[0].device_kind
    peak = flops.known_peak_flops([d.device_kind for d in jax.devices()])
    section: dict = {"model_dir": args.model, "dtype": "bfloat16", "loss": "mnrl",
                     "seq_length": seq, "pooling": pre.pooling, "pairs": len(pairs),
                     "devices": n_dev, "device_kind": kind,
                     "peak_flops_per_device": peak, "batches": {}, "configs": [],
                     "note": "batches placed on the device before timing: step time excludes the "
                             "host input pipeline"}
    update_json(args.json, "train", section)
    data: dict = {}
    worst = None  # the longest config so far (seconds): what the next one may take
    # GPU_CHECK_TRAIN="xla:1" (a rerun): only the configs named "name:batch index".
    only_train = {x for x in os.environ.get("GPU_CHECK_TRAIN", "").split(",") if x}
    for name, impl, attn_dropout, bi, prng in TRAIN_CONFIGS:
        if only_train and f"{name}:{bi}" not in only_train:
            continue
        batch = sizes["train_batches"][bi]
        rec: dict = {"name": name, "attention_impl": impl or "einsum (dropout path)",
                     "attention_dropout": 0.1 if attn_dropout is None else attn_dropout,
                     "prng_impl": prng or "threefry",
                     "global_batch": batch, "steps_s": {}}
        section["configs"].append(rec)
        if len(section["configs"]) > sizes["train_configs"]:
            rec["skipped"] = "dry run"
            update_json(args.json, "train", section)
            continue
        if worst is not None and clock.left() < worst * 1.1:
            rec["skipped"] = f"time: {clock.left():.0f} s left, a config took {worst:.0f} s"
            update_json(args.json, "train", section)
            continue
        t_item = time.perf_counter()
        try:
            if batch not in data:
                with clock.step(f"packed batches of {batch} pairs", rec["steps_s"], "batches"):
                    kept, info = packed_batches(pre.tokenizer, pairs, batch, seq, n_dev,
                                                sizes["candidates"])
                    data[batch] = ([sharding.put_batch(b, mesh) for b in kept], info)
                section["batches"][str(batch)] = info
            device_batches, info = data[batch]
            cfg = pre.config
            if attn_dropout is not None:
                cfg = dataclasses.replace(cfg, attention_probs_dropout_prob=attn_dropout)
            loss = make_loss("mnrl", scale=20.0, pooling=pre.pooling_config)

            def make(rngs, cfg=cfg, impl=impl):
                m = EmbeddingModel(cfg, pre.pooling_config, rngs=rngs, dtype=jnp.bfloat16)
                m.embedder.backbone.attention_impl = impl
                return m

            mdef = abstract_model_def(make)
            tx = optim.make_optimizer(2e-5, 10_000, warmup_ratio=0.1,
                                      params_for_mask=mdef.abstract_params)
            layout = state_layout(mdef, tx, mesh, sharding.rules_for("replicated"))
            counter = TraceCounter()
            step_fn = make_train_step(mdef.graphdef, loss, tx, layout, seed=7, prng_impl=prng,
                                      counter=counter)
            st = create_train_state(loss.initial_params(pre.params, cfg, 7), tx, layout)
            n = len(device_batches)
            with clock.step(f"train {name} b{batch}: first step (compiles)", rec["steps_s"],
                            "compile"):
                st, m = step_fn(st, device_batches[0])
                jax.block_until_ready((st, m))
            for i in range(1, sizes["warmup_steps"]):
                st, m = step_fn(st, device_batches[i % n])
            jax.block_until_ready((st, m))
            steps = sizes["steps"]
            with clock.step(f"train {name} b{batch}: {steps} timed steps", rec["steps_s"], "timed"):
                t = time.perf_counter()
                for i in range(steps):
                    st, m = step_fn(st, device_batches[i % n])
                jax.block_until_ready((st, m))
                wall = time.perf_counter() - t
            host = jax.device_get(m)
            step_s = wall / steps
            rows, length = info["packed_shape"]
            tokens_s = info["real_tokens_per_batch"] / step_s
            flops_s = flops.train_flops_per_token(cfg, length) * tokens_s
            rec.update(step_ms=step_s * 1e3, sentences_per_s=2 * batch / step_s,
                       pairs_per_s=batch / step_s, tokens_per_s=tokens_s,
                       padded_tokens_per_s=rows * length / step_s,
                       model_tflops_per_s=flops_s / 1e12,
                       mfu=flops.mfu(flops_s, peak, n_dev), loss=float(host["loss"]),
                       finite=bool(host["finite"]), compilations=counter.count,
                       peak_memory_gib=_peak_memory(jax.devices()[0]))
            update_json(args.json, "train", section)
            k = sizes["profile_steps"]
            with clock.step(f"train {name} b{batch}: {k} profiled steps", rec["steps_s"],
                            "profile"):
                with traced(f"train-{name}-{batch}") as tinfo:
                    t = time.perf_counter()
                    for i in range(k):
                        st, m = step_fn(st, device_batches[i % n])
                    jax.block_until_ready((st, m))
                    wall = time.perf_counter() - t
                rec["profile"] = profile_summary(tinfo, wall)
                rec["profile"]["steps"] = k
            mfu = rec["mfu"]
            print(f"  train {name} b{batch}: {rec['step_ms']:.1f} ms/step, "
                  f"{rec['sentences_per_s']:,.0f} sentences/s, {tokens_s:,.0f} tokens/s, MFU "
                  f"{'n/a' if mfu is None else f'{mfu:.1%}'}, "
                  f"busy {rec['profile'].get('busy_fraction')}",
                  flush=True)
            del st, m
        except Exception as e:  # e.g. cuDNN attention refusing a shape: record it, go on
            traceback.print_exc()
            rec["error"] = error_text(e)
        worst = close_item(rec, t_item, worst, args.json, "train", section)
