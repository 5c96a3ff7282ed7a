"""The cross-encoder behind /rerank and /predict: `RerankBackend`, and how `serve` tells a
cross-encoder folder (`is_cross_encoder_dir`).

`RerankBackend` adapts `inference.cross_encoder.CrossEncoder` to what the batcher and routes call,
as `EncoderBackend` adapts `SentenceEncoder`: tokenize a request's inputs (texts or text pairs) on
the tokenizer pool, and `launch` a round of them: packed several pairs to a row into the cross-
encoder's fixed shapes (`pair_batches.pack_pairs`), cut to the rows they fill (`trim_rows`) and
dispatched without waiting; `Launched.result` gives the logits [n, num_labels].

Tokenizing is TEI's (core/src/tokenization.rs `encode_input`): `[CLS] a [SEP] b [SEP]` with token
types 0 / 1 (`[CLS] a [SEP]` for one text), `longest_first` truncation to the maximum input
length from `truncation_direction`'s end when the request truncates; otherwise a longer input is
`InputTooLong` (the routes' 422). That is also what sentence-transformers' `CrossEncoder.predict`
feeds its model (right truncation), so the scores are its scores.

`serving.served_models` puts it beside an embedder as the batcher's one backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

from sbert_flax.inference.encoder import InputTooLong
from sbert_flax.inference.pair_batches import PackedPairBatch, PairEncoder, PairIds, pack_pairs
from sbert_flax.models.tokenization import TokenIds
from sbert_flax.serving.backend import EncoderBackend, Launched, trim_rows

__all__ = ["PairTokens", "RerankBackend", "is_cross_encoder_dir", "tokenize_items"]

# The warm-up's test pair: the tokenizer, the device and the result path all work end to end.
WARMUP_PAIR = ("sbert-flax warm-up 句子", "重排序")


@dataclasses.dataclass(frozen=True)
class PairTokens:
    """One tokenized input of /rerank or /predict: its token ids and types (int32 [length]).

    `len()` is its token count, which is what the batcher's token budget counts.
    """

    ids: np.ndarray
    token_types: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_items(pair_encoder: PairEncoder, items: Sequence[tuple[str, str | None]], *,
                   max_length: int, truncate: bool, direction: str = "right") -> list[PairTokens]:
    """Each (text, second text or None) as TEI tokenizes it for /rerank and /predict:
    `[CLS] a [SEP] (b [SEP])`, cut longest-first from `direction` when `truncate`.

    Raises:
      ValueError: `direction` is not "right" or "left".
      InputTooLong: `truncate` is False and an input has more than `max_length` tokens (the first
        such index).
    """
    out = []
    for i, e in enumerate(pair_encoder.encodings(items, max_length, truncate=truncate,
                                                 direction=direction)):
        if len(e.ids) > max_length:
            raise InputTooLong(i, len(e.ids), max_length)
        out.append(PairTokens(np.asarray(e.ids, np.int32), np.asarray(e.type_ids, np.int32)))
    return out


def _labels(hf_config: dict, num_labels: int) -> list[str]:
    """Label names by index from config.json's `id2label` (transformers' LABEL_i without)."""
    id2label = hf_config.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == num_labels:
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)]
    return [f"LABEL_{i}" for i in range(num_labels)]


class RerankBackend:
    """Adapts a `CrossEncoder` to what the batcher and the rerank routes call.

    Args:
      cross_encoder: a loaded `sbert_flax.inference.cross_encoder.CrossEncoder`; the batcher's
        worker thread is its only device user from then on.
      model_id: what /info reports for it (default: where it was loaded from).
    """

    # /tokenize and /decode on a server with only this model: the same code as the embedder's,
    # over this model's tokenizer (they need `hf_tokenizer`, `lowercase_text`, `_lock`, `_rust`).
    tokens = EncoderBackend.tokens
    rust_tokenizer = EncoderBackend.rust_tokenizer
    lowercase_text = False  # a cross-encoder's pairs go to its tokenizer as given

    def __init__(self, cross_encoder, model_id: str | None = None):
        self.cross_encoder = cross_encoder
        self.model_id = model_id or getattr(cross_encoder.model, "source", "") or "reranker"
        self.labels = _labels(getattr(cross_encoder.model, "hf_config", {}) or {},
                              cross_encoder.num_labels)
        self.pair_encoder = PairEncoder(cross_encoder.tokenizer)
        self._lock = threading.Lock()
        self._rust = None

    # ---- what the model is --------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        return int(self.cross_encoder.num_labels)

    @property
    def model_type(self) -> str:
        """TEI's name for it: "reranker" with one label (a relevance score), else "classifier"."""
        return "reranker" if self.num_labels == 1 else "classifier"

    @property
    def max_seq_length(self) -> int:
        return int(self.cross_encoder.max_length)

    @property
    def max_batch_tokens(self) -> int:
        return int(self.cross_encoder.max_batch_tokens)

    @property
    def dtype(self) -> str:
        return str(self.cross_encoder.dtype)

    @property
    def num_compiles(self) -> int:
        return int(self.cross_encoder.num_compiles)

    @property
    def hf_tokenizer(self):
        return self.cross_encoder.tokenizer.hf

    # ---- work ---------------------------------------------------------------------------------

    def tokenize_pairs(self, items: Sequence[tuple[str, str | None]], *, truncate: bool,
                       direction: str) -> list[PairTokens]:
        """Each (text, second text or None) tokenized as TEI does (see `tokenize_items`)."""
        return tokenize_items(self.pair_encoder, items, max_length=self.cross_encoder.max_length,
                              truncate=truncate, direction=direction)

    def tokenize(self, texts: Sequence[str], *, truncate: bool, direction: str
                 ) -> list[PairTokens]:
        """One-text inputs (/predict's `"inputs": "text"`)."""
        return self.tokenize_pairs([(t, None) for t in texts], truncate=truncate,
                                   direction=direction)

    def launch(self, items: Sequence[PairTokens]) -> Launched:
        """Packs a round of inputs and dispatches it without waiting; `.result()` is the float32
        logits [len(items), num_labels]."""
        ce = self.cross_encoder
        pairs = PairIds(TokenIds.from_arrays([p.ids for p in items]),
                        np.concatenate([p.token_types for p in items]).astype(np.int32)
                        if items else np.zeros(0, np.int32))
        packer = ce.packer()
        parts = []
        for batch in pack_pairs(packer, pairs, ce.tokenizer.pad_id):
            first = 0  # trim_rows keeps rows in order: the types follow the same row slices
            for part in trim_rows(batch, packer):
                rows = part.shape[0]
                if part is not batch:
                    part = PackedPairBatch(
                        **{f.name: getattr(part, f.name)
                           for f in dataclasses.fields(part) if f.name != "token_types"},
                        token_types=batch.token_types[first:first + rows])
                first += rows
                parts.append((part, ce.dispatch(part)))
        return Launched(len(items), self.num_labels, parts)

    def score_ids(self, items: Sequence[PairTokens]) -> np.ndarray:
        """Float32 logits [n, num_labels]. Blocking."""
        return self.launch(items).result()

    def warmup(self) -> int:
        """Compiles every packed shape; returns how many."""
        return int(self.cross_encoder.warmup())

    def test_round(self) -> None:
        """Scores the warm-up pair end to end; raises if the answer is not [1, labels] finite."""
        items = self.tokenize_pairs([WARMUP_PAIR], truncate=True, direction="right")
        logits = self.score_ids(items)
        if logits.shape != (1, self.num_labels) or not np.isfinite(logits).all():
            raise RuntimeError(f"warm-up pair scored {logits.shape}, "
                               f"finite={np.isfinite(logits).all()}")


def is_cross_encoder_dir(path: str) -> bool:
    """A model folder holds a cross-encoder: config.json names a `...ForSequenceClassification`
    architecture (TEI's test for a classifier or reranker), or sentence-transformers' config says
    `"model_type": "CrossEncoder"`."""
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
        if any(str(a).endswith("ForSequenceClassification") for a in archs):
            return True
    st = os.path.join(path, "config_sentence_transformers.json")
    if os.path.isfile(st):
        with open(st, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "CrossEncoder"
    return False
