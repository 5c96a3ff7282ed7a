"""One GPU lease (issue 16, item 4): bf16 encode and the MNRL train step, measured and profiled.

`bench/gpu_check.sh` runs the parts below, each in its own process under its own `timeout`; each
part merges its section into one JSON file (rewritten atomically after every measurement, so a
part that is killed still leaves what it measured):

  preflight  versions, device, git commit; a jitted forward + grad of a tiny SentenceEmbedder
             (a flax/jax mismatch fails here, in seconds); writes the random model folder.
  encode     SentenceEncoder, bf16, packed, on STS-B-zh test sentences repeated to >= 200k, at
             each token budget: a warm-up pass (compiles), timed passes (sentences/s, real
             tokens/s), the host side alone (tokenize + pack, no device call), and a
             `jax.profiler` trace of a slice: device busy fraction and the top 10 ops.
  train      the jitted MNRL train step on packed batches of nli-zh pairs (BERT-base, bf16,
             seq 128, global batch 256 / 1024): step time, sentences/s, tokens/s, MFU, with the
             default attention (dropout 0.1: the einsum path) and, at attention dropout 0,
             jax.nn.dot_product_attention with implementation "xla" vs "cudnn"; profiled too.
  st-encode  sentence-transformers (fp16 on CUDA) on the same sentences, for the ratio.

The model is a random BERT-base-sized Chinese BERT (12 layers, hidden 768, vocab 21128) written
with numpy (no torch needed). `--dry-run` shrinks everything (2 layers, hidden 64, a few thousand
sentences, batch 16, seq 32) so the whole thing runs on a CPU in under a minute: CI runs it, so
the profiling and parsing cannot rot.

    python bench/gpu_check.py preflight --json out.json --model /tmp/m [--dry-run]
    python bench/gpu_check.py encode --json out.json --model /tmp/m [--dry-run]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import gpu_profile  # noqa: E402

SCHEMA = 1
TRACE_ROOT = os.environ.get("GPU_CHECK_TRACES", "/tmp/gpu_check_traces")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "tokenizers",
            "transformers", "torch", "sentence-transformers", "jax-cuda13-plugin", "jax-cuda13-pjrt",
            "jax-cuda12-plugin", "jax-cuda12-pjrt", "grain")

# Train configurations, most wanted first (a part short of time skips from the end): batch 1024
# first (the MFU target's batch; the last lease's best, 31.9%, was xla there), then what could beat
# it; within a batch the GEMM shapes repeat, so XLA's in-process autotuning results make later
# compilations cheaper. (name, attention_impl, attention dropout or None for the model's 0.1 --
# cuDNN's fused attention has no dropout --, index into train_batches, dropout keys' PRNG:
# None is threefry, "unsafe_rbg" the hardware-friendly generator MaxText trains with).
TRAIN_CONFIGS = (
    ("xla", "xla", 0.0, 1, None), ("xla-rbg", "xla", 0.0, 1, "unsafe_rbg"),
    ("cudnn-rbg", "cudnn", 0.0, 1, "unsafe_rbg"), ("default-rbg", None, None, 1, "unsafe_rbg"),
    ("xla-rbg", "xla", 0.0, 0, "unsafe_rbg"), ("cudnn", "cudnn", 0.0, 1, None),
    ("default", None, None, 0, None), ("cudnn-rbg", "cudnn", 0.0, 0, "unsafe_rbg"),
)

# What each mode measures. GPU: the sizes; dry run: small enough for a CPU in CI.
SIZES = {
    False: dict(layers=12, hidden=768, heads=12, intermediate=3072, sentences=200_000,
                budgets=(16384, 65536, 4096), passes=1, profile_sentences=30_000, profile_batches=150,
                profile_max=60_000, host_workers=((0, 1, 2, 4), (1,)), encode_workers=(1, 2),
                extra_encode=(("cudnn", 16384),), train_batches=(256, 1024), seq_length=128,
                warmup_steps=2, steps=10, profile_steps=3, candidates=24, st_batch=256,
                st_sentences=None, train_configs=len(TRAIN_CONFIGS)),
    True: dict(layers=2, hidden=64, heads=4, intermediate=128, sentences=3000,
               budgets=(512, 2048), passes=1, profile_sentences=600, profile_batches=20,
               profile_max=1500, host_workers=((0, 1, 2), (1,)), encode_workers=(1, 2),
               extra_encode=(("cudnn", 1024),), train_batches=(16, 32), seq_length=32,
               warmup_steps=1, steps=3, profile_steps=2, candidates=6, st_batch=32,
               st_sentences=800, train_configs=3),
}


# ---- the JSON file ------------------------------------------------------------------------------

def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def update_json(path: str, section: str, value) -> None:
    """Sets `section` of the JSON file at `path` (temp file + rename: never half written)."""
    data = read_json(path)
    data.setdefault("schema", SCHEMA)
    data[section] = value
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


class Clock:
    """Wall time since the part started, a deadline, and timed, printed sub-steps."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    @contextlib.contextmanager
    def step(self, name: str, record: dict | None = None, key: str | None = None):
        t = time.perf_counter()
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        yield
        dt = time.perf_counter() - t
        if record is not None:
            record[key or name] = round(dt, 3)
        print(f"[{self.elapsed():6.1f}s] {name}: {dt:.2f} s", flush=True)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:800]}"


