"""`create_app` in-process (httpx over ASGI, no sockets) on an injected fake backend, its lifespan
driven as an ASGI server drives it: a replica that cannot serve -- its warm-up failed, or its
shutdown is draining it -- answers 503 with Retry-After and TEI's JSON error shape, on the
embedding routes (/embed_all included: it goes through the batcher) and on /health; the limits'
help says TEI's statuses."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import wait_for

from sbert_flax.serving import create_app
from sbert_flax.serving.backend import EncoderBackend
from sbert_flax.serving.settings import ServeSettings

WAIT_S = 120  # ceiling of every wait on the server's threads (a loaded CI host is slow)


class FakeBackend(EncoderBackend):
    """Two-token inputs, [1, 0, 0, 0] embeddings (/embed_all: two tokens of [0, 1, 0, 0]);
    `fail_warmup` makes the warm-up raise, as a device that cannot compile would; while `gate`
    is clear a device call blocks (`entered` is set once one does)."""

    dim = 4
    max_seq_length = 8
    max_batch_tokens = 64
    num_compiles = 0
    dtype = "float32"
    pooling = "mean"
    lowercase_text = False
    token_output = True

    def __init__(self, fail_warmup: bool = False):  # no encoder behind it
        self.fail_warmup = fail_warmup
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def tokenize(self, texts, *, truncate, direction):
        return [np.array([101, 102], np.int32) for _ in texts]

    def warmup(self) -> int:
        if self.fail_warmup:
            raise RuntimeError("no device")
        return 1

    def _device(self) -> None:
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never released the device"

    def embed_ids(self, ids):
        self._device()
        return np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(ids), 1))

    def embed_tokens(self, ids):
        self._device()
        return [np.tile(np.array([[0, 1, 0, 0]], np.float32), (len(x), 1)) for x in ids]


class Lifespan:
    """An ASGI app's lifespan, driven as uvicorn drives it: `startup()` before any request,
    `shutdown()` (awaitable in a task) when the server stops."""

    def __init__(self, app):
        self.app = app
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Future | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        message = await asyncio.wait_for(self.outbox.get(), WAIT_S)
        assert message["type"] == "lifespan.startup.complete", message

    async def shutdown(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        message = await asyncio.wait_for(self.outbox.get(), WAIT_S)
        assert message["type"] == "lifespan.shutdown.complete", message
        await asyncio.wait_for(self.task, WAIT_S)


REQUESTS = [("/embed", {"inputs": ["a", "b"]}), ("/v1/embeddings", {"input": "a"}),
            ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}),
            ("/embed_all", {"inputs": "a"})]


def _assert_503(r: httpx.Response, needle: str) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers.get("retry-after", "0")) > 0, dict(r.headers)
    body = r.json()
    if "message" in body:  # TEI's OpenAI-compatible error on the OpenAI routes
        assert body["code"] == 503 and body["error_type"] == "Unhealthy", body
        message = body["message"]
    else:
        assert set(body) == {"error", "error_type"} and body["error_type"] == "Unhealthy", body
        message = body["error"]
    assert needle in message, body


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=WAIT_S)


def test_failed_warmup_answers_503_with_retry_after():
    app = create_app(FakeBackend(fail_warmup=True), ServeSettings())
    batcher = app.state.server.batcher

    async def run():
        life = Lifespan(app)
        await life.startup()
        try:
            # The warm-up runs on the batcher's thread after the startup: wait for its verdict.
            assert await asyncio.to_thread(wait_for, lambda: batcher.error is not None), \
                "the warm-up never failed"
            async with _client(app) as client:
                return [await client.post(p, json=b) for p, b in REQUESTS], \
                    await client.get("/health")
        finally:
            await life.shutdown()

    answers, health = asyncio.run(run())
    for r in answers:
        _assert_503(r, "failed to warm up: no device")
    _assert_503(health, "failed to warm up")


def test_lifespan_shutdown_drains_in_flight_work_and_refuses_new():
    """The shutdown path a server takes on SIGTERM (the app's lifespan shutdown) while a request
    is on the device: /health turns 503 "draining" at once, new requests get 503 with
    Retry-After (/embed_all too), the request in flight still gets its embeddings, and the
    shutdown completes once it has."""
    backend = FakeBackend()
    app = create_app(backend, ServeSettings())

    async def run():
        life = Lifespan(app)
        await life.startup()
        async with _client(app) as client:
            assert await asyncio.to_thread(app.state.server.batcher.ready.wait, WAIT_S)
            assert (await client.get("/health")).status_code == 200
            backend.entered.clear()  # the warm-up's test batch went through the device too
            backend.gate.clear()
            held = asyncio.ensure_future(client.post("/embed", json={"inputs": ["in flight"]}))
            assert await asyncio.to_thread(backend.entered.wait, WAIT_S), "never on the device"
            stopping = asyncio.ensure_future(life.shutdown())
            deadline = time.monotonic() + WAIT_S
            while (health := await client.get("/health")).status_code == 200:
                assert time.monotonic() < deadline, "/health never turned 503 in the drain"
                await asyncio.sleep(0.01)
            refused = [await client.post(p, json=b) for p, b in REQUESTS]
            assert not stopping.done(), "the shutdown did not wait for the request in flight"
            backend.gate.set()
            done = await held
            await stopping
        return health, refused, done

    health, refused, done = asyncio.run(run())
    _assert_503(health, "draining")
    for r in refused:
        _assert_503(r, "draining")
    assert done.status_code == 200 and done.json() == [[1, 0, 0, 0]], done.text


def test_embed_all_waits_for_the_warmup_like_embed(tiny_bert, one_device):
    """/embed_all runs on the batcher, not beside it: on a real encoder whose warm-up failed it
    answers 503 as /embed does (it used to run the encoder on a thread of its own and answer
    200 from a replica that /health calls broken)."""
    from sbert_flax import SentenceEncoder

    class WarmupFails(EncoderBackend):
        def warmup(self) -> int:
            raise RuntimeError("no device")

    encoder = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean"), max_seq_length=16,
                                              devices=one_device, max_batch_tokens=16)
    app = create_app(WarmupFails(encoder), ServeSettings())
    batcher = app.state.server.batcher

    async def run():
        life = Lifespan(app)
        await life.startup()
        try:
            assert await asyncio.to_thread(wait_for, lambda: batcher.error is not None)
            async with _client(app) as client:
                return [await client.post(p, json={"inputs": ["你好"]})
                        for p in ("/embed", "/embed_all")]
        finally:
            await life.shutdown()

    for r in asyncio.run(run()):
        _assert_503(r, "failed to warm up: no device")


def test_settings_refuse_bad_timeouts_and_worker_counts():
    for kw, needle in [({"request_timeout": 0}, "request_timeout"),
                       ({"request_timeout": float("nan")}, "request_timeout"),
                       ({"tokenization_workers": 0}, "tokenization_workers"),
                       ({"max_consecutive_failures": 0}, "max_consecutive_failures")]:
        with pytest.raises(ValueError, match=needle):
            ServeSettings(**kw)
    assert 1 <= ServeSettings().tokenizer_threads <= 4
    assert ServeSettings(tokenization_workers=7).tokenizer_threads == 7


def test_help_and_settings_name_the_statuses_served():
    """Too many or too long inputs get 422 (as TEI); only the payload limit is 413."""
    from sbert_flax.cli.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for option in ("--max-input-length", "--max-client-batch-size", "--auto-truncate"):
        assert "422" in helps[option] and "413" not in helps[option], (option, helps[option])
    assert "413" in helps["--payload-limit"]
    doc = ServeSettings.__doc__
    limits = doc[doc.index("max_client_batch_size:"):doc.index("max_concurrent_requests:")]
    assert "422" in limits and "413" not in limits, limits
    truncate = doc[doc.index("auto_truncate:"):doc.index("warmup:")]
    assert "422" in truncate, truncate
