"""The st-encode part: sentence-transformers on the same sentences, for the sbert-flax / ST ratio.

fp16 on CUDA (fp32 on a CPU): a load + warm-up pass on the distinct sentences, then one timed
pass; the ratio takes the encode part's best budget from the JSON file.
"""

from __future__ import annotations

import time

from gpu.inputs import repeated_sentences
from gpu.result_file import Clock, read_json, update_json


def st_encode(args, sizes: dict) -> None:
    """The "st_encode" section, with sbert-flax's best encode rate over sentence-transformers'."""
    clock = Clock(args.budget_s)
    section: dict = {"steps_s": {}}
    update_json(args.json, "st_encode", section)
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    sents, distinct = repeated_sentences(sizes["sentences"])
    sents = sents[:sizes["st_sentences"]] if sizes["st_sentences"] else sents
    distinct = min(distinct, len(sents))
    section.update(device=device, dtype=str(dtype).replace("torch.", ""),
                   batch_size=sizes["st_batch"], sentences=len(sents), torch=torch.__version__,
                   gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    with clock.step("sentence-transformers: load + warm-up on the distinct sentences",
                    section["steps_s"], "warmup"):
        st = SentenceTransformer(args.model, device=device).to(dtype)
        with torch.inference_mode():
            st.encode(sents[:distinct], batch_size=sizes["st_batch"], convert_to_numpy=True)
    with clock.step("sentence-transformers: timed pass", section["steps_s"], "pass"):
        t = time.perf_counter()
        with torch.inference_mode():
            st.encode(sents, batch_size=sizes["st_batch"], convert_to_numpy=True)
        wall = time.perf_counter() - t
    section.update(pass_s=wall, sentences_per_s=len(sents) / wall)
    rates = {k: v.get("sentences_per_s") for k, v in read_json(args.json).get("encode", {})
             .get("budgets", {}).items() if v.get("sentences_per_s")}
    if rates:
        best = max(rates, key=rates.get)
        section.update(sbert_flax_best_budget=int(best),
                       sbert_flax_over_st=rates[best] / section["sentences_per_s"])
    print(f"  sentence-transformers {section['dtype']}: "
          f"{section['sentences_per_s']:,.0f} sentences/s; "
          f"sbert-flax bf16 / ST: {section.get('sbert_flax_over_st')}", flush=True)
    update_json(args.json, "st_encode", section)
