"""Every response of every route `sbert-flax serve` answers validates against the schema that
text-embeddings-inference publishes for that route and status.

The schemas are restated from TEI's API description, `docs/openapi.json` of v1.9.3
(huggingface/text-embeddings-inference; `components.schemas` and each path's `responses`), with
the few routes that file leaves out restated from TEI's router source of the same version
(router/src/http/server.rs: /embeddings is /v1/embeddings, `POST /` and /invocations are /embed,
`GET /` and /ping are /health; router/src/http/types.rs: `VertexResponse`). A status TEI does not
list for a route (401, 404, 405, 408, 413, 500, 503) is held to the route's error schema: TEI's
`ErrorResponse`, or `OpenAICompatErrorResponse` on the OpenAI routes.

Here: a fault-injecting fake backend (tests/serve_fault_driver.py) in-process (httpx over ASGI,
its lifespan driven as a server does), walked through every route's good answers and every
refusal and failure it can give; tests/serving/test_serving_tei.py walks the real tiny model's routes
over HTTP with the same check (`assert_tei_schema`).
"""

from __future__ import annotations

import asyncio
import time

import httpx
from serve_fault_driver import FaultyBackend
from test_serving_app import Lifespan

from sbert_flax.serving import ServeSettings, create_app

# ---- TEI's schemas (docs/openapi.json v1.9.3, components.schemas), restated --------------------

