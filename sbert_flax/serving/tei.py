"""TEI's routes for a sentence-embedding model, with its request shapes and status codes.

text-embeddings-inference (router/src/http/server.rs) serves every route for every model and
answers by model type. For a dense embedding model, as this server runs:

- `/embed`, `/embed_all` (each token's hidden state), `/similarity`, `/v1/embeddings` and
  `/embeddings`, `/tokenize`, `/decode`, `/info`, `/health` (also `GET /` and `GET /ping`),
  `/metrics`, `/vertex` (`{"instances": [embed requests]}`), and `POST /` and `POST /invocations`
  (SageMaker's names for /embed) serve.
- `/embed_sparse` (SPLADE models) checks the request as TEI does, then answers 424 `error_type`
  "Backend" with TEI's message and counts `te_request_failure{err="model_type"}`.
- `/predict` and `/rerank` are `rerank_routes`': a cross-encoder's, or the same 424s without one.
  On a server with a cross-encoder only, the embedding routes here answer TEI's 424 for a
  classifier ("Model is not an embedding model"); `rerank_routes` says how routes choose.

`/embed_all` goes through the batcher as /embed does (its own rounds, on the encoder's token
program): the warm-up, the drain, a dead worker and the watchdog apply to it alike.

Inputs are strings or token ids (`[int]`, as TEI's untagged `InputType`); ids are used as given
unless a prompt applies, in which case they are decoded, prefixed and tokenized again (as TEI).
`prompt_name` names one of the model's sentence-transformers prompts; with none the model's
`default_prompt_name` applies, as TEI's `--default-prompt-name` and `SentenceEncoder.encode` do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
from fastapi import Request, Response

from sbert_flax.common.arraylike import l2_normalize_rows
from sbert_flax.models.prompts import Prompts
from sbert_flax.serving import schemas
from sbert_flax.serving.schemas import ApiError, Inputs


def model_type_error(message: str) -> ApiError:
    """TEI's answer on a route this kind of model does not serve (`Backend(Inference(..))`)."""
    return ApiError(424, f"Backend error: {message}", "backend", err="model_type")


