"""The server under faults and abuse, over real HTTP on 127.0.0.1.

On a fault-injecting fake backend (tests/serve_fault_driver.py), served by uvicorn in a thread or
in a subprocess: a failing device batch, packing or write-back fails only its requests (503) and
the worker carries on; a dead worker turns /health 503, answers every waiting request and, under
`serve`, exits 70; a request past --request-timeout gets 503 with its queued inputs dropped; a
device call that never returns is noticed, in the SIGTERM drain too (exit 70, not a process that
never ends); /tokenize holds a concurrency slot.

On a tiny random model behind `sbert-flax serve` (one subprocess for the module): clients that
stall their body hold no slot and get 408; a mixed burst at concurrency 48 of good and bad
requests (good ones equal to a direct encode, bad ones TEI's status and JSON, no 5xx, nothing left in
flight, RSS bounded); kill -9 then a restart on the same port answers (last).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import helpers
import httpx
import numpy as np
import pytest
import uvicorn
from serve_fault_driver import FaultyBackend
from test_serving import cosines, free_port, metric

from sbert_flax.serving import ServeSettings, create_app

ROOT = helpers.__file__.rsplit("/tests/", 1)[0]
KEY = "sk-faults"
TIMEOUT_S = 2.0  # --request-timeout of the model server


# ---- a fake backend, served by uvicorn in a thread ------------------------------------------------

class ThreadServer:
    """uvicorn serving `app` from a thread of this process (no signal handlers there)."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                log_config=None, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 120  # a ceiling: a loaded 2-core host starts slowly
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def fake_server(**settings) -> tuple[ThreadServer, FaultyBackend]:
    backend = FaultyBackend()
    return ThreadServer(create_app(backend, ServeSettings(**settings))), backend


def assert_503(r: httpx.Response, error_type: str, needle: str) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["error_type"] == error_type and needle in body["error"], body


def embed(url: str, *texts: str, timeout: float = 5) -> httpx.Response:
    return httpx.post(url + "/embed", json={"inputs": list(texts)}, timeout=timeout)


def test_failing_rounds_fail_only_their_requests():
    """The device call, packing (write-back of rows that are not numbers) raising: 503 for that
    request, the worker carries on, /health stays 200."""
    srv, backend = fake_server()
    with srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert_503(embed(srv.url, "boom"), "Backend", "RuntimeError: device error")
        assert_503(embed(srv.url, "garbage"), "Backend", "ValueError")
        r = embed(srv.url, "fine", "also fine")
        assert r.status_code == 200 and r.json() == [[1, 0, 0, 0]] * 2, r.text
        assert httpx.get(srv.url + "/health").status_code == 200


def test_dead_worker_turns_health_503_and_leaves_nobody_waiting():
    """The worker thread dies (an exception no handler catches) with a batch on the device and
    requests queued: every request is answered 503 at once, /health is 503, new requests too."""
    srv, backend = fake_server()
    with srv:
        backend.gate.clear()

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=5) as client:
                first = asyncio.ensure_future(client.post("/embed", json={"inputs": ["hold",
                                                                                      "crash"]}))
                await asyncio.to_thread(backend.entered.wait, 5)
                rest = [asyncio.ensure_future(client.post("/embed", json={"inputs": [f"q{i}"]}))
                        for i in range(5)]
                await asyncio.sleep(0.2)  # queued behind the held batch
                backend.gate.set()
                return await asyncio.gather(first, *rest)

        # The dead-worker message (not --request-timeout's) shows nobody waited for the timeout.
        answers = asyncio.run(burst())
        for r in answers:
            assert_503(r, "Unhealthy", "WorkerCrash")
        assert_503(httpx.get(srv.url + "/health"), "Unhealthy", "worker died")
        assert_503(embed(srv.url, "fine"), "Unhealthy", "worker died")
        assert srv.app.state.server.in_flight == 0


