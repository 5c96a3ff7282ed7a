"""Request parsing and response shapes of the TEI and OpenAI embedding APIs.

Requests are checked by hand rather than by a pydantic model so every refusal says exactly what
was wrong and where (`input[3] is int, expected a string`), in the error shape TEI clients read:
`{"error": "...", "error_type": "..."}`.

- TEI `/embed`: `{"inputs": str | [str], "normalize": true, "truncate": bool | null,
  "truncation_direction": "right" | "left", "dimensions": int | null}` -> `[[float]]`.
- TEI `/similarity`: `{"inputs": {"source_sentence": str, "sentences": [str]},
  "parameters": {"truncate", "truncation_direction"}}` -> `[float]` (cosine).
- TEI `/tokenize`: `{"inputs": str | [str], "add_special_tokens": true}` ->
  `[[{"id", "text", "special", "start", "stop"}]]`.
- OpenAI `/v1/embeddings`: `{"input": str | [str], "model": str, "encoding_format": "float" |
  "base64", "dimensions": int, "user": str}` -> `{"object": "list", "data": [{"object":
  "embedding", "embedding": [float] | base64 str, "index": i}], "model", "usage":
  {"prompt_tokens", "total_tokens"}}`.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np
import orjson


class ApiError(Exception):
    """A refusal with its HTTP status and TEI error type."""

    def __init__(self, status: int, message: str, error_type: str = "validation"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def dumps(obj: Any) -> bytes:
    """JSON bytes; numpy arrays are written directly (float32 values round-trip exactly)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def parse_object(body: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(422, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(obj).__name__}")
    return obj


def _type_name(x: Any) -> str:
    return "null" if x is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                     int: "integer", float: "number"}.get(type(x), type(x).__name__)


def text_list(obj: dict, field: str, max_items: int, token_ids_hint: bool = False) -> list[str]:
    """A `str | [str]` field as a non-empty list of strings.

    Raises:
      ApiError: 422 missing / empty / an item that is not a string (naming its index); 413 more
        items than `max_items`.
    """
    if field not in obj:
        raise ApiError(422, f"`{field}` is missing")
    value = obj[field]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(422, f"`{field}` must be a string or a list of strings, got {_type_name(value)}")
    if not value:
        raise ApiError(422, f"`{field}` is an empty list; send at least one string", "empty")
    if len(value) > max_items:
        raise ApiError(413, f"batch size {len(value)} > maximum allowed batch size {max_items} "
                       "(--max-client-batch-size); split the request")
    for i, x in enumerate(value):
        if not isinstance(x, str):
            if token_ids_hint and (isinstance(x, int) or (isinstance(x, list) and x
                                   and all(isinstance(t, int) for t in x))):
                raise ApiError(422, f"`{field}` holds token ids ({field}[{i}]); this server takes "
                               "strings only: send the text")
            raise ApiError(422, f"{field}[{i}] is {_type_name(x)}, expected a string")
    return value


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


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(norm, 1e-12), as sentence-transformers' Normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def shape_embeddings(emb: np.ndarray, normalize: bool, dims: int | None) -> np.ndarray:
    """Matryoshka-style truncation to `dims` (then renormalised when `normalize`)."""
    if dims is not None:
        emb = emb[:, :dims]
    return l2_normalize(emb) if normalize else emb


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
                             direction(params))


def tokens(hf_tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[dict]]:
    """TEI's /tokenize answer: per text, every token with its id, text and character span."""
    enc = hf_tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                       return_attention_mask=False, return_token_type_ids=False)
    special = set(hf_tokenizer.all_special_ids)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        pieces = hf_tokenizer.convert_ids_to_tokens(ids)
        row = []
        for tid, piece, (start, stop) in zip(ids, pieces, offsets, strict=True):
            is_special = tid in special and start == stop
            row.append({"id": int(tid), "text": piece if is_special else text[start:stop],
                        "special": is_special, "start": None if is_special else start,
                        "stop": None if is_special else stop})
        out.append(row)
    return out
