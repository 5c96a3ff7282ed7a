"""`create_app` in-process (httpx over ASGI, no sockets) on an injected fake backend: a replica
that cannot serve -- its warm-up failed, or it is draining for shutdown -- answers 503 with
Retry-After and TEI's JSON error shape, on the embedding routes and on /health."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from sbert_flax.serving import create_app
from sbert_flax.serving.backend import EncoderBackend
from sbert_flax.serving.settings import ServeSettings


class FakeBackend(EncoderBackend):
    """Two-token inputs, [1, 0, 0, 0] embeddings; `fail_warmup` makes the warm-up raise, as a
    device that cannot compile would."""

    dim = 4
    max_seq_length = 8
    max_batch_tokens = 64
    num_compiles = 0
    dtype = "float32"
    pooling = "mean"
    lowercase_text = False

    def __init__(self, fail_warmup: bool = False):  # no encoder behind it
        self.fail_warmup = fail_warmup

    def tokenize(self, texts, *, truncate, direction):
        return [np.array([101, 102], np.int32) for _ in texts]

    def warmup(self) -> int:
        if self.fail_warmup:
            raise RuntimeError("no device")
        return 1

    def embed_ids(self, ids):
        return np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(ids), 1))


REQUESTS = [("/embed", {"inputs": ["a", "b"]}), ("/v1/embeddings", {"input": "a"}),
            ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}})]


def _app(backend: FakeBackend):
    app = create_app(backend, ServeSettings())
    return app, app.state.server.batcher


def _assert_503(r: httpx.Response, needle: str) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers.get("retry-after", "0")) > 0, dict(r.headers)
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "unhealthy", body
    assert needle in body["error"], body


async def _call(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.post(path, json=body) for path, body in requests], \
            await client.get("/health")


def test_failed_warmup_answers_503_with_retry_after():
    app, batcher = _app(FakeBackend(fail_warmup=True))
    batcher.start()  # what the lifespan does; ASGITransport runs no lifespan
    try:
        deadline = time.monotonic() + 10
        while batcher.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        answers, health = asyncio.run(_call(app, REQUESTS))
    finally:
        batcher.stop(timeout=10)
    for r in answers:
        _assert_503(r, "failed to warm up: no device")
    _assert_503(health, "failed to warm up")


def test_draining_answers_503_with_retry_after():
    app, batcher = _app(FakeBackend())
    batcher.start()
    try:
        assert batcher.ready.wait(10)
        good, health = asyncio.run(_call(app, REQUESTS[:1]))
        assert good[0].status_code == 200 and health.status_code == 200
        batcher.stop(timeout=10)  # what the lifespan's shutdown does: drain, take nothing new
        answers, health = asyncio.run(_call(app, REQUESTS))
    finally:
        batcher.stop(timeout=10)
    for r in answers:
        _assert_503(r, "draining")
    _assert_503(health, "draining")


def test_settings_refuse_bad_timeouts_and_worker_counts():
    for kw, needle in [({"request_timeout": 0}, "request_timeout"),
                       ({"request_timeout": float("nan")}, "request_timeout"),
                       ({"tokenization_workers": 0}, "tokenization_workers"),
                       ({"max_consecutive_failures": 0}, "max_consecutive_failures")]:
        with pytest.raises(ValueError, match=needle):
            ServeSettings(**kw)
    assert 1 <= ServeSettings().tokenizer_threads <= 4
    assert ServeSettings(tokenization_workers=7).tokenizer_threads == 7
