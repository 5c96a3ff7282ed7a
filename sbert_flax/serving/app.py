"""`create_app(encoder, settings) -> FastAPI`: the routes of `sbert-flax serve`.

Each request: check the key, read the body (bounded in size and time, before it holds a
concurrency slot), take a slot, parse, tokenize (on the tokenizer pool, off the event loop),
queue the token ids with the batcher, await the rows, shape the answer -- all within
`--request-timeout` of its arrival. The event loop only ever awaits: the device runs in the
batcher's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sbert_flax.serving import schemas
from sbert_flax.serving.backend import InputTooLong
from sbert_flax.serving.batcher import Batcher, Job, Unavailable
from sbert_flax.serving.prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sbert_flax.serving.prometheus import ServeMetrics
from sbert_flax.serving.rerank_routes import RerankRoutes
from sbert_flax.serving.schemas import ApiError
from sbert_flax.serving.served_models import serving_backend
from sbert_flax.serving.settings import ServeSettings
from sbert_flax.serving.tei import TeiRoutes

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")
# Seconds a 503 asks the client to wait (Retry-After). This replica is warming up, broken or going
# away, so the retry should land on another one behind the balancer; a few seconds lets the
# balancer's health check take this one out first.
RETRY_AFTER_S = 5
# A device call running this many request timeouts counts as hung: no request in it can be
# answered in time, so the replica turns unhealthy (and `serve` exits) rather than stay up as a
# black hole. The margin keeps a merely slow round (a cold cache, a busy host) from tripping it.
STUCK_AFTER_TIMEOUTS = 3
# The most request timeouts the shutdown waits for the batcher to drain. By then uvicorn has
# answered every request, so what is left is the rounds on the device, each bounded by the watchdog
# (which stays on through the drain); this backstop declares the batcher dead (`serve` exits 70)
# if the drain still has not ended, rather than keep a process with a hung device alive forever.
DRAIN_TIMEOUTS = 2 * STUCK_AFTER_TIMEOUTS
# The OpenAI routes, which answer errors in TEI's OpenAI-compatible shape.
OPENAI_PATHS = ("/v1/embeddings", "/embeddings")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class RequestTimeout(Unavailable):
    """The request's body arrived, but its answer was not ready within `--request-timeout`
    (queued behind too much work, or a device that hangs): 503, its queued inputs dropped."""

    kind = "timeout"


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(schemas.dumps(obj), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(status: int, message: str, kind: str, openai: bool = False,
                   headers: dict[str, str] | None = None) -> Response:
    """An error in TEI's shape (`openai`: its OpenAI-compatible one); see `schemas.error_body`."""
    return json_response(schemas.error_body(message, status, kind, openai), status, headers)


def unavailable_response(message: str, kind: str = "unhealthy", openai: bool = False) -> Response:
    """503 in TEI's shape, with Retry-After."""
    return error_response(503, message, kind, openai, {"Retry-After": str(RETRY_AFTER_S)})


