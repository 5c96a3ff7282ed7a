"""TEI's /rerank and /predict over a cross-encoder, and how a server with one picks its routes.

text-embeddings-inference serves one model and answers every route by its type (router/src/lib.rs:
a `...ForSequenceClassification` model with one label is a `reranker`, with several a
`classifier`). sbert-flax serves an embedder, a cross-encoder, or both (`serve --model E
--rerank-model R`), and routes by what each request needs:

- /embed, /embed_all, /similarity, /v1/embeddings, /embeddings (and /vertex's embed instances) go
  to the embedder. Without one (`serve --model R`, R a cross-encoder) they check the request as
  TEI does, then answer 424 `Backend` "Model is not an embedding model" (core/src/infer.rs
  `embed` on a classifier).
- /rerank and /predict go to the cross-encoder. Without one they answer TEI's 424s ("model is not
  a re-ranker model", "Model is not a classifier model"); /rerank on a classifier (several
  labels) answers the first, as TEI's does, and /predict serves both kinds.
- POST / and /invocations (SageMaker's, the Inference API's default route): the embedder's /embed
  when there is one; on a cross-encoder alone /rerank for a reranker and /predict for a
  classifier, as TEI's router picks them (router/src/http/server.rs).
- /tokenize and /decode use the embedder's tokenizer, else the cross-encoder's.
- /info's `model_type` is TEI's for the primary model (the embedder when there is one:
  `{"embedding": {"pooling"}}`; else `{"reranker" | "classifier": {"id2label", "label2id"}}`); a
  server with both adds `rerank_model` (its id, model_type and input length), a field TEI lacks.

Both models share the one batcher: a /rerank or /predict request's pairs are tokenized (`[CLS] a
[SEP] b [SEP]`, token types 0 / 1) on the tokenizer pool, queued as `"score"` work, packed per
round under the token budget and scored on the device, as /embed's texts are.

Request shapes and answers (router/src/http/types.rs, server.rs):

- `/rerank {"query": str, "texts": [str], "truncate": bool | null, "truncation_direction":
  "right" | "left", "raw_scores": false, "return_text": false}` -> `[{"index", "score",
  "text"?}]`, sorted by score, highest first (ties in TEI's order: a stable ascending sort,
  reversed). Empty `texts` 400 `Empty`; more than `--max-client-batch-size` 422.
- `/predict {"inputs": str | [str] | [str, str] | [[str] | [str, str]], "truncate",
  "truncation_direction", "raw_scores"}` -> per input, every label's `{"score", "label"}` sorted
  by score, highest first: `[...]` for one input, `[[...], ...]` for a batch.
- `raw_scores` false applies TEI's activation: sigmoid for one label, softmax for several;
  true gives the logits. Labels come from the model config's `id2label`.
- A pair longer than the maximum input length: truncated `longest_first` (the longer text loses
  tokens first, from `truncation_direction`'s end) when truncating, else 422, as TEI's tokenizer.
  An empty text is scored (as sentence-transformers does, and as this server's /embed embeds
  one), where TEI answers 400 when a whole input is empty.
- A NaN score: 424 `Backend` "score is NaN", as TEI.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from fastapi import Request

from sbert_flax.serving import schemas
from sbert_flax.serving.schemas import ApiError
from sbert_flax.serving.tei import model_type_error

__all__ = ["Pair", "PredictInputs", "RerankRoutes", "activate", "predict_inputs", "tei_order"]

# One input of /predict or /rerank: a text, or a pair of texts (the second None for one text).
Pair = tuple[str, str | None]


@dataclasses.dataclass(frozen=True)
class PredictInputs:
    """TEI's `PredictInput`: one sequence or a batch, each a text or a pair of texts.

    Attributes:
      items: the sequences in request order.
      single: the request sent one sequence (`"a"`, `["a"]` or `["a", "b"]`).
    """

    items: list[Pair]
    single: bool


def _sequence(value: list, where: str) -> Pair:
    """TEI's `Sequence` from a list: one string, or two (a pair); anything else 422."""
    if not 1 <= len(value) <= 2:
        raise ApiError(422, f"`{where}` has {len(value)} strings; a sequence is one string or a "
                       "pair of strings")
    for j, x in enumerate(value):
        if not isinstance(x, str):
            raise ApiError(422, f"{where}[{j}] is {schemas._type_name(x)}, expected a string")
    return (value[0], value[1] if len(value) == 2 else None)


