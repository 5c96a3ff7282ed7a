"""Request parsing and response shapes of the TEI and OpenAI embedding APIs.

Requests are checked by hand rather than by a pydantic model so every refusal says exactly what
was wrong and where (`inputs[3] is object, expected a string or token ids`), in the error shape
TEI clients read: `{"error": "...", "error_type": "Validation"}` (TEI's `ErrorResponse`; on the
OpenAI routes its `OpenAICompatErrorResponse`). Status codes are TEI's
(router/src/http/server.rs, `From<&ErrorType> for StatusCode`): an empty input 400, a malformed
field, too many inputs or an over-long input 422, overloaded 429, a route this kind of model does
not serve 424; a body that is not JSON at all 400, as axum's JSON extractor answers a syntax error.

- TEI `/embed`: `{"inputs": str | [int] | [str | [int]], "normalize": true, "truncate": bool |
  null, "truncation_direction": "right" | "left", "prompt_name": str | null, "dimensions": int |
  null}` -> `[[float]]`. `/embed_all` (no normalize/dimensions) -> `[[[float]]]` per token.
- TEI `/similarity`: `{"inputs": {"source_sentence": str, "sentences": [str]},
  "parameters": {"truncate", "truncation_direction", "prompt_name"}}` -> `[float]` (cosine).
- TEI `/tokenize`: `{"inputs": str | [str], "add_special_tokens": true, "prompt_name"}` ->
  `[[{"id", "text", "special", "start", "stop"}]]`; `/decode`: `{"ids": [int] | [[int]],
  "skip_special_tokens": true}` -> `[str]`.
- OpenAI `/v1/embeddings`: `{"input": str | [int] | [str | [int]], "model": str,
  "encoding_format": "float" | "base64", "dimensions": int, "user": str}` -> `{"object": "list",
  "data": [{"object": "embedding", "embedding": [float] | base64 str, "index": i}], "model",
  "usage": {"prompt_tokens", "total_tokens"}}`.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np
import orjson

from sbert_flax.common.arraylike import l2_normalize_rows
from sbert_flax.serving.prometheus import failure_label

# TEI takes token ids as u32.
MAX_TOKEN_ID = 2 ** 32 - 1


# TEI's `ErrorType` (router/src/lib.rs), which it serialises as written, for each kind of refusal
# of ours. The kind (lowercase) stays the `err` label of te_request_failure; clients see TEI's
# spelling. Refusals TEI leaves to axum (a bare 401, 404, 405 or 413 with no JSON body) or does
# not have are the client's request at fault (Validation) or the server's state (Unhealthy).
TEI_ERROR_TYPES = {
    "validation": "Validation", "empty": "Empty", "tokenizer": "Tokenizer", "backend": "Backend",
    "overloaded": "Overloaded", "unhealthy": "Unhealthy",
    "unauthorized": "Validation", "payload_too_large": "Validation", "body_timeout": "Validation",
    "not_found": "Validation", "method_not_allowed": "Validation", "model_not_found": "Validation",
    "timeout": "Unhealthy",
}


def tei_error_type(kind: str, status: int) -> str:
    """TEI's `ErrorType` for one of our error kinds (an unknown one by its status class)."""
    return TEI_ERROR_TYPES.get(kind) or ("Backend" if status >= 500 else "Validation")


def error_body(message: str, status: int, kind: str, openai: bool = False) -> dict:
    """TEI's `ErrorResponse`, or on the OpenAI routes its `OpenAICompatErrorResponse`.

    The OpenAI shape carries the type twice: `error_type` is the field TEI's published API
    description (docs/openapi.json) requires, `type` the name TEI's serde actually writes
    (`#[serde(rename(serialize = "type"))]`) and the one the `openai` SDK reads into
    `APIError.type`; its `message` is what the SDK puts in the exception's text.
    """
    error_type = tei_error_type(kind, status)
    if openai:
        return {"message": message, "code": status, "type": error_type, "error_type": error_type}
    return {"error": message, "error_type": error_type}


