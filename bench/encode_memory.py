"""Benchmark: memory of streaming corpus encoding is flat in the corpus size.

`sbert-flax encode`'s library path (`corpus.encode_file`) on 10k and 1M short Chinese lines with a
tiny random model (2 layers, hidden 64: the model is not what is measured), each size in a fresh
subprocess. Reports peak RSS (ru_maxrss) and the peak bytes of live JAX device buffers (sampled
at every batch dispatch; on CPU the "device" is host memory, on GPU/TPU it is HBM), plus
sentences/s. Flat means the 1M figures are within a few MB of the 10k ones.

    python bench/encode_memory.py                 # 10k and 1M lines
    python bench/encode_memory.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import random_bert_dir  # noqa: E402

CHARS = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
         "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经")


def tiny_model_dir() -> str:
    return random_bert_dir("bert-tiny-zh-random", hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)


def child(model: str, path: str) -> None:
    """Runs in the subprocess: encode the file, print one JSON line of measurements."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from sbert_flax.inference.corpus import encode_file
    from sbert_flax.inference.encoder import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(model, devices=jax.local_devices()[:1])
    peak = [0]
    trace: list[tuple[float, int]] = []  # (current RSS MB, compiled shapes so far) per dispatch
    dispatch = enc._dispatch
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def sampled(*a, **k):
        peak[0] = max(peak[0], sum(x.nbytes for x in jax.live_arrays()))
        with open("/proc/self/statm") as f:
            trace.append((int(f.read().split()[1]) * page_mb, enc.num_compiles))
        return dispatch(*a, **k)

    enc._dispatch = sampled
    out = path + ".npy"
    t0 = time.perf_counter()
    res = encode_file(enc, path, out)
    secs = time.perf_counter() - t0
    os.remove(out)
    # Where RSS stands a tenth of the way in vs at the end: growth after the first tenth is what
    # would scale with the corpus; before it, one-off costs (compiled shapes, allocator arenas).
    tenth = trace[len(trace) // 10]
    print(json.dumps({"lines": res.total_rows, "seconds": secs,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_tenth_mb": tenth[0], "rss_last_mb": trace[-1][0],
                      "compiles_tenth": tenth[1], "compiles": enc.num_compiles,
                      "peak_device_mb": peak[0] / 2**20,
                      "params_mb": sum(x.nbytes for x in jax.tree.leaves(enc.params)) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    model = tiny_model_dir()
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            path = os.path.join(tmp, f"lines-{n}.txt")
            with open(path, "w", encoding="utf-8") as f:
                for _ in range(n):
                    f.write("".join(rng.choice(CHARS) for _ in range(rng.randint(4, 30))) + "\n")
            out = subprocess.run([sys.executable, __file__, "--child", model, path], check=True,
                                 capture_output=True, text=True, env=dict(os.environ, SBERT_FLAX_COMPILATION_CACHE="0"))
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(rec)
            print(rec, flush=True)
    print("\n| lines | peak RSS (MB) | RSS at 1/10 -> end (MB) | compiled shapes at 1/10 -> end "
          "| peak live device buffers (MB) | params (MB) | sentences/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lines']:,} | {r['peak_rss_mb']:.0f} | {r['rss_tenth_mb']:.0f} -> "
              f"{r['rss_last_mb']:.0f} | {r['compiles_tenth']} -> {r['compiles']} | "
              f"{r['peak_device_mb']:.1f} | {r['params_mb']:.1f} | {r['lines'] / r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
