"""The host side of encode alone: windows tokenized and packed, no device call (sentences/s).

What the encode part compares its passes with: if a pass is no faster than its host side alone,
encode is bound by the host, not the chip. Timed at each number of preparation threads; with
none (the caller's thread) tokenize and pack are also timed apart.
"""

from __future__ import annotations

import time


def host_side(enc, sentences: list[str], budget: int, workers: tuple[int, ...]) -> dict:
    """The host side alone, no device call: windows tokenized and packed as `encode_chunks` makes
    them (`prepared_windows`), at each number of preparation threads (0: the caller's thread,
    where tokenize and pack are also timed apart)."""
    from sbert_flax.inference.window_stream import Window

    out: dict = {"by_workers": {}}
    tokenize, pack = enc.tokenizer.encode_ids, enc.packer(budget).pack
    t_tok = t_pack = 0.0

    def timed_prepare(item):  # the serial breakdown: `_prepare_window` with a clock in it
        nonlocal t_tok, t_pack
        _, texts = item
        t = time.perf_counter()
        ids = tokenize(texts, enc.max_seq_length)
        t_tok += time.perf_counter() - t
        t = time.perf_counter()
        batches = pack(ids, pad_id=enc.tokenizer.pad_id)
        t_pack += time.perf_counter() - t
        return Window(0, len(texts), batches, None)

    for w in workers:
        tokens = batches = 0
        t0 = time.perf_counter()
        if w == 0:
            from sbert_flax.inference.encoder import MIN_WINDOW, WINDOW_BATCHES

            window = max(MIN_WINDOW, WINDOW_BATCHES * budget // 32)
            windows = map(timed_prepare, enc._windows(sentences, window))
        else:
            windows = enc.prepared_windows(sentences, workers=w)
        for win in windows:
            tokens += sum(b.real_tokens for b in win.batches)
            batches += len(win.batches)
        wall = time.perf_counter() - t0
        out["by_workers"][str(w)] = {"wall_s": wall, "batches": batches,
                                     "sentences_per_s": len(sentences) / wall,
                                     "tokens_per_s": tokens / wall}
        if w == 0:
            out.update(tokenize_s=t_tok, pack_s=t_pack,
                       tokenize_sentences_per_s=len(sentences) / t_tok if t_tok else None,
                       pack_sentences_per_s=len(sentences) / t_pack if t_pack else None)
    best = max(out["by_workers"], key=lambda k: out["by_workers"][k]["sentences_per_s"])
    out.update(best_workers=int(best), **{k: out["by_workers"][best][k] for k in
                                          ("wall_s", "batches", "sentences_per_s", "tokens_per_s")})
    return out