_FLOATS = {"type": "array", "items": {"type": "number"}}
SCHEMAS = {
    "ErrorType": {"type": "string", "enum": ["Unhealthy", "Backend", "Overloaded", "Validation",
                                             "Tokenizer", "Empty"]},
    "ErrorResponse": {"type": "object", "required": ["error", "error_type"], "properties": {
        "error": {"type": "string"}, "error_type": {"$ref": "ErrorType"}}},
    "OpenAICompatErrorResponse": {"type": "object", "required": ["message", "code", "error_type"],
                                  "properties": {"message": {"type": "string"},
                                                 "code": {"type": "integer", "minimum": 0},
                                                 "error_type": {"$ref": "ErrorType"}}},
    "EmbedResponse": {"type": "array", "items": _FLOATS},
    "EmbedAllResponse": {"type": "array", "items": {"type": "array", "items": _FLOATS}},
    "SimilarityResponse": _FLOATS,
    "SimpleToken": {"type": "object", "required": ["id", "text", "special"], "properties": {
        "id": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
        "special": {"type": "boolean"},
        "start": {"type": "integer", "minimum": 0, "nullable": True},
        "stop": {"type": "integer", "minimum": 0, "nullable": True}}},
    "TokenizeResponse": {"type": "array", "items": {"type": "array",
                                                    "items": {"$ref": "SimpleToken"}}},
    "DecodeResponse": {"type": "array", "items": {"type": "string"}},
    "SparseValue": {"type": "object", "required": ["index", "value"], "properties": {
        "index": {"type": "integer", "minimum": 0}, "value": {"type": "number"}}},
    "EmbedSparseResponse": {"type": "array", "items": {"type": "array",
                                                       "items": {"$ref": "SparseValue"}}},
    "Prediction": {"type": "object", "required": ["score", "label"], "properties": {
        "score": {"type": "number"}, "label": {"type": "string"}}},
    "PredictResponse": {"oneOf": [
        {"type": "array", "items": {"$ref": "Prediction"}},
        {"type": "array", "items": {"type": "array", "items": {"$ref": "Prediction"}}}]},
    "Rank": {"type": "object", "required": ["index", "score"], "properties": {
        "index": {"type": "integer", "minimum": 0}, "score": {"type": "number"},
        "text": {"type": "string", "nullable": True}}},
    "RerankResponse": {"type": "array", "items": {"$ref": "Rank"}},
    "EmbeddingModel": {"type": "object", "required": ["pooling"],
                       "properties": {"pooling": {"type": "string"}}},
    "ClassifierModel": {"type": "object", "required": ["id2label", "label2id"], "properties": {
        "id2label": {"type": "object", "additionalProperties": {"type": "string"}},
        "label2id": {"type": "object",
                     "additionalProperties": {"type": "integer", "minimum": 0}}}},
    "ModelType": {"oneOf": [
        {"type": "object", "required": ["classifier"],
         "properties": {"classifier": {"$ref": "ClassifierModel"}}},
        {"type": "object", "required": ["embedding"],
         "properties": {"embedding": {"$ref": "EmbeddingModel"}}},
        {"type": "object", "required": ["reranker"],
         "properties": {"reranker": {"$ref": "ClassifierModel"}}}]},
    "Info": {"type": "object", "required": [
        "model_id", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
        "max_input_length", "max_batch_tokens", "max_client_batch_size", "auto_truncate",
        "tokenization_workers", "version"], "properties": {
        "model_id": {"type": "string"}, "model_sha": {"type": "string", "nullable": True},
        "model_dtype": {"type": "string"}, "served_model_name": {"type": "string"},
        "model_type": {"$ref": "ModelType"},
        "max_concurrent_requests": {"type": "integer", "minimum": 0},
        "max_input_length": {"type": "integer", "minimum": 0},
        "max_batch_tokens": {"type": "integer", "minimum": 0},
        "max_batch_requests": {"type": "integer", "minimum": 0, "nullable": True},
        "max_client_batch_size": {"type": "integer", "minimum": 0},
        "auto_truncate": {"type": "boolean"},
        "tokenization_workers": {"type": "integer", "minimum": 0},
        "version": {"type": "string"}, "sha": {"type": "string", "nullable": True},
        "docker_label": {"type": "string", "nullable": True}}},
    "Embedding": {"oneOf": [_FLOATS, {"type": "string"}]},
    "OpenAICompatEmbedding": {"type": "object", "required": ["object", "embedding", "index"],
                              "properties": {"object": {"type": "string"},
                                             "embedding": {"$ref": "Embedding"},
                                             "index": {"type": "integer", "minimum": 0}}},
    "OpenAICompatUsage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                          "properties": {"prompt_tokens": {"type": "integer", "minimum": 0},
                                         "total_tokens": {"type": "integer", "minimum": 0}}},
    "OpenAICompatResponse": {"type": "object", "required": ["object", "data", "model", "usage"],
                             "properties": {"object": {"type": "string"},
                                            "data": {"type": "array",
                                                     "items": {"$ref": "OpenAICompatEmbedding"}},
                                            "model": {"type": "string"},
                                            "usage": {"$ref": "OpenAICompatUsage"}}},
    # router/src/http/types.rs: `VertexResponse { predictions: Vec<VertexPrediction> }`, the
    # prediction an untagged `EmbedResponse` for an embedding model (not in openapi.json).
    "VertexResponse": {"type": "object", "required": ["predictions"], "properties": {
        "predictions": {"type": "array", "items": {"$ref": "EmbedResponse"}}}},
    # Not TEI's: OpenAI's model list (platform.openai.com/docs/api-reference/models/list), which
    # sbert-flax adds for clients that check it before /v1/embeddings.
    "OpenAIModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object", "created", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                           "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}}},
}

# ---- each route's responses (openapi.json v1.9.3 `paths`): status -> schema --------------------

_INFERENCE = {"200": None, "400": "ErrorResponse", "413": "ErrorResponse",
              "422": "ErrorResponse", "424": "ErrorResponse", "429": "ErrorResponse"}