def _close_item(rec: dict, t_item: float, worst: float | None, path: str, part: str,
                section: dict) -> float | None:
    """Stamps an item's wall time, rewrites the part's JSON; returns the longest successful item
    so far (what the next one may take, for the part's time budget)."""
    rec["wall_s"] = round(time.perf_counter() - t_item, 3)
    if "error" not in rec:
        worst = max(worst or 0.0, rec["wall_s"])
    update_json(path, part, section)
    return worst


# ---- the random model -----------------------------------------------------------------------------

def make_model_dir(path: str, sizes: dict, vocab: str) -> str:
    """A random HF BERT folder (config.json, model.safetensors, tokenizer) written with numpy.

    Reused when its config.json already describes these sizes."""
    import numpy as np
    from safetensors.numpy import save_file

    from sbert_flax.checkpoints.weight_maps import hf_ports
    from sbert_flax.inference.tokenization import load_tokenizer
    from sbert_flax.models.config import BertConfig

    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=sizes["hidden"],
                     num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                     intermediate_size=sizes["intermediate"])
    want = cfg.to_hf_dict()
    if read_json(os.path.join(path, "config.json")) == json.loads(json.dumps(want)) and \
            os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    rng = np.random.default_rng(0)
    state = {}
    for port in hf_ports(cfg):
        for key, shape in zip(port.hf, port.hf_shapes, strict=True):
            if key.endswith("LayerNorm.weight"):
                state[key] = np.ones(shape, np.float32)
            elif key.endswith(".bias"):
                state[key] = np.zeros(shape, np.float32)
            else:  # BERT's init: normal(0, 0.02)
                state[key] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1)
    load_tokenizer(vocab).save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _vocab() -> str:
    from sbert_flax.common.devdata import data_dir, data_path

    p = data_path("vocab", "google_zh_vocab.txt")
    if p is None:
        sys.exit(f"vocab/google_zh_vocab.txt not found under {data_dir()}: set SBERT_FLAX_DATA")
    return p


def _sentences(n: int) -> tuple[list[str], int]:
    """STS-B-zh test sentences repeated to at least `n` (all of them, then the next repeat)."""
    from common import stsb_sentences

    distinct = stsb_sentences("test")
    return distinct * max(1, math.ceil(n / len(distinct))), len(distinct)


# ---- preflight --------------------------------------------------------------------------------------