class Server:
    """The state behind the routes: backend, batcher, metrics, limits."""

    def __init__(self, encoder, settings: ServeSettings, reranker=None):
        self.settings = settings
        # An embedder's `EncoderBackend`; with a cross-encoder, `ServedModels` over both.
        self.backend = serving_backend(encoder, reranker)
        self.max_batch_tokens = settings.max_batch_tokens or self.backend.max_batch_tokens
        self.metrics = ServeMetrics(compile_count=lambda: self.backend.num_compiles,
                                    queue_size=lambda: self.batcher.queued_inputs,
                                    max_input_length=self.backend.max_seq_length)
        self.batcher = Batcher(self.backend, self.max_batch_tokens, self.metrics,
                               warmup=settings.warmup,
                               max_failures=settings.max_consecutive_failures,
                               stuck_after=STUCK_AFTER_TIMEOUTS * settings.request_timeout,
                               max_wait=settings.max_batch_wait)
        # Tokenization has threads of its own, as TEI has tokenization workers: the backend's
        # tokenizers are safe to call from several threads (per-setting Rust copies, never the
        # HF object's mutable one), and a bounded pool keeps the event loop free.
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            settings.tokenizer_threads, "sbert-flax-tokenizer")
        self.in_flight = 0
        self.started = int(time.time())
        self.tei = TeiRoutes(self)  # the embedding routes, in TEI's and OpenAI's shapes
        self.rerank_routes = RerankRoutes(self)  # /rerank and /predict (a cross-encoder's)

    # ---- request plumbing -------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if not key or request.url.path in OPEN_PATHS or (
                request.method == "GET" and request.url.path in ("/", "/ping")):  # TEI's health
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header "
                           "`Authorization: Bearer <key>`", "unauthorized")

    async def read_json(self, request: Request) -> dict:
        """The body (read already by `handle`, within the deadline) as a JSON object."""
        body = getattr(request.state, "body", None)
        if body is None:
            body = await self.read_body(request)
        return schemas.parse_object(body)

    async def read_body(self, request: Request) -> bytes:
        """Reads the body, refusing it with 413 as soon as it is over the payload limit."""
        limit = self.settings.payload_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the body has {declared} bytes, more than the payload limit of "
                           f"{limit} bytes", "payload_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is over the payload limit of {limit} bytes",
                               "payload_too_large")
            chunks.append(chunk)
        request.state.body = body = b"".join(chunks)
        return body

    async def tokenize(self, texts: list, truncate: bool, direction: str,
                       tokenizer: Callable | None = None) -> list[np.ndarray]:
        """Token ids per input on the tokenizer pool (`tokenizer`: the backend's `tokenize`, or
        the cross-encoder's `tokenize_pairs` for /rerank and /predict)."""
        tokenizer = tokenizer or self.backend.tokenize
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        # The batcher may hold a partial batch for this request while it is tokenized. `arrived`
        # runs on the loop's next turn: after the caller, in this same turn, has submitted.
        self.batcher.expect()
        try:
            ids = await loop.run_in_executor(self.tokenizer_pool, lambda: tokenizer(
                texts, truncate=truncate, direction=direction))
        except InputTooLong as e:
            raise schemas.input_too_long(e.index, e.length, e.limit) from None
        finally:
            loop.call_soon(self.batcher.arrived)
        self.metrics.tokenized(ids, time.perf_counter() - t0)
        return ids

    async def embed(self, request: Request, ids: list[np.ndarray], output: str = "sentence"):
        """Queues `ids` and waits for their rows ([n, dim]; `output="token"`: [len_i, dim] per
        input); a client that hangs up has its work dropped."""
        job: Job = self.batcher.submit(ids, output)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait((job.future, gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request timed out (or the server is stopping)
            self.batcher.cancel(job)
            raise
        finally:
            gone.cancel()
        if job.future.done():
            return job.future.result()
        self.batcher.cancel(job)
        raise ClientGone()

    async def handle(self, route: str, request: Request,
                     fn: Callable[[Request], Awaitable[Response]], limited: bool) -> Response:
        """Runs one route with metrics, the deadline, the concurrency limit and JSON errors."""
        t0 = time.perf_counter()
        timeout = self.settings.request_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        counted = ok = False
        openai = route == "openai_embeddings"  # TEI's OpenAI-compatible error shape there
        try:
            self.check_key(request)
            # The body before the slot: a client that stalls its body holds no slot, and gets
            # 408 at the deadline.
            reading = asyncio.timeout_at(deadline)
            self.metrics.receiving.inc()
            try:
                async with reading:
                    await self.read_body(request)
            except TimeoutError:
                if not reading.expired():
                    raise
                raise ApiError(408, f"the request body did not arrive within {timeout:g} s "
                               "(--request-timeout)", "body_timeout", err="timeout") from None
            finally:
                self.metrics.receiving.dec()
            if limited:
                if self.in_flight >= self.settings.max_concurrent_requests:
                    raise ApiError(429, f"{self.in_flight} requests in flight, the limit is "
                                   f"{self.settings.max_concurrent_requests} "
                                   "(--max-concurrent-requests); retry later", "overloaded")
                self.in_flight += 1
                self.metrics.in_flight.inc()
                counted = True
            answering = asyncio.timeout_at(deadline)
            try:
                async with answering:
                    response = await fn(request)
                    ok = True
            except TimeoutError:
                if not answering.expired():
                    raise
                raise RequestTimeout(f"no answer within {timeout:g} s of the request's arrival "
                                     "(--request-timeout): the server is overloaded or its device "
                                     "is stuck; the request's queued inputs were dropped") from None
        except ApiError as e:
            self.metrics.failed(e.err)
            # A 408's body never finished arriving: the connection cannot carry another request.
            headers = {"Connection": "close"} if e.status == 408 else None
            return json_response(e.body(openai), e.status, headers)
        except Unavailable as e:
            self.metrics.failed(e.kind)
            return unavailable_response(str(e), e.kind, openai)
        except (ClientGone, ClientDisconnect):
            self.metrics.failed("client_disconnected")
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 -- a failed request must not take the server down
            log.exception("%s failed", route)
            self.metrics.failed("inference")
            return error_response(500, f"{type(e).__name__}: {e}", "backend", openai)
        finally:
            if counted:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
            # TEI's te_request_* series: inference routes only, counted once the body parsed.
            self.metrics.finished(getattr(request.state, "tei_shape", None), ok,
                                  time.perf_counter() - t0)
        return response

    # ---- routes -------------------------------------------------------------------------------

    async def route_embed(self, request: Request) -> Response:
        return json_response(await self.tei.embed(request, await self.read_json(request)))

    async def route_openai(self, request: Request) -> Response:
        return json_response(await self.tei.openai(request, await self.read_json(request)))

    async def route_similarity(self, request: Request) -> Response:
        return json_response(await self.tei.similarity(request, await self.read_json(request)))

    async def route_tokenize(self, request: Request) -> Response:
        obj = await self.read_json(request)
        texts = schemas.text_list(obj, "inputs", self.settings.max_client_batch_size)
        special = schemas.optional_bool(obj, "add_special_tokens", True)
        prefix = self.tei.prompt(schemas.optional_str(obj, "prompt_name"))  # as TEI: the tokens
        texts = [prefix + t for t in texts]  # of the text /embed embeds, offsets into it
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.tokenizer_pool, self.backend.tokens, texts, special)
        return json_response(out)

    async def route_info(self, request: Request) -> Response:
        s, b = self.settings, self.backend
        return json_response({
            "model_id": s.model_id, "served_model_name": s.model_name, "model_sha": None,
            "model_dtype": b.dtype, **self.rerank_routes.info(),  # model_type, dim, rerank_model
            "max_input_length": b.max_seq_length,
            "max_batch_tokens": self.max_batch_tokens, "max_batch_requests": None,
            "max_client_batch_size": s.max_client_batch_size,
            "max_concurrent_requests": s.max_concurrent_requests, "payload_limit": s.payload_limit,
            "auto_truncate": s.auto_truncate, "tokenization_workers": s.tokenizer_threads, "version": s.version,
            "sha": None, "docker_label": None,
            "ready": self.batcher.ready.is_set(), "compiled_shapes": self.batcher.warmup_shapes,
        })

    async def route_models(self, request: Request) -> Response:
        # OpenAI's model list: some clients check it before calling /v1/embeddings.
        return json_response({"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": self.started,
            "owned_by": "sbert-flax"}]})

    async def route_health(self, request: Request) -> Response:
        # A dead worker, then draining: a balancer must stop routing here before the process
        # goes away.
        fatal = self.batcher.fatal
        if fatal is not None:
            return unavailable_response(f"the batcher's worker died ({type(fatal).__name__}: "
                                        f"{fatal}); this replica is restarting")
        if self.batcher.draining:
            return unavailable_response("shutting down (draining)")
        if self.batcher.ready.is_set():
            return json_response({"status": "ok"})
        if self.batcher.error is not None:
            return unavailable_response(f"the model failed to warm up: {self.batcher.error}")
        return unavailable_response("warming up: compiling the device shapes")

    async def route_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def _wait_disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect (or, once the
    # response is sent, a synthetic one; by then nobody is listening).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(encoder, settings: ServeSettings | None = None, reranker=None) -> FastAPI:
    """A FastAPI app serving `encoder` (a `SentenceEncoder`) over the TEI and OpenAI APIs.

    With a cross-encoder (`reranker`, or a `CrossEncoder` as `encoder`) /rerank and /predict
    serve too; `serving.rerank_routes` says how the routes choose between the models.

    The batcher thread starts (and warms up: every shape compiled, then a test batch) when the
    app's lifespan starts; `/health` answers 503 until then. On shutdown the queue is drained.

    Args:
      encoder: the model; the app's worker thread is its only user from then on.
      settings: limits and names; default `ServeSettings()`.
      reranker: a `CrossEncoder` served beside `encoder` (None: none, or `encoder` is one).
    """
    settings = settings or ServeSettings()
    server = Server(encoder, settings, reranker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.batcher.start()
        yield
        # Bounded: a device that hangs in the drain makes the batcher dead (the watchdog, else
        # this timeout), and `serve` exits 70 instead of waiting forever.
        await asyncio.get_running_loop().run_in_executor(
            None, server.batcher.stop, DRAIN_TIMEOUTS * settings.request_timeout)
        server.tokenizer_pool.shutdown(wait=False)
        server.tei.close()

    app = FastAPI(title="sbert-flax", version=settings.version or "0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = server

    def add(path: str, method: str, route: str, fn, limited: bool) -> None:
        async def endpoint(request: Request) -> Response:
            return await server.handle(route, request, fn, limited)

        app.add_api_route(path, endpoint, methods=[method], name=route)

    add("/embed", "POST", "embed", server.route_embed, True)
    add("/v1/embeddings", "POST", "openai_embeddings", server.route_openai, True)
    add("/embeddings", "POST", "openai_embeddings", server.route_openai, True)
    add("/similarity", "POST", "similarity", server.route_similarity, True)
    add("/tokenize", "POST", "tokenize", server.route_tokenize, True)
    add("/info", "GET", "info", server.route_info, False)
    add("/v1/models", "GET", "models", server.route_models, False)
    add("/health", "GET", "health", server.route_health, False)
    add("/metrics", "GET", "metrics", server.route_metrics, False)
    # TEI's other routes (/embed_all, /decode, /vertex, ...) and its aliases (/, /ping, /invocations)
    for path, method, route, fn in server.tei.routes():
        add(path, method, route, fn, method == "POST")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              kind, request.url.path in OPENAI_PATHS)

    return app
