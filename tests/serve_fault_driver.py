"""A server on a fault-injecting fake backend: `FaultyBackend`, for tests/test_serving_faults.py.

Run as a script (`python tests/serve_fault_driver.py PORT`), it serves that backend through
`sbert_flax.serving.command.serve`, the same uvicorn run as `sbert-flax serve`, and exits with
its exit code, so a test can watch the process die when the worker does.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from sbert_flax.serving.backend import EncoderBackend


class WorkerCrash(BaseException):
    """Escapes every `except Exception`: the batcher's worker thread itself ends."""


class FaultyBackend(EncoderBackend):
    """Two-token inputs whose first id says what goes wrong on the device.

    Texts: "boom" raises RuntimeError in the device call; "garbage" returns rows that cannot be
    written back (strings); "crash" raises WorkerCrash; "hold" blocks in the device call until
    `gate` is set; "queued" is a normal input with its own marker (to see whether it ran); any
    other text embeds to [1, 0, 0, 0].
    """

    dim = 4
    max_seq_length = 8
    max_batch_tokens = 64
    num_compiles = 0
    dtype = "float32"
    pooling = "mean"
    lowercase_text = False
    MARKERS = {"boom": 7, "garbage": 70, "crash": 71, "hold": 72, "queued": 73}
    PLAIN = 101

    def __init__(self):  # no encoder behind it
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def tokenize(self, texts, *, truncate, direction):
        return [np.array([self.MARKERS.get(t, self.PLAIN), 102], np.int32) for t in texts]

    def tokens(self, texts, add_special_tokens):
        return [[{"id": self.PLAIN, "text": t, "special": False, "start": 0, "stop": len(t)}]
                for t in texts]

    def warmup(self) -> int:
        return 1

    def embed_ids(self, ids):
        markers = [int(x[0]) for x in ids]
        self.batches.append(markers)
        if self.MARKERS["hold"] in markers:
            self.entered.set()
            self.gate.wait(30)
        if self.MARKERS["crash"] in markers:
            raise WorkerCrash("the worker thread was killed")
        if self.MARKERS["boom"] in markers:
            raise RuntimeError("device error")
        out = np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(ids), 1))
        if self.MARKERS["garbage"] in markers:
            return np.full(out.shape, "x", object)  # the right shape, but not numbers
        return out


def main(port: int) -> int:
    from sbert_flax.serving import ServeSettings, create_app
    from sbert_flax.serving.command import serve

    app = create_app(FaultyBackend(), ServeSettings(max_consecutive_failures=3))
    return serve(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