def test_request_timeout_drops_queued_inputs_and_tokenize_holds_a_slot():
    """A device that hangs: past --request-timeout the held and the queued request get 503, the
    queued one's inputs never reach the device; /tokenize counts against the concurrency
    limit."""
    srv, backend = fake_server(request_timeout=1.0, max_concurrent_requests=2)
    with srv:
        backend.gate.clear()

        async def stuck():
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
                held = asyncio.ensure_future(client.post("/embed", json={"inputs": ["hold"]}))
                await asyncio.to_thread(backend.entered.wait, 5)
                queued = asyncio.ensure_future(client.post("/embed", json={"inputs": ["queued"]}))
                await asyncio.sleep(0.2)
                full = await client.post("/tokenize", json={"inputs": "x"})  # both slots taken
                return await asyncio.gather(held, queued), full

        t0 = time.monotonic()
        (held, queued), full = asyncio.run(stuck())
        # Answered by the timeout (the message), never before it; a lower bound only, so a slow
        # machine cannot fail it.
        assert time.monotonic() - t0 > 0.9
        for r in (held, queued):
            assert_503(r, "Unhealthy", "--request-timeout")
        assert full.status_code == 429 and full.json()["error_type"] == "Overloaded", full.text
        backend.gate.set()
        assert embed(srv.url, "fine").status_code == 200  # the worker went past the dropped job
        assert FaultyBackend.MARKERS["queued"] not in {m for b in backend.batches for m in b}
        tok = httpx.post(srv.url + "/tokenize", json={"inputs": "x"})
        assert tok.status_code == 200 and tok.json()[0][0]["text"] == "x"
        too_many = httpx.post(srv.url + "/tokenize", json={"inputs": ["x"] * 300})
        # --max-client-batch-size (256): 422, as TEI (a Validation error).
        assert too_many.status_code == 422, too_many.text
        assert "max-client-batch-size" in too_many.json()["error"], too_many.text
        assert srv.app.state.server.in_flight == 0


def test_stuck_device_turns_health_503():
    """A device call that never returns: its request gets 503 at --request-timeout, and after
    3 timeouts the watchdog declares the worker dead (/health 503, new requests 503 at once)."""
    srv, backend = fake_server(request_timeout=0.4)
    with srv:
        backend.gate.clear()
        try:
            assert_503(embed(srv.url, "hold"), "Unhealthy", "--request-timeout")
            assert httpx.get(srv.url + "/health").status_code == 200  # slow is not stuck yet
            deadline = time.monotonic() + 120  # a ceiling: the watchdog fires at 3 x 0.4 s
            while (health := httpx.get(srv.url + "/health")).status_code == 200:
                assert time.monotonic() < deadline, "the stuck device was never noticed"
                time.sleep(0.05)
            assert_503(health, "Unhealthy", "device is stuck")
            # "worker died", not --request-timeout's message: refused at once, not after waiting.
            assert_503(embed(srv.url, "fine"), "Unhealthy", "worker died")
        finally:
            backend.gate.set()


WAIT_S = 120  # ceiling of the waits on a server subprocess (a loaded CI host is slow)