_TOKENIZE = {"200": None, "400": "ErrorResponse", "413": "ErrorResponse", "422": "ErrorResponse"}
ROUTES: dict[tuple[str, str], dict[str, str | None]] = {
    ("POST", "/embed"): {**_INFERENCE, "200": "EmbedResponse"},
    ("POST", "/embed_all"): {**_INFERENCE, "200": "EmbedAllResponse"},
    ("POST", "/embed_sparse"): {**_INFERENCE, "200": "EmbedSparseResponse"},
    ("POST", "/predict"): {**_INFERENCE, "200": "PredictResponse"},
    ("POST", "/rerank"): {**_INFERENCE, "200": "RerankResponse"},
    ("POST", "/similarity"): {**_INFERENCE, "200": "SimilarityResponse"},
    ("POST", "/tokenize"): {**_TOKENIZE, "200": "TokenizeResponse"},
    ("POST", "/decode"): {**_TOKENIZE, "200": "DecodeResponse"},
    ("POST", "/v1/embeddings"): {k: "OpenAICompatErrorResponse" for k in _INFERENCE}
    | {"200": "OpenAICompatResponse"},
    ("GET", "/info"): {"200": "Info"},
    ("GET", "/health"): {"200": None, "503": "ErrorResponse"},  # 200: no body described
    ("GET", "/metrics"): {"200": "text/plain"},
    ("POST", "/vertex"): {**_INFERENCE, "200": "VertexResponse"},
    ("GET", "/v1/models"): {"200": "OpenAIModelList"},
}
ALIASES = {("POST", "/embeddings"): ("POST", "/v1/embeddings"), ("POST", "/"): ("POST", "/embed"),
           ("POST", "/invocations"): ("POST", "/embed"), ("GET", "/"): ("GET", "/health"),
           ("GET", "/ping"): ("GET", "/health")}
OPENAI_ROUTES = {("POST", "/v1/embeddings"), ("POST", "/embeddings")}


# ---- a validator for the part of OpenAPI 3.0's schema language these use ------------------------

def validate(value, schema: dict, where: str = "$") -> None:
    """Raises AssertionError naming the first place where `value` breaks `schema`."""
    if "$ref" in schema:
        return validate(value, SCHEMAS[schema["$ref"]], where)
    if value is None:
        assert schema.get("nullable"), f"{where}: null, which the schema does not allow"
        return None
    if "oneOf" in schema:
        fits = []
        for option in schema["oneOf"]:
            try:
                validate(value, option, where)
                fits.append(option)
            except AssertionError:
                pass
        assert len(fits) == 1, f"{where}: {value!r:.80} fits {len(fits)} of oneOf, not 1"
        return None
    kind = schema.get("type")
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool)}
    if kind is not None:
        assert checks[kind](value), f"{where}: {value!r:.80} is not of type {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} is not one of {schema['enum']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"
    if kind == "object":
        for key in schema.get("required", []):
            assert key in value, f"{where}: the required field {key!r} is missing: {value!r:.200}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in schema.get("properties", {}):
                    validate(item, extra, f"{where}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{i}]")
    return None


def response_schema(method: str, path: str, status: int) -> str | None:
    """The schema TEI describes for this route and status (its error schema for an unlisted
    error status); None where TEI describes no body."""
    route = ALIASES.get((method, path), (method, path))
    if route not in ROUTES:  # an unknown route (404) or method (405): TEI's error shape
        return "OpenAICompatErrorResponse" if ("POST", path) in OPENAI_ROUTES else "ErrorResponse"
    listed = ROUTES[route]
    if str(status) in listed:
        return listed[str(status)]
    assert status >= 400, f"{method} {path}: {status} is neither TEI's nor an error"
    return "OpenAICompatErrorResponse" if route == ("POST", "/v1/embeddings") else "ErrorResponse"


def assert_tei_schema(r: httpx.Response) -> None:
    """`r` validates against TEI's schema for its route and status."""
    method, path, status = r.request.method, r.request.url.path, r.status_code
    name = response_schema(method, path, status)
    where = f"{method} {path} -> {status}"
    if name is None:
        return
    if name == "text/plain":
        assert r.headers["content-type"].startswith("text/plain"), (where, r.headers)
        return
    assert r.headers["content-type"].startswith("application/json"), (where, r.headers, r.text)
    try:
        validate(r.json(), SCHEMAS[name])
    except AssertionError as e:
        raise AssertionError(f"{where} breaks TEI's {name}: {e}\n{r.text[:500]}") from None


# ---- the walk on a fault-injecting fake backend -------------------------------------------------

KEY = "sk-schemas"
AUTH = {"authorization": f"Bearer {KEY}"}
WAIT_S = 120  # ceiling of every wait on the server's threads (a loaded CI host is slow)
TIMEOUT_S = 1.0  # --request-timeout: the 408 and the 503 for a device that does not answer


