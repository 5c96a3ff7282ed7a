"""The `sbert-flax` console script: one module per command; `--help` imports no JAX."""
