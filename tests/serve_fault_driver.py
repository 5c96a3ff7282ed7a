"""A server on a fault-injecting fake backend: `FaultyBackend`, for the serving tests.

Run as a script (`python tests/serve_fault_driver.py PORT [REQUEST_TIMEOUT]`), it serves that
backend through `sbert_flax.cli.serve.serve`, the same uvicorn run as `sbert-flax serve`,
and exits with its exit code, so a test can watch the process die when the worker does.
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
    `gate` is set; "hang" blocks in it for good (a device that never answers); "queued" is a
    normal input with its own marker (to see whether it ran); "tokfail" fails in the tokenizer (a
    bug: the request gets 500); any other text embeds to [1, 0, 0, 0]. /embed_all gives each
    input two tokens of [0, 1, 0, 0], under the same faults.
    """

    dim = 4
    max_seq_length = 8
    max_batch_tokens = 64
    num_compiles = 0
    dtype = "float32"
    pooling = "mean"
    lowercase_text = False
    token_output = True
    MARKERS = {"boom": 7, "garbage": 70, "crash": 71, "hold": 72, "queued": 73, "hang": 74}
    PLAIN = 101

    def __init__(self):  # no encoder behind it
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def tokenize(self, texts, *, truncate, direction):
        if "tokfail" in texts:
            raise RuntimeError("tokenizer bug")
        return [np.array([self.MARKERS.get(t, self.PLAIN), 102], np.int32) for t in texts]

    def tokens(self, texts, add_special_tokens):
        return [[{"id": self.PLAIN, "text": t, "special": False, "start": 0, "stop": len(t)}]
                for t in texts]

    def warmup(self) -> int:
        return 1

    def _device(self, ids) -> list[int]:
        """The faults every device call shares; returns the round's markers."""
        markers = [int(x[0]) for x in ids]
        self.batches.append(markers)
        if self.MARKERS["hold"] in markers:
            self.entered.set()
            self.gate.wait(30)
        if self.MARKERS["hang"] in markers:
            threading.Event().wait()  # never set: only the process's exit ends this thread
        if self.MARKERS["crash"] in markers:
            raise WorkerCrash("the worker thread was killed")
        if self.MARKERS["boom"] in markers:
            raise RuntimeError("device error")
        return markers

    def embed_ids(self, ids):
        markers = self._device(ids)
        out = np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(ids), 1))
        if self.MARKERS["garbage"] in markers:
            return np.full(out.shape, "x", object)  # the right shape, but not numbers
        return out

    def embed_tokens(self, ids):
        self._device(ids)
        return [np.tile(np.array([[0, 1, 0, 0]], np.float32), (len(x), 1)) for x in ids]


def main(port: int, request_timeout: float = 60.0) -> int:
    from sbert_flax.cli.serve import serve
    from sbert_flax.serving import ServeSettings, create_app

    app = create_app(FaultyBackend(), ServeSettings(max_consecutive_failures=3,
                                                    request_timeout=request_timeout))
    return serve(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), *map(float, sys.argv[2:3])))