class TeiRoutes:
    """The TEI / OpenAI embedding routes over one `Server` (its backend, batcher and limits).

    Args:
      server: the app's `Server`: `tokenize` (the tokenizer pool, with metrics), `embed` (the
        batcher, dropping the work of a client that hangs up), `backend`, `settings`.
    """

    def __init__(self, server):
        self.server = server
        # Decoding token ids (/decode, and ids with a prompt): one host thread of its own.
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "sbert-flax-tei")

    # ---- shared by the embedding routes -------------------------------------------------------

    @property
    def _max_items(self) -> int:
        return self.server.settings.max_client_batch_size

    def prompt(self, prompt_name: str | None) -> str:
        """The text to prepend: the named prompt, else the model's default, else ""."""
        encoder = getattr(self.server.backend, "encoder", None)
        prompts = getattr(encoder, "prompts", None) or Prompts()
        try:
            return prompts.resolve(None, prompt_name)
        except ValueError as e:
            raise ApiError(422, f"`prompt_name`: {e}") from None

    def _tokenizer(self):
        """(the backend's shared Rust tokenizer, vocabulary size), or None for a backend without
        an HF tokenizer (a fake in tests)."""
        rust = getattr(self.server.backend, "rust_tokenizer", None)
        built = rust() if rust is not None else None
        return None if built is None else (built[0], built[2])

    def _check_vocab(self, ids: list[int], where: str) -> None:
        if self._tokenizer() is None:
            return
        _, vocab = self._tokenizer()
        for j, t in enumerate(ids):
            if t >= vocab:
                raise ApiError(422, f"{where}[{j}] = {t} is not in the vocabulary (size {vocab})")

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._tokenizer() is None:
            raise model_type_error("this backend has no tokenizer to decode with")
        return self._tokenizer()[0].decode(ids, skip_special_tokens=skip_special_tokens)

    async def token_ids(self, inputs: Inputs, truncate: bool, direction: str,
                        prefix: str) -> list[np.ndarray]:
        """Token ids per input: texts (prefixed) tokenized on the tokenizer pool, ids as given."""
        loop = asyncio.get_running_loop()
        limit = self.server.backend.max_seq_length
        texts = []
        for i, x in enumerate(inputs.items):
            if isinstance(x, str):
                texts.append(prefix + x)
                continue
            self._check_vocab(x, f"inputs[{i}]" if not inputs.single else "inputs")
            # With a prompt TEI decodes the ids, prepends the prompt and tokenizes again. Without,
            # an empty placeholder keeps every input at its own index in a too-long error.
            texts.append(prefix + await loop.run_in_executor(self.pool, self._decode, x, True)
                         if prefix else "")
        ids = await self.server.tokenize(texts, truncate, direction)
        for i, x in enumerate(inputs.items):
            if isinstance(x, str) or prefix:
                continue
            arr = np.asarray(x, np.int32)
            if len(arr) > limit:
                if not truncate:
                    raise schemas.input_too_long(i, len(arr), limit)
                arr = arr[:limit] if direction == "right" else arr[-limit:]
            ids[i] = arr
        return ids

    def _require_embedder(self) -> None:
        """TEI's 424 on an embedding route of a cross-encoder (core/src/infer.rs `embed`)."""
        if not getattr(self.server.backend, "serves_embeddings", True):
            raise model_type_error("Model is not an embedding model")

    def _embed_fields(self, request: Request, obj: dict, method_field: str = "inputs"
                      ) -> tuple[Inputs, bool, str, str]:
        # Counted before the checks, as TEI counts te_request_count before its batch checks.
        request.state.tei_shape = schemas.request_shape(obj.get(method_field))
        inputs = schemas.inputs(obj, method_field, self._max_items)
        truncate = schemas.optional_bool(obj, "truncate", self.server.settings.auto_truncate)
        prefix = self.prompt(schemas.optional_str(obj, "prompt_name"))
        return inputs, truncate, schemas.direction(obj), prefix

    # ---- routes -------------------------------------------------------------------------------

    async def embed(self, request: Request, obj: dict) -> np.ndarray:
        """/embed: pooled embeddings [n, dim] (normalized unless `normalize` is false)."""
        inputs, truncate, direction, prefix = self._embed_fields(request, obj)
        self._require_embedder()
        normalize = schemas.optional_bool(obj, "normalize", True)
        dims = schemas.dimensions(obj, self.server.backend.dim)
        ids = await self.token_ids(inputs, truncate, direction, prefix)
        return schemas.shape_embeddings(await self.server.embed(request, ids), normalize, dims)

    async def embed_all(self, request: Request, obj: dict) -> list[np.ndarray]:
        """/embed_all: every token's last hidden state, [tokens_i, dim] per input."""
        inputs, truncate, direction, prefix = self._embed_fields(request, obj)
        self._require_embedder()
        if not getattr(self.server.backend, "token_output", False):
            raise model_type_error("this backend has no token-level output")
        ids = await self.token_ids(inputs, truncate, direction, prefix)
        return await self.server.embed(request, ids, output="token")

    async def embed_sparse(self, request: Request, obj: dict):
        self._embed_fields(request, obj)
        raise model_type_error("Model is not an embedding model with SPLADE pooling")

    async def similarity(self, request: Request, obj: dict) -> np.ndarray:
        """/similarity: cosine of each sentence with the source sentence."""
        req = schemas.similarity_request(obj, self._max_items)
        request.state.tei_shape = ("batch", len(req.sentences) + 1)
        self._require_embedder()
        truncate = self.server.settings.auto_truncate if req.truncate is None else req.truncate
        inputs = Inputs([req.source, *req.sentences], False)
        ids = await self.token_ids(inputs, truncate, req.direction, self.prompt(req.prompt_name))
        emb = l2_normalize_rows(await self.server.embed(request, ids))
        return emb[1:] @ emb[0]

    async def openai(self, request: Request, obj: dict) -> dict:
        """/v1/embeddings: any `model` is accepted (TEI serves one model and ignores it) unless
        `--strict-model-name`, which answers 404 for a name other than the served one."""
        settings = self.server.settings
        model = obj.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(422, f"`model` must be a string, got {type(model).__name__}")
        if getattr(settings, "strict_model_name", False) and model not in (None, settings.model_name):
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                           f"{settings.model_name!r} (--strict-model-name)", "model_not_found")
        request.state.tei_shape = schemas.request_shape(obj.get("input"))
        inputs = schemas.inputs(obj, "input", self._max_items)
        self._require_embedder()
        fmt = schemas.encoding_format(obj)
        dims = schemas.dimensions(obj, self.server.backend.dim)
        ids = await self.token_ids(inputs, settings.auto_truncate, "right", self.prompt(None))
        emb = schemas.shape_embeddings(await self.server.embed(request, ids), True, dims)
        tokens = int(sum(len(x) for x in ids))
        return schemas.openai_response(emb, settings.model_name, tokens, fmt)

    async def decode(self, request: Request, obj: dict) -> list[str]:
        """/decode: token ids back to text, per sequence."""
        seqs, single = schemas.decode_ids(obj, self._max_items)
        skip = schemas.optional_bool(obj, "skip_special_tokens", True)
        for i, ids in enumerate(seqs):
            self._check_vocab(ids, "ids" if single else f"ids[{i}]")
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self.pool, self._decode, ids, skip) for ids in seqs]

    async def vertex(self, request: Request, obj: dict) -> dict:
        """/vertex: `{"instances": [...]}`, each an /embed request, or a /rerank one (or a /predict
        one on a cross-encoder alone; `rerank_routes.vertex_instance`) -> `{"predictions": [...]}`.
        """
        instances = obj.get("instances")
        if not isinstance(instances, list):
            raise ApiError(422, f"`instances` must be a list, got {type(instances).__name__}")
        predictions = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise ApiError(422, f"instances[{i}] must be an object, got {type(inst).__name__}")
            route = self.server.rerank_routes.vertex_instance(inst) or self.embed
            predictions.append(await route(request, inst))
        request.state.tei_shape = ("batch", len(instances))
        return {"predictions": predictions}

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    # ---- registration -------------------------------------------------------------------------

    def endpoint(self, fn):
        """`fn(request, body) -> answer` as a route function: read the JSON body, write JSON."""
        async def run(request: Request) -> Response:
            obj = await self.server.read_json(request)
            return Response(schemas.dumps(await fn(request, obj)), media_type="application/json")

        return run

    def routes(self) -> list[tuple[str, str, str, object]]:
        """(path, HTTP method, metric route name, route function) of every TEI route that the
        app's own table does not already hold; GET / and /ping are /health's aliases."""
        rr = self.server.rerank_routes
        # SageMaker's and the Inference API's default route: /embed, or on a cross-encoder alone
        # /rerank or /predict (`rerank_routes.default_route`).
        default = rr.default_route() or ("embed", self.embed)
        post = [("/embed_all", "embed_all", self.embed_all),
                ("/embed_sparse", "embed_sparse", self.embed_sparse),
                ("/predict", "predict", rr.predict), ("/rerank", "rerank", rr.rerank),
                ("/decode", "decode", self.decode), ("/vertex", "vertex", self.vertex),
                ("/", *default), ("/invocations", *default)]
        out = [(path, "POST", name, self.endpoint(fn)) for path, name, fn in post]
        health = self.server.route_health
        return out + [("/", "GET", "health", health), ("/ping", "GET", "health", health)]