class ApiError(Exception):
    """A refusal with its HTTP status and kind (`TEI_ERROR_TYPES` maps it to TEI's type)."""

    def __init__(self, status: int, message: str, kind: str = "validation",
                 err: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        # The `err` label of te_request_failure: TEI's name for this refusal ("batch_size", ...).
        self.err = err or failure_label(kind)

    def body(self, openai: bool = False) -> dict:
        return error_body(self.message, self.status, self.kind, openai)


def input_too_long(index: int, length: int, limit: int) -> ApiError:
    """TEI's 422 for an input over the maximum length while truncation is off (texts and token
    ids alike)."""
    return ApiError(422, f"input {index} has {length} tokens, more than the maximum input length "
                    f"of {limit} tokens; shorten it or send \"truncate\": true",
                    err="tokenization")


def dumps(obj: Any) -> bytes:
    """JSON bytes; numpy arrays are written directly (float32 values round-trip exactly)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def parse_object(body: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        # A syntax error is 400, as axum's `Json` extractor answers in TEI; JSON of the wrong
        # shape (below, and every field check) is 422, as its data errors are.
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(obj).__name__}")
    return obj


def _type_name(x: Any) -> str:
    return "null" if x is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                     int: "integer", float: "number"}.get(type(x), type(x).__name__)


def _batch_checks(field: str, value: list, max_items: int) -> None:
    if not value:
        raise ApiError(400, f"`{field}` cannot be empty: send at least one input", "empty")
    if len(value) > max_items:
        raise ApiError(422, f"batch size {len(value)} > maximum allowed batch size {max_items} "
                       "(--max-client-batch-size); split the request", err="batch_size")


def text_list(obj: dict, field: str, max_items: int) -> list[str]:
    """A `str | [str]` field as a non-empty list of strings.

    An empty string is embedded (as sentence-transformers does), where TEI answers 400.

    Raises:
      ApiError: 422 missing / an item that is not a string (naming its index) / more items than
        `max_items`; 400 an empty list.
    """
    if field not in obj:
        raise ApiError(422, f"`{field}` is missing")
    value = obj[field]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(422, f"`{field}` must be a string or a list of strings, got {_type_name(value)}")
    _batch_checks(field, value, max_items)
    for i, x in enumerate(value):
        if not isinstance(x, str):
            raise ApiError(422, f"{field}[{i}] is {_type_name(x)}, expected a string")
    return value


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _check_ids(ids: list, where: str) -> list[int]:
    if not ids:
        raise ApiError(400, f"`{where}` is an empty list of token ids", "empty")
    for j, t in enumerate(ids):
        if not 0 <= t <= MAX_TOKEN_ID:
            raise ApiError(422, f"{where}[{j}] = {t} is not a token id (0 .. {MAX_TOKEN_ID})")
    return ids


@dataclasses.dataclass(frozen=True)
class Inputs:
    """TEI's `Input`: one input or a batch, each a string or a list of token ids.

    Attributes:
      items: the inputs in request order: `str` or `list[int]`.
      single: the request sent one input (`"inputs": "text"` or `[ids]`).
    """

    items: list
    single: bool


def request_shape(value: Any) -> tuple[str, int] | None:
    """(TEI's `method` label, number of inputs) of an `inputs` value that TEI would deserialize
    (a string or a list); None for anything else, which TEI rejects before counting it."""
    if isinstance(value, str):
        return "single", 1
    if isinstance(value, list):
        return ("single", 1) if value and _is_ids(value) else ("batch", len(value))
    return None


def inputs(obj: dict, field: str, max_items: int) -> Inputs:
    """TEI's `inputs` (OpenAI's `input`): `str | [int] | [str | [int]]`, as TEI's untagged serde
    enum reads it: a list of integers is one input of token ids.

    Raises:
      ApiError: 422 missing / wrong type (naming the index) / more than `max_items`; 400 empty.
    """
    if field not in obj:
        raise ApiError(422, f"`{field}` is missing")
    value = obj[field]
    if isinstance(value, str):
        return Inputs([value], True)
    if not isinstance(value, list):
        raise ApiError(422, f"`{field}` must be a string, a list of token ids or a list of those, "
                       f"got {_type_name(value)}")
    if value and _is_ids(value):
        return Inputs([_check_ids(value, field)], True)
    _batch_checks(field, value, max_items)
    for i, x in enumerate(value):
        if isinstance(x, str):
            continue
        if _is_ids(x):
            _check_ids(x, f"{field}[{i}]")
        else:
            raise ApiError(422, f"{field}[{i}] is {_type_name(x)}, expected a string or a list of "
                           "token ids")
    return Inputs(value, False)


def optional_str(obj: dict, field: str) -> str | None:
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"`{field}` must be a string or null, got {_type_name(value)}")
    return value


def decode_ids(obj: dict, max_items: int) -> tuple[list[list[int]], bool]:
    """TEI /decode's `ids`: `[int]` (one sequence) or `[[int]]`; returns (sequences, single)."""
    if "ids" not in obj:
        raise ApiError(422, "`ids` is missing")
    value = obj["ids"]
    if not isinstance(value, list):
        raise ApiError(422, f"`ids` must be a list of token ids or a list of those, got "
                       f"{_type_name(value)}")
    if not value:  # TEI reads [] as one empty sequence
        raise ApiError(400, "`input_ids` cannot be empty", "empty")
    if _is_ids(value):
        return [_check_ids(value, "ids")], True
    _batch_checks("ids", value, max_items)
    for i, x in enumerate(value):
        if not _is_ids(x):
            raise ApiError(422, f"ids[{i}] is {_type_name(x)}, expected a list of token ids")
        _check_ids(x, f"ids[{i}]")
    return value, False


def optional_bool(obj: dict, field: str, default: bool | None) -> bool | None:
    value = obj.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"`{field}` must be true or false, got {_type_name(value)}")
    return value