def _git() -> dict:
    out = {"commit": os.environ.get("GIT_COMMIT") or None, "dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(_HERE))
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10,
                                    cwd=os.path.dirname(_HERE))
            out["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or r.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return _error(e)


def preflight(args, sizes: dict) -> None:
    clock = Clock(args.budget_s)
    env: dict = {"python": platform.python_version(), "host": platform.node(),
                 "dry_run": args.dry_run, "git": _git(), "nvidia_smi": _nvidia_smi(),
                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "PYTHONPATH": os.environ.get("PYTHONPATH"),
                 "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                 "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                 "versions": {}}
    for p in PACKAGES:
        try:
            env["versions"][p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    update_json(args.json, "env", env)
    with clock.step("import jax, flax, sbert_flax", env, "import_s"):
        import flax
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import sbert_flax.inference.encoder  # noqa: F401  (orbax, tokenizers, the whole encode path)
        from sbert_flax.models.config import BertConfig, PoolingConfig
        from sbert_flax.models.embedder import abstract_embedder
        from sbert_flax.training import losses, optim, state, step  # noqa: F401
    env["modules"] = {"jax": jax.__version__, "flax": flax.__version__,
                      "flax_file": flax.__file__, "jax_file": jax.__file__}
    dev = jax.devices()[0]
    env["device"] = {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
                     "all": [str(d) for d in jax.devices()]}
    print(json.dumps({k: env[k] for k in ("versions", "modules", "device", "git")}, indent=1), flush=True)
    update_json(args.json, "env", env)
    with clock.step("tiny SentenceEmbedder forward + grad (flax/jax check)", env, "sanity_s"):
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37)
        # Abstract + filled (eager random init is one dispatch per param: seconds on a CPU).
        graphdef, abstract = abstract_embedder(cfg, PoolingConfig("mean"), jnp.bfloat16)
        params = jax.tree.map(lambda a: jnp.full(a.shape, 0.02, a.dtype), abstract)
        ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64

        def loss(p):
            return nnx.merge(graphdef, p)(ids, jnp.ones_like(ids)).sum()

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        ok = bool(jnp.isfinite(value)) and all(bool(jnp.all(jnp.isfinite(g)))
                                               for g in jax.tree.leaves(grads))
        if not ok:
            raise RuntimeError("the tiny embedder's loss or gradients are not finite")
    with clock.step("random model folder", env, "model_s"):
        make_model_dir(args.model, sizes, _vocab())
    env["model_dir"] = args.model
    update_json(args.json, "env", env)


# ---- encode ------------------------------------------------------------------------------------------

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


@contextlib.contextmanager
def traced(name: str):
    """A `jax.profiler` trace into TRACE_ROOT/name; yields a dict that gets the trace's dir."""
    import jax

    d = os.path.join(TRACE_ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, exist_ok=True)
    info = {"dir": d}
    with jax.profiler.trace(d, create_perfetto_trace=True):
        yield info


def profile_summary(info: dict, wall_s: float) -> dict:
    t = time.perf_counter()
    out = gpu_profile.summarize_dir(info["dir"], wall_s)
    out["parse_s"] = round(time.perf_counter() - t, 3)
    return out


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
    for name, attr, value in (("one_call_a_window", "chunk", 1 << 30), ("in_flight_8", "in_flight", 8)):
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
    with clock.step("encode variant dispatch_only (windows prepared before)", steps, "variant-dispatch"):
        t = time.perf_counter()
        dispatch_windows(enc, windows)
        out["dispatch_only"] = len(sents) / (time.perf_counter() - t)
    return out


def encode(args, sizes: dict) -> None:
    clock = Clock(args.budget_s)
    import jax

    from sbert_flax.checkpoints.loading import load_model
    from sbert_flax.inference.encoder import SentenceEncoder

    sents, distinct = _sentences(sizes["sentences"])
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
                with clock.step(f"encode {key}: host side alone (tokenize + pack)", rec["steps_s"], "host"):
                    rec["host"] = host_side(enc, sents, budget,
                                            sizes["host_workers"][0 if first else 1])
                rec["encode_over_host_rate"] = rec["sentences_per_s"] / rec["host"]["sentences_per_s"]
                update_json(args.json, args.section, section)
            # The trace's size goes with the number of batches, not sentences: a big budget's
            # slice is longer (and spans more than its first window where the run allows).
            per_sentence = max(1.0, s.real_tokens / len(sents))
            part = sents[:min(sizes["profile_max"], max(sizes["profile_sentences"],
                              int(sizes["profile_batches"] * budget / per_sentence)))]
            enc.encode(part)  # the slice's own last batch may be a shape the passes never ran
            with clock.step(f"encode {key}: profiled pass of {len(part)} sentences", rec["steps_s"], "profile"):
                with traced(f"encode-{key}") as info:
                    t = time.perf_counter()
                    enc.encode(part)
                    wall = time.perf_counter() - t
                prof = profile_summary(info, wall)
            prof.update(sentences=len(part), sentences_per_s=len(part) / wall)
            rec["profile"] = prof
            print(f"  {key}: {rec['sentences_per_s']:,.0f} sentences/s, {rec['tokens_per_s']:,.0f} "
                  f"tokens/s, host alone {rec.get('host', {}).get('sentences_per_s', float('nan')):,.0f} "
                  f"sentences/s, busy {prof.get('busy_fraction')} ({prof['source']})", flush=True)
        except Exception as e:  # one failed budget must not cost the others
            traceback.print_exc()
            rec["error"] = _error(e)
        worst = _close_item(rec, t_item, worst, args.json, args.section, section)


# ---- train -------------------------------------------------------------------------------------------

def read_pairs(path: str) -> list[tuple[str, str]]:
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
    from sbert_flax.inference.tokenization import bucket_for

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
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        return None
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


def train(args, sizes: dict) -> None:
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
    section: dict = {"model_dir": args.model, "dtype": "bfloat16", "loss": "mnrl", "seq_length": seq,
                     "pooling": pre.pooling, "pairs": len(pairs), "devices": n_dev, "device_kind": kind,
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
            with clock.step(f"train {name} b{batch}: first step (compiles)", rec["steps_s"], "compile"):
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
                       padded_tokens_per_s=rows * length / step_s, model_tflops_per_s=flops_s / 1e12,
                       mfu=flops.mfu(flops_s, peak, n_dev), loss=float(host["loss"]),
                       finite=bool(host["finite"]), compilations=counter.count,
                       peak_memory_gib=_peak_memory(jax.devices()[0]))
            update_json(args.json, "train", section)
            k = sizes["profile_steps"]
            with clock.step(f"train {name} b{batch}: {k} profiled steps", rec["steps_s"], "profile"):
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
                  f"{'n/a' if mfu is None else f'{mfu:.1%}'}, busy {rec['profile'].get('busy_fraction')}",
                  flush=True)
            del st, m
        except Exception as e:  # e.g. cuDNN attention refusing a shape: record it, go on
            traceback.print_exc()
            rec["error"] = _error(e)
        worst = _close_item(rec, t_item, worst, args.json, "train", section)


