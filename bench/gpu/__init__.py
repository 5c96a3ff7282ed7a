"""One GPU lease (issue 16, item 4): bf16 encode and the MNRL train step, measured and profiled.

`bench/gpu_check.sh` runs each part in its own process (`python3 bench/gpu_check.py PART`) under
its own `timeout`; each part merges its section into one JSON file (`result_file`: rewritten
atomically after every measurement, so a part that is killed still leaves what it measured).
One module per part, each saying what it measures:

  preflight        versions, device, git commit, a flax/jax check; writes the random model.
  encode           SentenceEncoder bf16 at each token budget: passes, host side, profile
                   (with `encode_host` and `encode_variants`).
  train            the jitted MNRL train step: step time, tokens/s, MFU, profiled.
  st_encode        sentence-transformers on the same sentences, for the ratio.

and what they share: `sizes` (what each mode measures), `inputs` (the random model and the
sentences), `profiling` (a `jax.profiler` trace and its device busy time / top ops),
`result_file` (the JSON file, the part clock, the closing summary).

Imported as `gpu.<module>` with `bench/` on `sys.path` (as `bench/gpu_check.py` puts it), never
by bare module name: `gpu.encode` is not `bench/encode.py`.
"""
