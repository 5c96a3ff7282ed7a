"""`create_app(encoder, settings) -> FastAPI`: the routes of `sbert-flax serve`.

Each embedding route: check the key and the body size, parse, tokenize (on the one tokenizer
thread, off the event loop), queue the token ids with the batcher, await the rows, shape the
answer. The event loop only ever awaits: the device runs in the batcher's thread.
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
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sbert_flax.serving import schemas
from sbert_flax.serving.backend import EncoderBackend, InputTooLong
from sbert_flax.serving.batcher import Batcher, Job, Unavailable
from sbert_flax.serving.metrics import ServeMetrics
from sbert_flax.serving.schemas import ApiError
from sbert_flax.serving.settings import ServeSettings

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")
# Seconds a 503 asks the client to wait (Retry-After). This replica is warming up, broken or going
# away, so the retry should land on another one behind the balancer; a few seconds lets the
# balancer's health check take this one out first.
RETRY_AFTER_S = 5


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def json_response(obj, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(schemas.dumps(obj), status_code=status, media_type="application/json",
                    headers=headers)


def unavailable_response(message: str) -> Response:
    """503 in TEI's shape (error_type "unhealthy"), with Retry-After."""
    return json_response({"error": message, "error_type": "unhealthy"}, 503,
                         {"Retry-After": str(RETRY_AFTER_S)})