@contextlib.contextmanager
def fault_driver(*args: str):
    """tests/serve_fault_driver.py (the fake backend under `serve`) in a subprocess, healthy;
    yields (process, base URL, log file); killed on the way out if still running."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "serve_fault_driver.py"),
                             str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_dead_worker_under_serve_exits_70():
    """Under the serve command the dying worker shuts the server down: the request that killed
    it gets 503, the process exits 70 (EXIT_WORKER_DIED) for its supervisor to restart it."""
    with fault_driver() as (proc, url, log):
        assert embed(url, "fine").status_code == 200
        assert_503(embed(url, "crash"), "Unhealthy", "WorkerCrash")
        assert proc.wait(15) == 70, _tail(log)


def test_device_hang_in_the_sigterm_drain_exits_70():
    """SIGTERM while a device call hangs: the request in flight gets its 503 at
    --request-timeout, then the shutdown drains the batcher, where the watchdog (which used to
    stop when the drain began, leaving the process waiting forever) declares the device stuck
    and the process exits 70 for its supervisor to restart it."""
    timeout_s = 1.5  # the watchdog fires at 3 timeouts into the hung call: 4.5 s

    with fault_driver(str(timeout_s)) as (proc, url, log):
        async def run() -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                async def launched() -> float:  # device rounds launched so far
                    text = (await client.get("/metrics")).text
                    return float(re.search(r"^te_batch_next_size_count (\S+)$", text, re.M)[1])

                before = await launched()
                hung = asyncio.ensure_future(client.post("/embed", json={"inputs": ["hang"]}))
                deadline = time.monotonic() + WAIT_S
                while await launched() == before:
                    assert time.monotonic() < deadline, "the request never reached the device"
                    await asyncio.sleep(0.02)
                assert proc.poll() is None, _tail(log)
                proc.send_signal(signal.SIGTERM)  # the hung call began before: no race with it
                return await hung

        assert_503(asyncio.run(run()), "Unhealthy", "--request-timeout")
        try:
            code = proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {WAIT_S} s after SIGTERM, its device hung in "
                                 f"the drain:\n{_tail(log)}") from None
        assert code == 70, _tail(log)
        assert "device is stuck" in _tail(log), _tail(log)


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-3000:]


# ---- a tiny real model behind `sbert-flax serve` ---------------------------------------------------

class Serve:
    """`python -m sbert_flax.cli.main serve` in a subprocess on a given port."""

    def __init__(self, model: str, port: int, *args: str):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
        env.pop("XLA_FLAGS", None)  # one CPU device, as a server process has
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sbert_flax.cli.main", "serve", "--model", model, "--port", str(port),
             "--log-level", "warning", *args], stdout=self.log, stderr=subprocess.STDOUT, env=env,
            cwd=ROOT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {_tail(self.log)}"
            assert time.monotonic() < deadline, f"not ready in {timeout} s: {_tail(self.log)}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


SERVE_ARGS = ("--max-batch-tokens", "256", "--max-input-length", "64", "--api-key", KEY,
              "--max-client-batch-size", "8", "--payload-limit", "4000",
              "--max-concurrent-requests", "48", "--request-timeout", str(TIMEOUT_S),
              "--tokenization-workers", "4")
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_dir(tiny_bert) -> str:
    return tiny_bert(pooling="mean")  # test_serving's model: its compiled shapes are shared


@pytest.fixture(scope="module")
def server(tiny_dir):
    srv = Serve(tiny_dir, free_port(), *SERVE_ARGS)
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def encoder(tiny_dir, one_device):
    from sbert_flax import SentenceEncoder

    return SentenceEncoder.from_pretrained(tiny_dir, max_seq_length=64, devices=one_device,
                                           max_batch_tokens=256)


@pytest.fixture(scope="module")
def sentences(zh_vocab) -> list[str]:
    return helpers.random_zh_sentences(64, 1, 40, seed=11, vocab_file=zh_vocab)


def test_stalled_bodies_hold_no_slot_and_get_408(server):
    """60 clients send headers and half a body, then stall (more than the 48 slots): a good
    client is answered at once, each staller gets 408 JSON at the timeout, and no slot stays
    taken."""
    body = json.dumps({"inputs": ["那个人很开心"]}).encode()
    head = (f"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    stallers = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S + 10)
            s.sendall(head + body[:8])
            stallers.append(s)
        time.sleep(0.3)  # every staller is in the app, waiting on its body
        good = httpx.post(server.url + "/embed", json={"inputs": ["那个人很开心"]}, headers=AUTH)
        # 200, not 429: the 60 stallers (more than the 48 slots) hold no slot while their bodies
        # are missing, so the good client did not need one of theirs.
        assert good.status_code == 200, good.text
        for s in stallers:
            raw = b""
            while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                assert chunk, raw
                raw += chunk
            status = raw.split(b" ", 2)[1]
            assert status == b"408", raw
            answer = json.loads(raw.split(b"\r\n\r\n", 1)[1])
            assert answer["error_type"] == "Validation", answer  # the request never arrived whole
            assert "--request-timeout" in answer["error"], answer
    finally:
        for s in stallers:
            s.close()
    assert metric(server.url, "te_requests_in_flight") == 0


# Bad requests by class: (path, method, body, headers) and TEI's status for the class: a body
# that is not JSON 400 (axum's syntax error), an empty input 400, a bad field, too many or too
# long inputs 422; a body over the payload limit 413.
LONG = "很" * 300
BAD = {
    "bad JSON": ("/embed", "POST", b'{"inputs": ["ok"', AUTH, 400),
    "not an object": ("/embed", "POST", b'["ok"]', AUTH, 422),
    "wrong type": ("/embed", "POST", {"inputs": ["ok", 3]}, AUTH, 422),
    "wrong field type": ("/embed", "POST", {"inputs": "ok", "normalize": "yes"}, AUTH, 422),
    "empty input": ("/embed", "POST", {"inputs": []}, AUTH, 400),
    "missing field": ("/v1/embeddings", "POST", {}, AUTH, 422),
    "bad encoding_format": ("/v1/embeddings", "POST", {"input": "ok", "encoding_format": "int8"},
                            AUTH, 422),
    "too many inputs": ("/embed", "POST", {"inputs": ["a"] * 9}, AUTH, 422),
    "too many to tokenize": ("/tokenize", "POST", {"inputs": ["a"] * 9}, AUTH, 422),
    "input too long": ("/embed", "POST", {"inputs": [LONG], "truncate": False}, AUTH, 422),
    "body too long": ("/embed", "POST", {"inputs": ["x" * 5000]}, AUTH, 413),
    "bad similarity": ("/similarity", "POST", {"inputs": {"source_sentence": 1}}, AUTH, 422),
    "unknown route": ("/nope", "POST", {"inputs": "ok"}, AUTH, 404),
    "wrong method": ("/embed", "GET", None, AUTH, 405),
    "no API key": ("/embed", "POST", {"inputs": ["ok"]}, {}, 401),
    "wrong API key": ("/embed", "POST", {"inputs": ["ok"]}, {"authorization": "Bearer no"}, 401),
}


def test_mixed_burst_at_concurrency_48(server, encoder, sentences):
    """192 requests, 48 at a time: good ones (embed, OpenAI, tokenize) interleaved with every
    class of bad one. Good answers equal a direct encode, bad ones get their 4xx JSON, no 5xx,
    nothing in flight or queued afterwards, RSS bounded."""
    rng = np.random.default_rng(5)
    good_texts = [[sentences[i] for i in rng.choice(len(sentences), rng.integers(1, 9))]
                  for _ in range(144)]
    jobs: list[tuple[str, object]] = [("good", t) for t in good_texts]
    jobs += [(name, None) for name in BAD for _ in range(3)]
    order = rng.permutation(len(jobs))
    want = dict(zip(sentences, encoder.encode(sentences), strict=True))

    async def one(client: httpx.AsyncClient, i: int, kind: str, texts):
        if kind != "good":
            path, method, body, headers, _ = BAD[kind]
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            return await client.request(method, path, headers={**headers, **(
                {"content-type": "application/json"} if body is not None else {})},
                **(kw if body is not None else {}))
        if i % 3 == 0:
            return await client.post("/embed", json={"inputs": texts}, headers=AUTH)
        if i % 3 == 1:
            return await client.post("/v1/embeddings", json={"input": texts}, headers=AUTH)
        return await client.post("/tokenize", json={"inputs": texts}, headers=AUTH)

    async def burst():
        limits = httpx.Limits(max_connections=48, max_keepalive_connections=48)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            return await asyncio.gather(*(one(client, int(i), *jobs[i]) for i in order))

    rss_before = server.rss_mib()
    t0 = time.monotonic()
    answers = dict(zip((int(i) for i in order), asyncio.run(burst()), strict=True))
    seconds = time.monotonic() - t0
    rss_after = server.rss_mib()
    statuses: dict[str, dict[int, int]] = {}
    equal = 0
    for i, (kind, texts) in enumerate(jobs):
        r = answers[i]
        statuses.setdefault(kind, {}).setdefault(r.status_code, 0)
        statuses[kind][r.status_code] += 1
        if kind != "good":
            assert r.status_code == BAD[kind][4], (kind, r.status_code, r.text)
            body = r.json()  # TEI's {"error", "error_type"}, or OpenAI's shape on its routes
            assert isinstance(body, dict) and {"error", "message"} & set(body), (kind, r.text)
            continue
        assert r.status_code == 200, (kind, r.status_code, r.text)
        if i % 3 == 2:  # /tokenize, from the pool of tokenizer threads
            ids = [[t["id"] for t in row] for row in r.json()]
            assert ids == [x.tolist() for x in encoder.tokenize(texts)]
        else:
            got = r.json() if i % 3 == 0 else [d["embedding"] for d in r.json()["data"]]
            assert cosines(np.asarray(got), np.stack([want[t] for t in texts])).min() >= 0.99999
        equal += 1
    print(f"\nmixed burst: {len(jobs)} requests at concurrency 48 in {seconds:.1f} s; "
          f"{equal} good answers equal to a direct encode; statuses by class {statuses}; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert equal == len(good_texts)
    assert not any(s >= 500 for counts in statuses.values() for s in counts)
    assert metric(server.url, "te_requests_in_flight") == 0
    assert metric(server.url, "te_queue_size") == 0
    assert rss_after - rss_before < 200, (rss_before, rss_after)


def test_kill_9_then_restart_on_the_same_port(server, tiny_dir, encoder):
    """SIGKILL (no shutdown at all), then a new process on the same port: healthy, and its
    answers equal a direct encode. Last: it ends the module's server."""
    server.proc.kill()
    assert server.proc.wait(10) == -signal.SIGKILL
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)
    again = Serve(tiny_dir, server.port, *SERVE_ARGS)
    try:
        again.wait_ready()
        texts = ["那个人很开心", "那只猫很开心"]
        r = httpx.post(again.url + "/embed", json={"inputs": texts}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert cosines(r.json(), encoder.encode(texts)).min() >= 0.99999
    finally:
        again.stop()
