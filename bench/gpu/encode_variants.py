"""Encode variants: where a pass's time goes, by changing one dispatch-side setting at a time.

Run on the encode part's first budget, one timed pass each (sentences/s): the tokenizer's
GIL-bounded pieces off, more batches in flight, a shorter GIL switch interval, windows prepared
in spawned processes instead of threads (no shared GIL), and the device side alone (windows
prepared before, then only dispatch, copy back and filing). Host alone (`encode_host`) + device
alone ~= a pass means host and device work do not overlap.
"""

from __future__ import annotations

import collections
import sys
import time

from gpu.result_file import Clock

_PREP: dict = {}  # a preparing process's tokenizer and packer (set once, by its initializer)


def _prep_init(tokenizer, packer, max_seq_length: int) -> None:
    _PREP.update(tokenizer=tokenizer, packer=packer, msl=max_seq_length)


def _prep_in_process(item):
    """`SentenceEncoder._prepare_window` in a worker process: no GIL shared with the dispatcher."""
    from sbert_flax.inference.window_stream import Window

    start, texts = item
    tok = _PREP["tokenizer"]
    batches = _PREP["packer"].pack(tok.encode_ids(texts, _PREP["msl"]), pad_id=tok.pad_id)
    return Window(start, len(texts), batches, None)


def process_prep_pass(enc, sents: list[str], processes: int) -> float:
    """A pass as `encode_chunks` runs it, but each window tokenized and packed in one of
    `processes` spawned processes (sentences/s, pool start-up excluded): the experiment for the
    lack of overlap between host and device work seen with preparing threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from sbert_flax.inference.encoder import MIN_WINDOW, WINDOW_BATCHES
    from sbert_flax.inference.window_stream import prefetch

    window = max(MIN_WINDOW, WINDOW_BATCHES * enc.max_batch_tokens // 32)
    with ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"), _prep_init,
                             (enc.tokenizer, enc.packer(), enc.max_seq_length)) as pool:
        list(pool.map(_prep_in_process, [(0, sents[:64])] * processes))  # start-up, imports
        t = time.perf_counter()
        # Threads only wait on the processes' futures, so windows arrive in order, ahead.
        dispatch_windows(enc, prefetch(lambda item: pool.submit(_prep_in_process, item).result(),
                                       enc._windows(sents, window), processes, processes + 1))
        return len(sents) / (time.perf_counter() - t)


def dispatch_windows(enc, windows) -> None:
    """`encode_chunks`' device side over prepared windows: their batches dispatched in order, each
    result filed into its window (a window from a worker process gets its result buffer here)."""
    import numpy as np

    pending: collections.deque = collections.deque()

    def batches():
        for w in windows:
            if w.result is None:
                w.result = np.zeros((w.size, enc.dim), np.float32)
            pending.append(w)
            yield from w.batches

    for batch, res in enc._run(batches(), enc.dtype, "sentence"):
        while pending[0].done:
            pending.popleft()
        pending[0].store(batch, res)


def encode_variants(enc, sents: list[str], clock: Clock, steps: dict) -> dict:
    """One timed pass per dispatch-side setting, the others as `enc` has them (sentences/s):
    the tokenizer's GIL-bounded pieces off (one encode_batch call a window), and more batches
    in flight (more queued device work to ride out host stalls)."""
    out = {"base": {"in_flight": enc.in_flight, "tokenize_chunk": enc.tokenizer.chunk,
                    "host_workers": enc.host_workers}}
    for name, attr, value in (("one_call_a_window", "chunk", 1 << 30),
                              ("in_flight_8", "in_flight", 8)):
        owner = enc.tokenizer if attr == "chunk" else enc
        old = getattr(owner, attr)
        setattr(owner, attr, value)
        try:
            with clock.step(f"encode variant {name}", steps, f"variant-{name}"):
                t = time.perf_counter()
                enc.encode(sents)
                out[name] = len(sents) / (time.perf_counter() - t)
        finally:
            setattr(owner, attr, old)
    # The GIL handed over sooner (the dispatching thread waits on the device, the preparing
    # thread holds the GIL in its Python stretches): a convoy would show here.
    old_si = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        with clock.step("encode variant switch_interval_0.2ms", steps, "variant-switch"):
            t = time.perf_counter()
            enc.encode(sents)
            out["switch_interval_0.2ms"] = len(sents) / (time.perf_counter() - t)
    finally:
        sys.setswitchinterval(old_si)
    with clock.step("encode variant process_prep (windows prepared in 2 processes)", steps,
                    "variant-process"):
        out["process_prep"] = process_prep_pass(enc, sents, processes=2)
    # The device side alone: every window prepared first, then only dispatch, copy back and
    # file the results, as encode_chunks does. Host-alone + this ~= a pass: nothing overlaps.
    windows = list(enc.prepared_windows(sents))
    with clock.step("encode variant dispatch_only (windows prepared before)", steps,
                    "variant-dispatch"):
        t = time.perf_counter()
        dispatch_windows(enc, windows)
        out["dispatch_only"] = len(sents) / (time.perf_counter() - t)
    return out