class Server:
    """The state behind the routes: backend, batcher, metrics, limits."""

    def __init__(self, encoder, settings: ServeSettings):
        self.settings = settings
        self.backend = encoder if isinstance(encoder, EncoderBackend) else EncoderBackend(encoder)
        self.max_batch_tokens = settings.max_batch_tokens or self.backend.max_batch_tokens
        self.metrics = ServeMetrics(compile_count=lambda: self.backend.num_compiles,
                                    queue_size=lambda: self.batcher.queued_inputs)
        self.batcher = Batcher(self.backend, self.max_batch_tokens, self.metrics,
                               warmup=settings.warmup)
        # HF fast tokenizers are not safe to call from two threads at once ("Already borrowed"),
        # so tokenization has one thread of its own, as TEI has tokenization workers.
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, "sbert-flax-tokenizer")
        self.in_flight = 0
        self.started = int(time.time())

    # ---- request plumbing -------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if not key or request.url.path in OPEN_PATHS:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header "
                           "`Authorization: Bearer <key>`", "unauthorized")

    async def read_json(self, request: Request) -> dict:
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
        return schemas.parse_object(b"".join(chunks))

    async def tokenize(self, texts: list[str], truncate: bool, direction: str) -> list[np.ndarray]:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(self.tokenizer_pool, lambda: self.backend.tokenize(
                texts, truncate=truncate, direction=direction))
        except InputTooLong as e:
            raise ApiError(413, f"input {e.index} has {e.length} tokens, more than the maximum "
                           f"input length of {e.limit} tokens; shorten it or send "
                           "\"truncate\": true", "validation") from None
        self.metrics.tokenization_duration.observe(time.perf_counter() - t0)
        return ids

    async def embed(self, request: Request, ids: list[np.ndarray]) -> np.ndarray:
        """Queues `ids` and waits for their rows; a client that hangs up has its work dropped."""
        job: Job = self.batcher.submit(ids)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait((job.future, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future.done():
            return job.future.result()
        self.batcher.cancel(job)
        raise ClientGone()

    async def handle(self, route: str, request: Request,
                     fn: Callable[[Request], Awaitable[Response]], limited: bool) -> Response:
        """Runs one route with metrics, the concurrency limit and JSON errors."""
        t0 = time.perf_counter()
        self.metrics.request_count.labels(route).inc()
        counted = False
        try:
            self.check_key(request)
            if limited:
                if self.in_flight >= self.settings.max_concurrent_requests:
                    raise ApiError(429, f"{self.in_flight} requests in flight, the limit is "
                                   f"{self.settings.max_concurrent_requests} "
                                   "(--max-concurrent-requests); retry later", "overloaded")
                self.in_flight += 1
                self.metrics.in_flight.inc()
                counted = True
            response = await fn(request)
        except ApiError as e:
            self.metrics.request_failure.labels(route, e.error_type).inc()
            return json_response(e.body(), e.status)
        except Unavailable as e:
            self.metrics.request_failure.labels(route, "unhealthy").inc()
            return unavailable_response(str(e))
        except (ClientGone, ClientDisconnect):
            self.metrics.request_failure.labels(route, "client_disconnected").inc()
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 -- a failed request must not take the server down
            log.exception("%s failed", route)
            self.metrics.request_failure.labels(route, "backend").inc()
            return json_response({"error": f"{type(e).__name__}: {e}", "error_type": "backend"}, 500)
        finally:
            if counted:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - t0)
        self.metrics.request_success.labels(route).inc()
        return response

    # ---- routes -------------------------------------------------------------------------------

    async def route_embed(self, request: Request) -> Response:
        obj = await self.read_json(request)
        texts = schemas.text_list(obj, "inputs", self.settings.max_client_batch_size)
        normalize = schemas.optional_bool(obj, "normalize", True)
        truncate = schemas.optional_bool(obj, "truncate", self.settings.auto_truncate)
        dims = schemas.dimensions(obj, self.backend.dim)
        ids = await self.tokenize(texts, truncate, schemas.direction(obj))
        self.metrics.request_inputs.observe(len(ids))
        emb = schemas.shape_embeddings(await self.embed(request, ids), normalize, dims)
        return json_response(emb)

    async def route_openai(self, request: Request) -> Response:
        obj = await self.read_json(request)
        model = obj.get("model")
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                           f"{self.settings.model_name!r}", "model_not_found")
        texts = schemas.text_list(obj, "input", self.settings.max_client_batch_size,
                                  token_ids_hint=True)
        fmt = schemas.encoding_format(obj)
        dims = schemas.dimensions(obj, self.backend.dim)
        ids = await self.tokenize(texts, self.settings.auto_truncate, "right")
        self.metrics.request_inputs.observe(len(ids))
        emb = schemas.shape_embeddings(await self.embed(request, ids), True, dims)
        tokens = int(sum(len(x) for x in ids))
        return json_response(schemas.openai_response(emb, self.settings.model_name, tokens, fmt))

    async def route_similarity(self, request: Request) -> Response:
        obj = await self.read_json(request)
        req = schemas.similarity_request(obj, self.settings.max_client_batch_size)
        truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
        ids = await self.tokenize([req.source, *req.sentences], truncate, req.direction)
        self.metrics.request_inputs.observe(len(ids))
        emb = schemas.l2_normalize(await self.embed(request, ids))
        return json_response(emb[1:] @ emb[0])

    async def route_tokenize(self, request: Request) -> Response:
        obj = await self.read_json(request)
        texts = schemas.text_list(obj, "inputs", self.settings.max_client_batch_size)
        special = schemas.optional_bool(obj, "add_special_tokens", True)
        if self.backend.lowercase_text:  # the tokens the model really sees
            texts = [t.lower() for t in texts]
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.tokenizer_pool, schemas.tokens,
                                         self.backend.hf_tokenizer, texts, special)
        return json_response(out)

    async def route_info(self, request: Request) -> Response:
        s, b = self.settings, self.backend
        return json_response({
            "model_id": s.model_id, "served_model_name": s.model_name, "model_sha": None,
            "model_dtype": b.dtype, "model_type": {"embedding": {"pooling": b.pooling}},
            "dim": b.dim, "max_input_length": b.max_seq_length,
            "max_batch_tokens": self.max_batch_tokens, "max_batch_requests": None,
            "max_client_batch_size": s.max_client_batch_size,
            "max_concurrent_requests": s.max_concurrent_requests, "payload_limit": s.payload_limit,
            "auto_truncate": s.auto_truncate, "tokenization_workers": 1, "version": s.version,
            "ready": self.batcher.ready.is_set(), "compiled_shapes": self.batcher.warmup_shapes,
        })

    async def route_models(self, request: Request) -> Response:
        # OpenAI's model list: some clients check it before calling /v1/embeddings.
        return json_response({"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": self.started,
            "owned_by": "sbert-flax"}]})

    async def route_health(self, request: Request) -> Response:
        # Draining first: a balancer must stop routing here before the process goes away.
        if self.batcher.draining:
            return unavailable_response("shutting down (draining)")
        if self.batcher.ready.is_set():
            return json_response({"status": "ok"})
        if self.batcher.error is not None:
            return unavailable_response(f"the model failed to warm up: {self.batcher.error}")
        return unavailable_response("warming up: compiling the device shapes")

    async def route_metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _wait_disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect (or, once the
    # response is sent, a synthetic one; by then nobody is listening).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(encoder, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving `encoder` (a `SentenceEncoder`) over the TEI and OpenAI APIs.

    The batcher thread starts (and warms up: every shape compiled, then a test batch) when the
    app's lifespan starts; `/health` answers 503 until then. On shutdown the queue is drained.

    Args:
      encoder: the model; the app's worker thread is its only user from then on.
      settings: limits and names; default `ServeSettings()`.
    """
    settings = settings or ServeSettings()
    server = Server(encoder, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.batcher.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.batcher.stop)
        server.tokenizer_pool.shutdown(wait=False)

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
    add("/tokenize", "POST", "tokenize", server.route_tokenize, False)
    add("/info", "GET", "info", server.route_info, False)
    add("/v1/models", "GET", "models", server.route_models, False)
    add("/health", "GET", "health", server.route_health, False)
    add("/metrics", "GET", "metrics", server.route_metrics, False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return json_response({"error": f"{request.method} {request.url.path}: {exc.detail}",
                              "error_type": kind}, exc.status_code)

    return app