# ---- sentence-transformers ---------------------------------------------------------------------------

def st_encode(args, sizes: dict) -> None:
    clock = Clock(args.budget_s)
    section: dict = {"steps_s": {}}
    update_json(args.json, "st_encode", section)
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    sents, distinct = _sentences(sizes["sentences"])
    sents = sents[:sizes["st_sentences"]] if sizes["st_sentences"] else sents
    distinct = min(distinct, len(sents))
    section.update(device=device, dtype=str(dtype).replace("torch.", ""), batch_size=sizes["st_batch"],
                   sentences=len(sents), torch=torch.__version__,
                   gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    with clock.step("sentence-transformers: load + warm-up on the distinct sentences", section["steps_s"], "warmup"):
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
    print(f"  sentence-transformers {section['dtype']}: {section['sentences_per_s']:,.0f} sentences/s"
          f"; sbert-flax bf16 / ST: {section.get('sbert_flax_over_st')}", flush=True)
    update_json(args.json, "st_encode", section)


# ---- bookkeeping ---------------------------------------------------------------------------------------

def record_step(args) -> None:
    steps = read_json(args.json).get("steps", [])
    steps.append({"part": args.part, "wall_s": args.wall_s, "rc": args.rc,
                  "timed_out": args.rc in (124, 137)})
    update_json(args.json, "steps", steps)


def summary(args) -> None:
    """A short table of the JSON file's results, for the end of the log."""
    d = read_json(args.json)
    env = d.get("env", {})
    print(f"device {env.get('device', {}).get('kind')}; jax {env.get('modules', {}).get('jax')}, "
          f"flax {env.get('modules', {}).get('flax')}; commit {env.get('git', {}).get('commit')}")
    for s in d.get("steps", []):
        print(f"  part {s['part']}: {s['wall_s']:.1f} s, rc {s['rc']}")
    enc = d.get("encode", {})
    for key, r in {**enc.get("budgets", {}), **enc.get("extra", {})}.items():
        p = r.get("profile", {})
        print(f"encode {key}: " + (f"{r['sentences_per_s']:,.0f} sent/s, {r['tokens_per_s']:,.0f} tok/s, "
                                    f"host {r.get('host', {}).get('sentences_per_s', 0):,.0f} sent/s "
                                    f"(by workers {r.get('sentences_per_s_by_host_workers')}), "
                                    f"busy {p.get('busy_fraction')} [{p.get('source')}]"
                                    if "sentences_per_s" in r else r.get("error") or r.get("skipped") or "?"))
    for r in d.get("train", {}).get("configs", []):
        head = f"train {r['name']} ({r['attention_impl']}, {r.get('prng_impl')}) b{r['global_batch']}: "
        if "step_ms" in r:
            mfu = r.get("mfu")
            print(head + f"{r['step_ms']:.1f} ms, {r['sentences_per_s']:,.0f} sent/s, "
                  f"{r['tokens_per_s']:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}")
        else:
            print(head + str(r.get("error") or r.get("skipped") or "?"))
    st = d.get("st_encode", {})
    if "sentences_per_s" in st:
        print(f"sentence-transformers {st['dtype']}: {st['sentences_per_s']:,.0f} sent/s; "
              f"sbert-flax / ST {st.get('sbert_flax_over_st')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["preflight", "encode", "train", "st-encode", "record-step", "summary"])
    ap.add_argument("--json", required=True, help="the result file (sections merged in)")
    ap.add_argument("--model", help="random model folder (written by preflight)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, for a CPU")
    ap.add_argument("--section", default="encode",
                    help="encode: the JSON section it writes (a rerun under other settings)")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="seconds this part may take: it skips what no longer fits")
    ap.add_argument("--part", dest="step_part", help="record-step: the part's name")
    ap.add_argument("--wall-s", type=float, help="record-step: its wall seconds")
    ap.add_argument("--rc", type=int, help="record-step: its exit code")
    args = ap.parse_args()
    if args.part == "record-step":
        args.part = args.step_part
        return record_step(args)
    if args.part == "summary":
        return summary(args)
    if not args.model:
        ap.error("--model is required")
    sizes = SIZES[args.dry_run]
    {"preflight": preflight, "encode": encode, "train": train, "st-encode": st_encode}[args.part](args, sizes)


if __name__ == "__main__":
    main()
