"""What each mode of the GPU lease measures: the GPU sizes, the dry run's, the train configs.

The GPU mode measures the issue's sizes on a random BERT-base-sized Chinese BERT (12 layers,
hidden 768, vocab 21128). `--dry-run` shrinks everything (2 layers, hidden 64, a few thousand
sentences, batch 16, seq 32) so the whole lease runs on a CPU in minutes: CI runs it, so the
profiling and parsing cannot rot.
"""

from __future__ import annotations

import os

SCHEMA = 1  # of the result JSON file
TRACE_ROOT = os.environ.get("GPU_CHECK_TRACES", "/tmp/gpu_check_traces")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes",
            "tokenizers", "transformers", "torch", "sentence-transformers", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "grain")

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
                budgets=(16384, 65536, 4096), passes=1, profile_sentences=30_000,
                profile_batches=150, profile_max=60_000, host_workers=((0, 1, 2, 4), (1,)),
                encode_workers=(1, 2), extra_encode=(("cudnn", 16384),), train_batches=(256, 1024),
                seq_length=128, warmup_steps=2, steps=10, profile_steps=3, candidates=24,
                st_batch=256, st_sentences=None, train_configs=len(TRAIN_CONFIGS)),
    True: dict(layers=2, hidden=64, heads=4, intermediate=128, sentences=3000,
               budgets=(512, 2048), passes=1, profile_sentences=600, profile_batches=20,
               profile_max=1500, host_workers=((0, 1, 2), (1,)), encode_workers=(1, 2),
               extra_encode=(("cudnn", 1024),), train_batches=(16, 32), seq_length=32,
               warmup_steps=1, steps=3, profile_steps=2, candidates=6, st_batch=32,
               st_sentences=800, train_configs=3),
}
