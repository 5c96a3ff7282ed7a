"""`sbert-flax serve` over real HTTP on 127.0.0.1: one server subprocess on a tiny random model.

TEI and OpenAI shapes (with the `openai` SDK and `httpx`), embeddings equal to a direct encode,
64 concurrent clients, every refusal with its status (the server answering the next good
request), a stable compile count under random load, and SIGTERM with requests in flight (last).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import helpers
import httpx
import numpy as np
import pytest

SERVED_NAME = "tiny-zh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m sbert_flax.cli.serve` in a subprocess, its log in a temp file."""

    def __init__(self, model: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", SBERT_FLAX_COMPILATION_CACHE="0",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("XLA_FLAGS", None)  # one CPU device, as a server process has
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sbert-flax-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "sbert_flax.cli.serve", "--model", model,
               "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=helpers.__file__.rsplit("/tests/", 1)[0])

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        saw_503 = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return
                assert r.status_code == 503, r.text  # warming up
                saw_503 = True
            except httpx.TransportError:
                pass
            time.sleep(0.2 if saw_503 else 0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def metric(url: str, name: str) -> float:
    """One sample of the server's Prometheus text: `name` bare (the first series of that name) or
    with its labels as written, e.g. 'te_request_failure{err="dropped"}'."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def tiny_dir(tiny_bert) -> str:
    return tiny_bert(pooling="mean")


@pytest.fixture(scope="module")
def server(tiny_dir):
    # A small budget and input length: 3 shapes to compile (rows 1, 2, 4 of 64 tokens).
    srv = ServerProcess(tiny_dir, "--max-batch-tokens", "256", "--max-input-length", "64",
                        "--max-client-batch-size", "32",
                        "--payload-limit", "20000", "--served-model-name", SERVED_NAME)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def direct(tiny_dir, one_device):
    from sbert_flax import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(tiny_dir, max_seq_length=64, devices=one_device,
                                          max_batch_tokens=256)
    cache: dict[str, np.ndarray] = {}

    def encode(texts: list[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            cache.update(zip(todo, enc.encode(todo), strict=True))
        return np.stack([cache[t] for t in texts])

    encode.encoder = enc
    return encode


@pytest.fixture(scope="module")
def sentences(zh_vocab) -> list[str]:
    # 3 .. 64 tokens with [CLS]/[SEP].
    return helpers.random_zh_sentences(200, 1, 62, seed=7, vocab_file=zh_vocab)


def test_health_info_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/info").json()
    assert info["served_model_name"] == SERVED_NAME and info["dim"] == 32
    assert info["max_input_length"] == 64 and info["max_batch_tokens"] == 256
    assert info["max_client_batch_size"] == 32 and info["ready"] is True
    assert info["compiled_shapes"] == 3  # the fixture's budget: rows 1, 2 and 4 of 64 tokens
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE te_request_count counter" in text and "_total" not in text  # TEI's names
    for name in ("te_request_count", "te_queue_size", "te_batch_next_size_bucket",
                 "te_request_tokenization_duration_bucket", "te_request_queue_duration_bucket",
                 "te_request_inference_duration_bucket", "te_compile_count"):
        assert name in text, name
    # Warm-up compiled every shape; nothing compiled since.
    assert metric(server.url, "te_compile_count") == info["compiled_shapes"]


def test_embed_equals_direct_encode(server, direct, sentences):
    texts = sentences[:20] + ["那个人很开心", "  那个人非常开心 ", ""]
    r = httpx.post(server.url + "/embed", json={"inputs": texts})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json(), np.float32)
    want = direct(texts)
    assert got.shape == want.shape
    assert cosines(got, want).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # TEI: normalize=true
    raw = np.asarray(httpx.post(server.url + "/embed",
                                json={"inputs": texts, "normalize": False}).json(), np.float32)
    np.testing.assert_allclose(raw, want, rtol=1e-4, atol=1e-5)
    one = httpx.post(server.url + "/embed", json={"inputs": "那个人很开心"}).json()
    assert len(one) == 1 and cosines(one, direct(["那个人很开心"]))[0] >= 0.99999


def test_openai_sdk(server, direct, sentences):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    texts = sentences[20:30]
    want = direct(texts)
    # The SDK asks for base64 by default and decodes it itself.
    res = client.embeddings.create(model=SERVED_NAME, input=texts)
    assert res.model == SERVED_NAME and [d.index for d in res.data] == list(range(len(texts)))
    got = np.asarray([d.embedding for d in res.data])
    assert cosines(got, want).min() >= 0.99999
    ntok = sum(len(x) for x in direct.encoder.tokenize(texts))
    assert res.usage.prompt_tokens == res.usage.total_tokens == ntok
    floats = client.embeddings.create(model=SERVED_NAME, input=texts, encoding_format="float")
    np.testing.assert_array_equal(np.asarray([d.embedding for d in floats.data], np.float32),
                                  got.astype(np.float32))
    # dimensions: the first d coordinates, renormalised.
    res8 = client.embeddings.create(model=SERVED_NAME, input=texts[0], dimensions=8,
                                    encoding_format="float")
    e8 = np.asarray(res8.data[0].embedding)
    assert e8.shape == (8,)
    np.testing.assert_allclose(e8, unit(want[0, :8]), atol=1e-5)
    # base64 over plain HTTP: little-endian float32, the same numbers as the float answer.
    for path in ("/v1/embeddings", "/embeddings"):
        b64 = httpx.post(server.url + path, json={"input": texts, "encoding_format": "base64"}).json()
        flt = httpx.post(server.url + path, json={"input": texts}).json()
        for a, b in zip(b64["data"], flt["data"], strict=True):
            np.testing.assert_array_equal(np.frombuffer(base64.b64decode(a["embedding"]), "<f4"),
                                          np.asarray(b["embedding"], np.float32))
        assert b64["object"] == "list" and b64["data"][0]["object"] == "embedding"


def test_similarity_and_tokenize(server, direct):
    body = {"inputs": {"source_sentence": "那个人很开心", "sentences": ["那个人非常开心", "那只猫很开心"]}}
    sims = httpx.post(server.url + "/similarity", json=body).json()
    e = unit(direct(["那个人很开心", "那个人非常开心", "那只猫很开心"]))
    np.testing.assert_allclose(sims, e[1:] @ e[0], atol=1e-5)
    toks = httpx.post(server.url + "/tokenize", json={"inputs": ["那个人 ok"]}).json()
    assert [t["text"] for t in toks[0]] == ["[CLS]", "那", "个", "人", "ok", "[SEP]"]
    assert toks[0][0]["special"] and toks[0][0]["start"] is None
    assert (toks[0][4]["start"], toks[0][4]["stop"]) == (4, 6)
    assert [t["id"] for t in toks[0]] == direct.encoder.tokenize(["那个人 ok"])[0].tolist()


LONG = "很" * 300  # 302 tokens > 64


@pytest.mark.parametrize("path, body, status, needle", [
    # TEI's status codes: an empty input 400, a bad field, too many or too long inputs 422; a
    # body that is not JSON 400 and JSON of the wrong shape 422 (axum's `Json` extractor).
    ("/embed", {"inputs": []}, 400, "empty"),
    ("/embed", {"inputs": ["ok", "fine", 3]}, 422, "inputs[2]"),
    ("/embed", {"inputs": ["ok", None]}, 422, "inputs[1]"),
    ("/embed", {"inputs": {"a": 1}}, 422, "must be a string"),
    ("/embed", {}, 422, "missing"),
    ("/embed", {"inputs": ["a"] * 33}, 422, "32"),
    ("/embed", {"inputs": ["ok", LONG], "truncate": False}, 422, "input 1 has 302 tokens"),
    ("/embed", {"inputs": ["ok", LONG]}, 422, "of 64 tokens"),
    ("/embed", {"inputs": ["ok", [101, -1]]}, 422, "inputs[1][1] = -1"),
    ("/embed", {"inputs": "ok", "truncation_direction": "up"}, 422, "truncation_direction"),
    ("/embed", {"inputs": "ok", "dimensions": 33}, 422, "dimensions"),
    ("/v1/embeddings", {"input": [[1, 2], 3]}, 422, "input[1]"),
    ("/v1/embeddings", {"input": [[1, 2], []]}, 400, "input[1]"),
    ("/v1/embeddings", {"input": []}, 400, "empty"),
    ("/v1/embeddings", {"input": "ok", "model": 7}, 422, "model"),
    ("/v1/embeddings", {"input": "ok", "encoding_format": "int8"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": "ok", "dimensions": 0}, 422, "dimensions"),
    ("/embeddings", {"input": ["ok", LONG]}, 422, "input 1"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "empty"),
    ("/similarity", {"inputs": {"source_sentence": 1, "sentences": ["a"]}}, 422, "source_sentence"),
    ("/embed", b'{"inputs": ["ok"', 400, "JSON"),
    ("/v1/embeddings", b'{"input": "ok"', 400, "JSON"),
    ("/embed", b'["ok"]', 422, "object"),
    ("/embed", {"inputs": ["x" * 5000] * 5}, 413, "payload limit"),
])
def test_bad_input_then_good(server, path, body, status, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, **kw)
    assert r.status_code == status, r.text
    err = r.json()
    want = "Empty" if status == 400 and "JSON" not in needle else "Validation"  # TEI's ErrorType
    if "embeddings" in path:  # TEI's OpenAI error shape on the OpenAI routes
        assert set(err) == {"message", "code", "type", "error_type"}, err
        assert err["code"] == status and err["type"] == err["error_type"] == want, err
        assert needle in err["message"], err
    else:
        assert set(err) == {"error", "error_type"} and err["error_type"] == want, err
        assert needle in err["error"], err
    good = httpx.post(server.url + "/embed", json={"inputs": ["那个人很开心"]})
    assert good.status_code == 200 and len(good.json()[0]) == 32


def test_truncation_and_limits_accepted(server, direct):
    r = httpx.post(server.url + "/embed", json={"inputs": [LONG], "truncate": True})
    assert r.status_code == 200
    want = direct(["很" * 62])  # right truncation keeps the first 62 characters
    assert cosines(r.json(), want)[0] >= 0.99999
    left = httpx.post(server.url + "/embed", json={"inputs": ["一" + "很" * 300], "truncate": True,
                                                  "truncation_direction": "left"}).json()
    assert cosines(left, want)[0] >= 0.99999  # the leading 一 is what was cut
    ok = httpx.post(server.url + "/v1/embeddings", json={"input": "ok", "model": SERVED_NAME})
    assert ok.status_code == 200
    assert httpx.post(server.url + "/embed", json={"inputs": ["a"] * 32}).status_code == 200
    # A chunked body (no Content-Length) over the limit is cut off while streaming.
    def chunks():
        yield b'{"inputs": ["'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"]}'

    r = httpx.post(server.url + "/embed", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "Validation", r.text
    assert httpx.get(server.url + "/nope").status_code == 404


def test_64_concurrent_clients_get_their_own_embeddings(server, direct, sentences):
    rng = random.Random(0)
    requests = [rng.sample(sentences, rng.randint(1, 8)) for _ in range(64)]

    async def one(client: httpx.AsyncClient, texts: list[str], i: int):
        if i % 2:
            r = await client.post("/embed", json={"inputs": texts})
            return np.asarray(r.json(), np.float32) if r.status_code == 200 else r.text
        r = await client.post("/v1/embeddings", json={"input": texts, "model": SERVED_NAME})
        if r.status_code != 200:
            return r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))
        return np.asarray([d["embedding"] for d in data], np.float32)

    async def burst():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, t, i) for i, t in enumerate(requests)))

    results = asyncio.run(burst())
    for texts, got in zip(requests, results, strict=True):
        assert isinstance(got, np.ndarray), got
        assert cosines(got, direct(texts)).min() >= 0.99999


def test_compile_count_constant_under_random_load(server, zh_vocab):
    compiles = metric(server.url, "te_compile_count")
    rng = random.Random(1)
    texts = helpers.random_zh_sentences(300, 0, 400, seed=3, vocab_file=zh_vocab)

    async def load():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            bodies = [{"inputs": rng.sample(texts, rng.randint(1, 32)), "truncate": True,
                       "normalize": rng.random() < 0.5} for _ in range(40)]
            rs = await asyncio.gather(*(client.post("/embed", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]

    asyncio.run(load())
    assert metric(server.url, "te_compile_count") == compiles


def test_sigterm_finishes_requests_in_flight(server, direct, sentences):
    """SIGTERM while 12 requests are in flight: all 12 answered correctly, new connections
    refused, exit code 0. (Last test of the module: it stops the server.)"""
    n = 12
    requests = [sentences[i * 3:i * 3 + 3] for i in range(n)]
    # Their bodies stall half-way, so they wait in `te_requests_receiving` (a request takes its
    # concurrency slot only once its body arrived): accepted requests a drain must finish.
    started = metric(server.url, "te_requests_receiving")

    async def run():
        release = asyncio.Event()

        async def one(client, texts):
            body = json.dumps({"inputs": texts}).encode()

            async def slow_body():
                # Half the body, then hold: the request is accepted and in flight.
                yield body[:10]
                await release.wait()
                yield body[10:]

            return await client.post("/embed", content=slow_body(),
                                     headers={"content-type": "application/json"})

        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=n)) as client:
            tasks = [asyncio.ensure_future(one(client, t)) for t in requests]
            deadline = time.monotonic() + 120  # a ceiling against a hang
            while metric(server.url, "te_requests_receiving") < started + n:
                assert time.monotonic() < deadline, "requests never got in flight"
                await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            # Stops accepting: new connections are refused (within uvicorn's 0.1 s tick).
            deadline = time.monotonic() + 120  # a ceiling: uvicorn's tick is 0.1 s
            while True:
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=5) as fresh:
                        await fresh.get("/health")
                except httpx.TransportError:
                    break
                assert time.monotonic() < deadline, "still accepting 120 s after SIGTERM"
                await asyncio.sleep(0.1)
            assert server.proc.poll() is None  # still finishing the requests in flight
            release.set()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(run())
    for texts, r in zip(requests, responses, strict=True):
        assert r.status_code == 200, r.text
        assert cosines(r.json(), direct(texts)).min() >= 0.99999
    assert server.proc.wait(30) == 0, server.log_tail()
