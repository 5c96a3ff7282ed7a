"""Ahead-of-time compilation for TPU slices on a host without one (`sbert-flax compile`).

`topology` gives compile-only TPU devices (libtpu, the `tpu` extra); `run_model` resolves the
run's model as the Trainer does; `programs` lowers the real train step, evaluator and encode
programs for them; `measure` compiles them and reports memory per chip,
whether it fits in HBM, and FLOPs per step; `command` is the CLI. Nothing is imported here, so
that building the CLI's parser imports no JAX.
"""