def _good_and_bad() -> list[tuple[str, str, object, int]]:
    """(method, path, JSON body or raw bytes, expected status) for each route's good answers
    and each refusal that depends on the request alone."""
    cases: list[tuple[str, str, object, int]] = []
    for path in ("/embed", "/", "/invocations", "/embed_all"):
        cases += [("POST", path, {"inputs": ["a", "b"]}, 200), ("POST", path, {"inputs": []}, 400),
                  ("POST", path, {"inputs": ["a", 3]}, 422),
                  ("POST", path, {"inputs": ["a"] * 5}, 422),
                  ("POST", path, b'{"inputs": ["a"', 400), ("POST", path, b'["a"]', 422)]
    for path in ("/v1/embeddings", "/embeddings"):
        cases += [("POST", path, {"input": ["a", "b"]}, 200),
                  ("POST", path, {"input": "a", "encoding_format": "base64"}, 200),
                  ("POST", path, {"input": []}, 400), ("POST", path, {"input": 3}, 422),
                  ("POST", path, {"input": ["a"] * 5}, 422), ("POST", path, b"{", 400),
                  ("GET", path, None, 405)]
    cases += [
        ("POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}, 200),
        ("POST", "/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400),
        ("POST", "/similarity", {"inputs": {"source_sentence": 1}}, 422),
        ("POST", "/tokenize", {"inputs": ["a", "b"]}, 200),
        ("POST", "/tokenize", {"inputs": ["a"] * 5}, 422),
        ("POST", "/decode", {"ids": [101, 102]}, 424),  # the fake has no tokenizer to decode
        ("POST", "/decode", {"ids": []}, 400), ("POST", "/decode", {"ids": "a"}, 422),
        ("POST", "/vertex", {"instances": [{"inputs": "a"}, {"inputs": ["a", "b"]}]}, 200),
        ("POST", "/vertex", {"instances": 3}, 422),
        ("POST", "/embed_sparse", {"inputs": "a"}, 424),
        ("POST", "/embed_sparse", {"inputs": []}, 400),
        ("POST", "/predict", {"inputs": "a"}, 424), ("POST", "/rerank",
                                                    {"query": "q", "texts": ["a"]}, 424),
        ("POST", "/rerank", {"query": "q", "texts": []}, 400),
        ("POST", "/embed", {"inputs": "x" * 3000}, 413),
        ("POST", "/v1/embeddings", {"input": "x" * 3000}, 413),
        ("POST", "/nope", {"inputs": "a"}, 404), ("GET", "/embed", None, 405),
        ("POST", "/embed", {"inputs": "tokfail"}, 500),  # a bug, not the request's fault
        ("POST", "/v1/embeddings", {"input": "tokfail"}, 500),
        ("POST", "/embed", {"inputs": "boom"}, 503),  # the device batch failed: retry
        ("POST", "/v1/embeddings", {"input": "boom"}, 503),
    ]
    for method, path in [("GET", "/info"), ("GET", "/health"), ("GET", "/"), ("GET", "/ping"),
                         ("GET", "/metrics"), ("GET", "/v1/models")]:
        cases.append((method, path, None, 200))
    return cases


async def _send(client: httpx.AsyncClient, method: str, path: str, body, headers=AUTH):
    if isinstance(body, bytes):
        return await client.request(method, path, content=body, headers={
            **headers, "content-type": "application/json"})
    return await client.request(method, path, json=body, headers=headers)


def test_every_route_answers_in_tei_schemas():
    """Good answers, refusals (400, 401, 404, 405, 408, 413, 422, 424, 429) and failures (500,
    503: a failed batch, a device past the timeout, the drain) of every route."""
    backend = FaultyBackend()
    app = create_app(backend, ServeSettings(
        api_key=KEY, max_client_batch_size=4, payload_limit=2000, request_timeout=TIMEOUT_S,
        max_concurrent_requests=1))
    seen: list[httpx.Response] = []

    def check(r: httpx.Response, status: int) -> None:
        assert r.status_code == status, (r.request.method, r.request.url.path, r.status_code,
                                         status, r.text)
        assert_tei_schema(r)
        seen.append(r)

    async def run():
        life = Lifespan(app)
        await life.startup()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=WAIT_S) as client:
            assert await asyncio.to_thread(app.state.server.batcher.ready.wait, WAIT_S)
            for method, path, body, status in _good_and_bad():
                check(await _send(client, method, path, body), status)
            for path in ("/embed", "/v1/embeddings", "/info"):  # no API key
                check(await _send(client, "POST" if path != "/info" else "GET", path,
                                  {"inputs": "a", "input": "a"} if path != "/info" else None,
                                  headers={}), 401)

            # A body that stops half-way: 408 at --request-timeout.
            async def stalled():
                yield b'{"inputs": ["a'
                await asyncio.Event().wait()

            check(await client.post("/embed", content=stalled(), headers=AUTH), 408)

            # A device that does not answer: the one slot is taken (429 for the next request),
            # then the held request gets 503 at --request-timeout.
            backend.gate.clear()
            backend.entered.clear()
            held = asyncio.ensure_future(_send(client, "POST", "/embed", {"inputs": "hold"}))
            assert await asyncio.to_thread(backend.entered.wait, WAIT_S), "never on the device"
            for path in ("/embed", "/v1/embeddings"):
                check(await _send(client, "POST", path, {"inputs": "a", "input": "a"}), 429)
            check(await held, 503)
            held = asyncio.ensure_future(_send(client, "POST", "/v1/embeddings",
                                               {"input": "hold"}))
            check(await held, 503)

            # The drain (the lifespan's shutdown) with that round still on the device: every
            # route and /health answer 503 until it ends.
            stopping = asyncio.ensure_future(life.shutdown())
            deadline = time.monotonic() + WAIT_S
            while app.state.server.batcher.draining is False:
                assert time.monotonic() < deadline, "the drain never began"
                await asyncio.sleep(0.01)
            for path in ("/embed", "/v1/embeddings", "/embed_all", "/similarity"):
                body = {"inputs": "a", "input": "a"} if path != "/similarity" else {
                    "inputs": {"source_sentence": "a", "sentences": ["b"]}}
                check(await _send(client, "POST", path, body), 503)
            check(await client.get("/health"), 503)
            backend.gate.set()
            await stopping

    asyncio.run(run())
    statuses = {r.status_code for r in seen}
    assert statuses == {200, 400, 401, 404, 405, 408, 413, 422, 424, 429, 500, 503}, statuses
    routes = {(r.request.method, r.request.url.path) for r in seen}
    assert set(ROUTES) | set(ALIASES) <= routes, set(ROUTES) | set(ALIASES) - routes


def test_openai_sdk_errors_carry_the_message():
    """The `openai` SDK on TEI's OpenAI-compatible errors: each refusal and failure raises its
    class with the server's message in the exception's text and TEI's type in `.type`."""
    import openai

    backend = FaultyBackend()
    app = create_app(backend, ServeSettings(max_client_batch_size=4, api_key=KEY))

    async def run():
        life = Lifespan(app)
        await life.startup()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEY, http_client=http,
                                    max_retries=0)
        try:
            assert await asyncio.to_thread(app.state.server.batcher.ready.wait, WAIT_S)
            for inputs, error, status, error_type, needle in [
                    ([], openai.BadRequestError, 400, "Empty", "cannot be empty"),
                    (["a"] * 5, openai.UnprocessableEntityError, 422, "Validation",
                     "batch size 5 > maximum"),
                    ("boom", openai.InternalServerError, 503, "Backend", "device error"),
                    ("tokfail", openai.InternalServerError, 500, "Backend", "tokenizer bug")]:
                try:
                    await client.embeddings.create(model="m", input=inputs)
                except error as e:
                    assert needle in str(e), (inputs, str(e))
                    assert e.status_code == status and e.code == str(status), (inputs, e.body)
                    assert e.type == error_type and e.body["error_type"] == error_type, e.body
                else:
                    raise AssertionError(f"{inputs!r}: no {error.__name__}")
            wrong = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong",
                                       http_client=http, max_retries=0)
            try:
                await wrong.embeddings.create(model="m", input="a")
            except openai.AuthenticationError as e:
                assert "API key" in str(e) and e.type == "Validation", e.body
            else:
                raise AssertionError("no AuthenticationError")
        finally:
            await http.aclose()
            await life.shutdown()

    asyncio.run(run())