def predict_inputs(obj: dict) -> PredictInputs:
    """/predict's `inputs` as TEI's deserializer reads it (router/src/http/types.rs): a string;
    a list of strings (one or two: one sequence); or a list of such lists (a batch).

    Raises:
      ApiError: 422 for anything else, naming the index.
    """
    if "inputs" not in obj:
        raise ApiError(422, "`inputs` is missing")
    value = obj["inputs"]
    if isinstance(value, str):
        return PredictInputs([(value, None)], True)
    if not isinstance(value, list):
        raise ApiError(422, "`inputs` must be a string, a pair of strings or a list of those, "
                       f"got {schemas._type_name(value)}")
    if not value:
        raise ApiError(422, "`inputs` is an empty list: send a string, a pair of strings [a, b] "
                       "or a batch [[a], [a, b], ...]")
    if not isinstance(value[0], list):  # TEI reads the first element to tell one from a batch
        return PredictInputs([_sequence(value, "inputs")], True)
    items = []
    for i, x in enumerate(value):
        if not isinstance(x, list):
            raise ApiError(422, f"inputs[{i}] is {schemas._type_name(x)}; in a batch every input "
                           "is a list of one or two strings")
        items.append(_sequence(x, f"inputs[{i}]"))
    return PredictInputs(items, False)


def _flag(obj: dict, field: str) -> bool:
    """A `bool` field TEI defaults to false (`#[serde(default)]`: null is refused, as serde does)."""
    if field not in obj:
        return False
    value = obj[field]
    if not isinstance(value, bool):
        raise ApiError(422, f"`{field}` must be true or false, got {schemas._type_name(value)}")
    return value


def activate(logits: np.ndarray, raw_scores: bool) -> np.ndarray:
    """TEI's scores from logits [n, labels] (core/src/infer.rs `predict`): the logits as they
    are with `raw_scores`, else sigmoid for one label and softmax over the labels for several."""
    x = np.asarray(logits, np.float32)
    if raw_scores:
        return x
    if x.shape[1] == 1:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def tei_order(scores: np.ndarray) -> list[int]:
    """Indices by score, highest first, ties as TEI orders them (Rust's stable `sort_by` ascending
    then `reverse`: of two equal scores the later index comes first)."""
    return sorted(range(len(scores)), key=lambda i: float(scores[i]))[::-1]


def _check_finite(scores: np.ndarray) -> None:
    if np.isnan(scores).any():
        raise ApiError(424, "score is NaN", "backend", err="inference")


