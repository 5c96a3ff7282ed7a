"""The encode part: SentenceEncoder, bf16, packed, at each token budget.

On STS-B-zh test sentences repeated to >= 200k (`inputs.repeated_sentences`), each budget gets a
warm-up pass (compiles), timed passes (sentences/s, real tokens/s; on the first budget at each
number of window-preparation threads, plus `encode_variants`), the host side alone (tokenize +
pack, no device call: `encode_host`), and a `jax.profiler` trace of a slice: device busy
fraction and the top 10 ops (`profiling`). Extra items (cuDNN attention) get one timed pass and
the profile. `--section` names the JSON section, for a rerun under other settings.
"""

from __future__ import annotations

import os
import time
import traceback

from gpu.encode_host import host_side
from gpu.encode_variants import encode_variants
from gpu.inputs import repeated_sentences
from gpu.profiling import profile_summary, traced
from gpu.result_file import Clock, close_item, error_text, update_json


def encode(args, sizes: dict) -> None:
    """The `args.section` section: one item per budget that fits the part's time, then extras."""
    clock = Clock(args.budget_s)
    import jax

    from sbert_flax.checkpoints.loading import load_model
    from sbert_flax.inference.encoder import SentenceEncoder

    sents, distinct = repeated_sentences(sizes["sentences"])
    model = load_model(args.model)
    section: dict = {"model_dir": args.model, "dtype": "bfloat16", "sentences": len(sents),
                     "distinct": distinct, "max_seq_length": model.max_seq_length,
                     "device": str(jax.devices()[0]), "budgets": {}, "extra": {}, "steps_s": {}}
    update_json(args.json, args.section, section)
    # GPU_CHECK_BUDGETS="16384,65536" (a rerun in a second lease): only those budgets, no extras.
    only = [int(x) for x in os.environ.get("GPU_CHECK_BUDGETS", "").split(",") if x]
    todo = [("xla", b, "budgets") for b in (only or sizes["budgets"])]
    todo += [] if only else [(impl, b, "extra") for impl, b in sizes["extra_encode"]]
    worst = None  # the longest budget so far (seconds): what the next one may take
    for impl, budget, where in todo:
        key = str(budget) if where == "budgets" else f"{impl}-{budget}"
        if worst is not None and clock.left() < worst * 1.2:
            section[where][key] = {"skipped": f"time: {clock.left():.0f} s left, a budget took "
                                              f"{worst:.0f} s"}
            update_json(args.json, args.section, section)
            continue
        t_item = time.perf_counter()
        rec: dict = {"max_batch_tokens": budget, "attention_impl": impl, "steps_s": {}}
        section[where][key] = rec
        try:
            enc = SentenceEncoder(model, dtype="bfloat16", devices=jax.local_devices()[:1],
                                  max_batch_tokens=budget,
                                  attention_impl=None if impl == "xla" else impl)
            with clock.step(f"encode {key}: warm-up pass (compiles)", rec["steps_s"], "warmup"):
                enc.encode(sents)
            rec["compiles"] = enc.num_compiles
            walls = []
            first = where == "budgets" and budget == todo[0][1]
            # Timed passes at each number of window-preparation threads (the first budget only).
            workers = sizes["encode_workers"] if first else (enc.host_workers,)
            by_workers: dict = {}
            for w in workers:
                enc.host_workers = w
                for i in range(sizes["passes"] if where == "budgets" else 1):
                    with clock.step(f"encode {key}: timed pass {i + 1}, {w} host worker(s)",
                                    rec["steps_s"], f"pass{i + 1}-w{w}"):
                        t = time.perf_counter()
                        enc.encode(sents)
                        wall = time.perf_counter() - t
                        walls.append(wall)
                        by_workers[str(w)] = max(by_workers.get(str(w), 0.0), len(sents) / wall)
            rec["sentences_per_s_by_host_workers"] = by_workers
            enc.host_workers = int(max(by_workers, key=by_workers.get))  # for the profiled pass
            if first:
                rec["variants"] = encode_variants(enc, sents, clock, rec["steps_s"])
            s = enc.last_stats
            best = min(walls)
            rec.update(pass_s=walls, sentences_per_s=len(sents) / best,
                       tokens_per_s=s.real_tokens / best, padded_tokens_per_s=s.padded_slots / best,
                       real_tokens=s.real_tokens, padding_waste=s.padding_waste, batches=s.batches,
                       shapes=[list(x) for x in s.shapes], compiles_after=enc.num_compiles)
            update_json(args.json, args.section, section)
            if where == "budgets":
                with clock.step(f"encode {key}: host side alone (tokenize + pack)", rec["steps_s"],
                                "host"):
                    rec["host"] = host_side(enc, sents, budget,
                                            sizes["host_workers"][0 if first else 1])
                rec["encode_over_host_rate"] = (rec["sentences_per_s"]
                                                / rec["host"]["sentences_per_s"])
                update_json(args.json, args.section, section)
            # The trace's size goes with the number of batches, not sentences: a big budget's
            # slice is longer (and spans more than its first window where the run allows).
            per_sentence = max(1.0, s.real_tokens / len(sents))
            part = sents[:min(sizes["profile_max"], max(sizes["profile_sentences"],
                              int(sizes["profile_batches"] * budget / per_sentence)))]
            enc.encode(part)  # the slice's own last batch may be a shape the passes never ran
            with clock.step(f"encode {key}: profiled pass of {len(part)} sentences",
                            rec["steps_s"], "profile"):
                with traced(f"encode-{key}") as info:
                    t = time.perf_counter()
                    enc.encode(part)
                    wall = time.perf_counter() - t
                prof = profile_summary(info, wall)
            prof.update(sentences=len(part), sentences_per_s=len(part) / wall)
            rec["profile"] = prof
            print(f"  {key}: {rec['sentences_per_s']:,.0f} sentences/s, {rec['tokens_per_s']:,.0f} "
                  f"tokens/s, host alone "
                  f"{rec.get('host', {}).get('sentences_per_s', float('nan')):,.0f} "
                  f"sentences/s, busy {prof.get('busy_fraction')} ({prof['source']})", flush=True)
        except Exception as e:  # one failed budget must not cost the others
            traceback.print_exc()
            rec["error"] = error_text(e)
        worst = close_item(rec, t_item, worst, args.json, args.section, section)
