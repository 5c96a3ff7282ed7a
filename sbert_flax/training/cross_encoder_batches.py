"""Training and evaluation batches of the cross-encoder losses: (query, document) pairs, padded.

A record becomes one pair per candidate column, tokenized as the model reads it,
`[CLS] query [SEP] document [SEP]` truncated longest-first to `seq_length` tokens
(`inference.pair_batches.PairEncoder`, what sentence-transformers' `CrossEncoder` feeds its
model):

- (text_a, text_b, label) rows: one candidate column, `pair` = (text_a, text_b);
- (anchor, positive, negative_1 .. negative_n) rows: `positive` = (anchor, positive), then
  `negative_k` = (anchor, negative_k), the positive first (the listwise loss's label).

Each column c is `{c}_ids`, `{c}_mask`, `{c}_types` int32 [rows, L]: one row per record, every
column padded to one L, the smallest training bucket holding the global batch's longest pair (a
few lengths, so a few compiled shapes). Rows that pad a batch hold the empty pair
`[CLS] [SEP] [SEP]` at weight 0. The plan, the weights, labels and the per-process row split are
the pipeline's (`pipeline.BatchBuilder`), so resume, sharding and the data order work as for any
other loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sbert_flax.inference.pair_batches import PairEncoder, PairIds
from sbert_flax.models.tokenization import Tokenizer, bucket_for
from sbert_flax.training.cross_encoder_losses import PAIR
from sbert_flax.training.pipeline import Batch, BatchBuilder, BatchPlan, PipelineConfig
from sbert_flax.training.sources import TextSource


def pair_columns(columns: Sequence[str]) -> list[tuple[str, str, str]]:
    """(candidate column, query column, document column) of a source's text columns."""
    if tuple(columns[:2]) == ("text_a", "text_b"):
        return [(PAIR, "text_a", "text_b")]
    if tuple(columns[:2]) != ("anchor", "positive") or len(columns) < 3:
        raise ValueError(f"pairs are built from (text_a, text_b) or (anchor, positive, negative "
                         f"...) columns, not {list(columns)}")
    return [(c, "anchor", c) for c in columns[1:]]


class PairBatchBuilder(BatchBuilder):
    """`BatchBuilder` whose text arrays are padded pairs (see the module docstring)."""

    def __init__(self, source: TextSource, tokenizer: Tokenizer, cfg: PipelineConfig,
                 plan: BatchPlan | None = None, *, with_index: bool = False,
                 target_key: str | None = None):
        super().__init__(source, tokenizer, cfg, plan, with_index=with_index,
                         target_key=target_key)
        self.pairs = pair_columns(source.columns)
        self.encoder = PairEncoder(tokenizer)  # thread-safe: grain's threads share it
        self._empty_pair = self.encoder.encode([("", "")], cfg.seq_length)

    def layout(self, cols: dict[str, list[str]], n: int, lo: int) -> Batch:
        cfg = self.cfg
        encoded = [self.encoder.encode(list(zip(cols[q], cols[d], strict=True)), cfg.seq_length)
                   for _, q, d in self.pairs]
        longest = max(int(e.lengths.max()) for e in encoded)
        length = bucket_for(longest, cfg.bucket_lengths)
        out: Batch = {}
        for (c, _, _), e in zip(self.pairs, encoded, strict=True):
            out[f"{c}_ids"], out[f"{c}_mask"], out[f"{c}_types"] = self._rows(e, n, lo, length)
        return out

    def _rows(self, e: PairIds, n: int, lo: int, length: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, types) [local rows, length] of global rows lo.. of the encoded pairs."""
        rows = self.cfg.local_batch
        ids = np.full((rows, length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        types = np.zeros((rows, length), np.int32)
        for r in range(rows):
            src, i = (e, lo + r) if lo + r < n else (self._empty_pair, 0)
            a, b = src.ids.offsets[i], src.ids.offsets[i + 1]
            ids[r, :b - a] = src.ids.flat[a:b]
            types[r, :b - a] = src.token_types[a:b]
            mask[r, :b - a] = 1
        return ids, mask, types


def pair_eval_batches(source: TextSource, tokenizer: Tokenizer, *, global_batch: int,
                      seq_length: int, process_index: int = 0, process_count: int = 1
                      ) -> list[Batch]:
    """Unshuffled pair batches of `source` in file order, with `index` (-1 on pad rows)."""
    cfg = PipelineConfig(global_batch=global_batch, seq_length=seq_length, shuffle=False,
                         process_index=process_index, process_count=process_count)
    builder = PairBatchBuilder(source, tokenizer, cfg, with_index=True)
    return [builder.build(np.arange(s, min(s + global_batch, len(source))))
            for s in range(0, len(source), global_batch)]
