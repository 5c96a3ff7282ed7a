"""`sbert-flax serve` on a real model (all-MiniLM-L6-v2) over real HTTP: the `openai` SDK with an
API key, embeddings equal to a direct encode, `dimensions`, any model name (as TEI), 401, stalled
bodies that hold no concurrency slot, and a disconnected client's queued work dropped."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pytest
from test_serving import ServerProcess, cosines, metric, unit

KEY = "sk-test-key"
NAME = "all-MiniLM-L6-v2"
LIMIT = 8
SENTENCES = [
    "A man is playing a guitar.", "A woman is slicing an onion.", "The cat sits on the mat.",
    "Two dogs run across a snowy field.", "Stock markets fell sharply on Monday.",
    "She reads a book under the old tree by the river.", "Hello!", "",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
]


@pytest.fixture(scope="module")
def server(minilm_dir):
    # Input length 64 and a 256-token budget: 3 shapes to compile on a busy CPU.
    srv = ServerProcess(minilm_dir, "--max-batch-tokens", "256", "--max-input-length", "64",
                        "--max-concurrent-requests", str(LIMIT), "--api-key", KEY,
                        "--served-model-name", NAME, "--auto-truncate")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def encoder(minilm_dir, one_device):
    from sbert_flax import SentenceEncoder

    return SentenceEncoder.from_pretrained(minilm_dir, max_seq_length=64, devices=one_device,
                                           max_batch_tokens=256)


def auth() -> dict:
    return {"authorization": f"Bearer {KEY}"}


def test_openai_sdk_equals_direct_encode(server, encoder):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    want = encoder.encode(SENTENCES)
    res = client.embeddings.create(model=NAME, input=SENTENCES)  # base64 on the wire
    got = np.asarray([d.embedding for d in res.data])
    assert got.shape == (len(SENTENCES), 384)
    assert cosines(got, want).min() >= 0.99999
    assert res.usage.prompt_tokens == sum(len(x) for x in encoder.tokenize(SENTENCES))
    floats = client.embeddings.create(model=NAME, input=SENTENCES, encoding_format="float")
    np.testing.assert_array_equal(np.asarray([d.embedding for d in floats.data], np.float32),
                                  got.astype(np.float32))
    small = client.embeddings.create(model=NAME, input=SENTENCES[:3], dimensions=64)
    np.testing.assert_allclose([d.embedding for d in small.data], unit(want[:3, :64]), atol=1e-5)
    # Any model name is served, as TEI does (LangChain sends its own default); only
    # --strict-model-name refuses it (tests/serving/test_serving_tei.py).
    other = client.embeddings.create(model="text-embedding-3-small", input=SENTENCES[:3])
    assert cosines(np.asarray([d.embedding for d in other.data]), want[:3]).min() >= 0.99999
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=NAME, input="hi")


def test_api_key(server):
    for path in ("/embed", "/info"):
        r = httpx.request("POST" if path == "/embed" else "GET", server.url + path,
                          json={"inputs": "hi"} if path == "/embed" else None)
        assert r.status_code == 401 and r.json()["error_type"] == "Validation", r.text
    assert httpx.get(server.url + "/health").status_code == 200  # open for load balancers
    assert httpx.get(server.url + "/metrics").status_code == 200
    r = httpx.post(server.url + "/embed", json={"inputs": "hi"}, headers=auth())
    assert r.status_code == 200 and len(r.json()[0]) == 384


def test_stalled_bodies_hold_no_slot(server):
    """LIMIT requests stall half-way through their body: they are being received, not in flight
    (a request takes its slot once its body arrived), so one more is answered at once; released,
    all LIMIT are answered too."""
    body = json.dumps({"inputs": SENTENCES[:2]}).encode()
    receiving = metric(server.url, "te_requests_receiving")

    async def run():
        release = asyncio.Event()

        async def held():
            async def slow_body():
                yield body[:5]
                await release.wait()
                yield body[5:]

            return await client.post("/embed", content=slow_body(), headers=auth())

        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=LIMIT + 2)) as client:
            tasks = [asyncio.ensure_future(held()) for _ in range(LIMIT)]
            deadline = time.monotonic() + 30
            while metric(server.url, "te_requests_receiving") < receiving + LIMIT:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert metric(server.url, "te_requests_in_flight") == 0
            extra = await client.post("/embed", json={"inputs": "one more"}, headers=auth())
            release.set()
            return extra, await asyncio.gather(*tasks)

    extra, held = asyncio.run(run())
    assert extra.status_code == 200, extra.text
    assert all(r.status_code == 200 for r in held)
    assert metric(server.url, "te_requests_receiving") == receiving


def test_disconnected_client_work_is_dropped(server):
    """Behind a backlog, a client sends 32 inputs and hangs up once they are queued: none of
    them reach the device."""
    dropped = metric(server.url, 'te_request_failure{err="dropped"}')
    queued = metric(server.url, "te_request_input_count_count")  # requests tokenized + queued
    backlog = LIMIT - 2
    long = ["word " * 60] * 24  # truncated to 64 tokens (--auto-truncate): 6 device batches each

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            tasks = [asyncio.ensure_future(client.post("/embed", json={"inputs": long},
                                                       headers=auth())) for _ in range(backlog)]
            while metric(server.url, "te_request_input_count_count") < queued + backlog:
                await asyncio.sleep(0.01)
            body = json.dumps({"inputs": [f"gone {i}" for i in range(32)]}).encode()
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Authorization: Bearer " + KEY.encode() +
                          b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                # Hang up as soon as the request is queued (behind the backlog).
                while metric(server.url, "te_request_input_count_count") < queued + backlog + 1:
                    await asyncio.sleep(0.005)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(r.status_code == 200 for r in results)
    assert metric(server.url, 'te_request_failure{err="dropped"}') - dropped == 32
    assert httpx.post(server.url + "/embed", json={"inputs": "after"}, headers=auth()).status_code == 200
