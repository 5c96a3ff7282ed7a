"""Small helpers every layer uses: files written whole, the error policy, host arrays, the device mesh,
`jax.distributed`, XLA compile options, where test data lives."""