class RerankRoutes:
    """/rerank and /predict over one `Server`: its backend (`reranker`: a `RerankBackend`, or
    None), the tokenizer pool and the batcher.

    Args:
      server: the app's `Server`.
    """

    def __init__(self, server):
        self.server = server

    @property
    def reranker(self):
        """The cross-encoder's backend, or None on an embedding-only server."""
        return getattr(self.server.backend, "reranker", None)

    @property
    def _max_items(self) -> int:
        return self.server.settings.max_client_batch_size

    def _truncate(self, obj: dict) -> bool:
        return schemas.optional_bool(obj, "truncate", self.server.settings.auto_truncate)

    async def _logits(self, request: Request, pairs: list[Pair], truncate: bool,
                      direction: str) -> np.ndarray:
        """Float32 logits [n, labels]: tokenized on the pool, scored through the batcher."""
        reranker = self.reranker
        ids = await self.server.tokenize(pairs, truncate, direction,
                                         tokenizer=reranker.tokenize_pairs)
        return await self.server.embed(request, ids, output="score")

    # ---- routes -------------------------------------------------------------------------------

    async def rerank(self, request: Request, obj: dict) -> list[dict]:
        """/rerank: each text's relevance to the query, highest first."""
        query, texts = obj.get("query"), obj.get("texts")
        if not isinstance(query, str):
            raise ApiError(422, f"`query` must be a string, got {schemas._type_name(query)}")
        if not isinstance(texts, list):
            raise ApiError(422, f"`texts` must be a list of strings, got "
                           f"{schemas._type_name(texts)}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ApiError(422, f"texts[{i}] is {schemas._type_name(t)}, expected a string")
        truncate, direction = self._truncate(obj), schemas.direction(obj)
        raw_scores, return_text = _flag(obj, "raw_scores"), _flag(obj, "return_text")
        # TEI's order of checks: empty, the model type, then the batch size.
        if not texts:
            raise ApiError(400, "`texts` cannot be empty", "empty")
        reranker = self.reranker
        if reranker is None or reranker.model_type != "reranker":
            raise model_type_error("model is not a re-ranker model")
        request.state.tei_shape = ("batch", len(texts))
        if len(texts) > self._max_items:
            raise ApiError(422, f"batch size {len(texts)} > maximum allowed batch size "
                           f"{self._max_items} (--max-client-batch-size); split the request",
                           err="batch_size")
        logits = await self._logits(request, [(query, t) for t in texts], truncate, direction)
        scores = activate(logits, raw_scores)[:, 0]
        _check_finite(scores)
        out = []
        for i in tei_order(scores):
            rank = {"index": i, "score": scores[i]}
            if return_text:
                rank["text"] = texts[i]
            out.append(rank)
        return out

    async def predict(self, request: Request, obj: dict) -> list:
        """/predict: every label's score per input, highest first."""
        inputs = predict_inputs(obj)
        truncate, direction = self._truncate(obj), schemas.direction(obj)
        raw_scores = _flag(obj, "raw_scores")
        request.state.tei_shape = ("single", 1) if inputs.single else ("batch", len(inputs.items))
        if not inputs.single and len(inputs.items) > self._max_items:
            raise ApiError(422, f"batch size {len(inputs.items)} > maximum allowed batch size "
                           f"{self._max_items} (--max-client-batch-size); split the request",
                           err="batch_size")
        reranker = self.reranker
        if reranker is None:
            raise model_type_error("Model is not a classifier model")
        scores = activate(await self._logits(request, inputs.items, truncate, direction),
                          raw_scores)
        _check_finite(scores)
        labels = reranker.labels
        out = [[{"score": row[k], "label": labels[k]} for k in tei_order(row)] for row in scores]
        return out[0] if inputs.single else out

    def default_route(self):
        """(metric route name, route function) of POST / and /invocations on a server without an
        embedder, as TEI's router picks them; None when /embed serves them."""
        if getattr(self.server.backend, "serves_embeddings", True) or self.reranker is None:
            return None
        if self.reranker.model_type == "reranker":
            return "rerank", self.rerank
        return "predict", self.predict

    def vertex_instance(self, inst: dict):
        """The route function for one /vertex instance, as TEI picks it: a rerank request
        (`query` and `texts`) reranks; else /embed, or /predict on a cross-encoder alone."""
        if "query" in inst and "texts" in inst:
            return self.rerank
        if getattr(self.server.backend, "serves_embeddings", True) or self.reranker is None:
            return None  # TeiRoutes.embed
        return self.predict

    def info(self) -> dict:
        """/info's fields that depend on the models served: TEI's `model_type` (and our `dim`) of
        the primary model; with an embedder and a cross-encoder, `rerank_model` too."""
        b, r = self.server.backend, self.reranker
        if not getattr(b, "serves_embeddings", True):
            return {"model_type": self.model_type()}
        out = {"model_type": {"embedding": {"pooling": b.pooling}}, "dim": b.dim}
        if r is not None:
            out["rerank_model"] = {"model_id": r.model_id, "model_type": self.model_type(),
                                   "model_dtype": r.dtype, "max_input_length": r.max_seq_length}
        return out

    def model_type(self) -> dict:
        """TEI's `ModelType` of the cross-encoder: `{"reranker" | "classifier": {"id2label",
        "label2id"}}`."""
        r = self.reranker
        return {r.model_type: {"id2label": {str(i): label for i, label in enumerate(r.labels)},
                               "label2id": {label: i for i, label in enumerate(r.labels)}}}