def direction(obj: dict) -> str:
    value = obj.get("truncation_direction")
    if value is None:
        return "right"
    if not isinstance(value, str) or value.lower() not in ("right", "left"):
        raise ApiError(422, f"`truncation_direction` must be \"right\" or \"left\", got {value!r}")
    return value.lower()


def dimensions(obj: dict, dim: int) -> int | None:
    value = obj.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= dim:
        raise ApiError(422, f"`dimensions` must be an integer in [1, {dim}] (the model's "
                       f"dimension), got {value!r}")
    return value


def encoding_format(obj: dict) -> str:
    value = obj.get("encoding_format")
    if value is None:
        return "float"
    if value not in ("float", "base64"):
        raise ApiError(422, f"`encoding_format` must be \"float\" or \"base64\", got {value!r}")
    return value


def shape_embeddings(emb: np.ndarray, normalize: bool, dims: int | None) -> np.ndarray:
    """Matryoshka-style truncation to `dims` (then renormalised when `normalize`)."""
    if dims is not None:
        emb = emb[:, :dims]
    return l2_normalize_rows(emb) if normalize else emb


def openai_response(emb: np.ndarray, model: str, prompt_tokens: int, fmt: str) -> dict:
    if fmt == "base64":
        rows = [base64.b64encode(np.ascontiguousarray(r, "<f4").tobytes()).decode("ascii")
                for r in emb]
    else:
        rows = list(emb)
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": r, "index": i} for i, r in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


@dataclasses.dataclass(frozen=True)
class SimilarityRequest:
    source: str
    sentences: list[str]
    truncate: bool | None
    direction: str
    prompt_name: str | None = None


def similarity_request(obj: dict, max_items: int) -> SimilarityRequest:
    inputs = obj.get("inputs")
    if not isinstance(inputs, dict):
        raise ApiError(422, "`inputs` must be an object {\"source_sentence\": str, "
                       f"\"sentences\": [str]}}, got {_type_name(inputs)}")
    source = inputs.get("source_sentence")
    if not isinstance(source, str):
        raise ApiError(422, f"`inputs.source_sentence` must be a string, got {_type_name(source)}")
    sentences = text_list(inputs, "sentences", max_items - 1)
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(422, f"`parameters` must be an object, got {_type_name(params)}")
    return SimilarityRequest(source, sentences, optional_bool(params, "truncate", None),
                             direction(params), optional_str(params, "prompt_name"))
