"""The pieces of `serving.batcher.Batcher`, one concern each; `serving/batcher.py` assembles them
and says which thread owns which field.

- `jobs`: a request's `Job`, the errors it fails with, resolving its future on its event loop.
- `state`: `BatchState`, every field more than one thread touches, under one condition.
- `intake`: the queue: admit, expect / arrived, cancel, wait for work, take a round.
- `worker`: the worker thread: warm up, take, pack and launch each round.
- `collector`: the collector thread: wait for a round's rows, write them back.
- `supervision`: failure counting, the watchdog, the batcher's death, the drain of `stop`.
"""
