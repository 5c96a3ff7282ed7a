"""Evaluation of a cross-encoder run on the training mesh: dev / test classification (ce-bce,
ce-softmax) and STS Spearman of the pair scores (ce-bce, ce-listwise).

The trainer's `dev_eval.Evaluator` interface (`evaluate`, `report`, `counter`), for a model that
scores pairs instead of embedding sentences. One jitted function scores padded pairs with the
sharded params (no host copy); every process builds the same global batch and feeds its own rows,
and the logits come back replicated. The numbers are sentence-transformers' evaluators' on the
same scores: `CrossEncoderClassificationEvaluator`'s accuracy (ce-bce: logit > 0, i.e.
sigmoid > 0.5; ce-softmax: argmax) and `CrossEncoderCorrelationEvaluator`'s Spearman (of the
logits: its sigmoid is monotonic, so the ranks are the same).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sbert_flax.common import sharding
from sbert_flax.common.xla import compiler_options
from sbert_flax.inference.pair_batches import PairEncoder
from sbert_flax.models.tokenization import Tokenizer, bucket_for
from sbert_flax.retrieval.sts import read_sts, spearman
from sbert_flax.training import eval_metrics as metrics
from sbert_flax.training.cross_encoder_batches import pair_eval_batches
from sbert_flax.training.cross_encoder_losses import PAIR
from sbert_flax.training.pipeline import PipelineConfig
from sbert_flax.training.sources import TextSource
from sbert_flax.training.state import StateLayout
from sbert_flax.training.step import TraceCounter

log = logging.getLogger("sbert_flax.train")


class CrossEncoderEvaluator:
    """Dev / test classification sets and STS files, scored by the current params.

    Args:
      graphdef: the `SequenceClassifier` graph.
      layout: state shardings (mesh and param shardings).
      tokenizer: host tokenizer.
      seq_length: tokens per pair.
      batch_size: global pairs per batch (a multiple of the device count).
      num_logits: the head's outputs (1: a score; more: classes).
      sts_paths: `s1 \\t s2 \\t score` files, read once here (errors name file:line).
    """

    def __init__(self, graphdef: nnx.GraphDef, layout: StateLayout, tokenizer: Tokenizer, *,
                 seq_length: int, batch_size: int, num_logits: int,
                 sts_paths: Sequence[str] = ()):
        self.layout, self.tokenizer = layout, tokenizer
        self.seq_length, self.batch_size, self.num_logits = seq_length, batch_size, num_logits
        self.sts = {p: read_sts(p) for p in sts_paths}
        self.encoder = PairEncoder(tokenizer)
        self.counter = TraceCounter()
        self.buckets = PipelineConfig(global_batch=batch_size, seq_length=seq_length).bucket_lengths
        bsh = sharding.batch_sharding(layout.mesh)

        def score(params: Any, ids: jax.Array, mask: jax.Array, types: jax.Array) -> jax.Array:
            self.counter.count += 1
            with sharding.declared(layout.mesh):
                return nnx.merge(graphdef, params)(ids, mask, types)  # [B, num_logits]

        self._score = jax.jit(score, in_shardings=(layout.shardings.params, bsh, bsh, bsh),
                              out_shardings=sharding.replicated(layout.mesh),
                              compiler_options=compiler_options(layout.mesh.devices.flat))

    def _logits(self, params: Any, local: dict[str, np.ndarray]) -> np.ndarray:
        g = sharding.put_batch({k: local[f"{PAIR}_{k}"] for k in ("ids", "mask", "types")},
                               self.layout.mesh)
        return np.asarray(self._score(params, g["ids"], g["mask"], g["types"]))

    # ---- pairs given as texts (STS files) ----------------------------------------------------

    def scores(self, params: Any, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """The first logit float32 [n] of each (a, b) pair, in order."""
        enc = self.encoder.encode(list(pairs), self.seq_length)
        off, out = enc.ids.offsets, np.zeros(len(enc), np.float32)
        pc, pi, g = jax.process_count(), jax.process_index(), self.batch_size
        rows = g // pc
        for s in range(0, len(enc), g):
            n = min(g, len(enc) - s)
            length = bucket_for(int(enc.lengths[s:s + n].max()), self.buckets)
            arrays = {k: np.zeros((g, length), np.int32) for k in ("ids", "mask", "types")}
            arrays["ids"][:] = self.tokenizer.pad_id
            for r in range(n):
                a, b = off[s + r], off[s + r + 1]
                arrays["ids"][r, :b - a] = enc.ids.flat[a:b]
                arrays["types"][r, :b - a] = enc.token_types[a:b]
                arrays["mask"][r, :b - a] = 1
            # Pad rows keep an all-zero mask: their (finite) logits are dropped below.
            local = {f"{PAIR}_{k}": v[pi * rows:(pi + 1) * rows] for k, v in arrays.items()}
            out[s:s + n] = self._logits(params, local)[:n, 0]
        return out

    def sts_spearman(self, params: Any) -> dict[str, float]:
        """{path: Spearman of the pair scores vs gold} for every STS file."""
        return {path: spearman(self.scores(params, list(zip(s1, s2, strict=True))), gold)
                for path, (s1, s2, gold) in self.sts.items()}

    # ---- classification (ce-bce, ce-softmax) ---------------------------------------------------

    def classify(self, params: Any, source: TextSource) -> np.ndarray:
        """Predicted labels int64 [N] of a labelled (text_a, text_b, label) source."""
        preds = np.full(len(source), -1, np.int64)
        g = self.batch_size
        batches = pair_eval_batches(source, self.tokenizer, global_batch=g,
                                    seq_length=self.seq_length, process_index=jax.process_index(),
                                    process_count=jax.process_count())
        for k, b in enumerate(batches):
            # Global row r of batch k is record k * g + r (file order); the logits are replicated.
            logits = self._logits(params, b)
            n = min(g, len(source) - k * g)
            pred = ((logits[:n, 0] > 0).astype(np.int64) if self.num_logits == 1
                    else np.argmax(logits[:n], axis=-1))
            preds[k * g:k * g + n] = pred
        return preds

    def report(self, params: Any, source: TextSource, num_labels: int, name: str
               ) -> dict[str, Any]:
        """Accuracy, macro F1 and per-label P/R/F1 of a labelled source (logged UER-style)."""
        preds = self.classify(params, source)
        gold = source.targets
        log.info("%s:\n%s", name, metrics.format_report(preds, gold, num_labels))
        return metrics.classification_report(preds, gold, num_labels)

    def evaluate(self, params: Any, dev: TextSource | None, num_labels: int | None,
                 label: str) -> dict[str, Any]:
        """Dev classification and each STS file (`sts_spearman` is the first file's)."""
        res: dict[str, Any] = {}
        if dev is not None:
            res.update(self.report(params, dev, num_labels, f"dev {label}"))
        if self.sts:
            per_file = self.sts_spearman(params)
            for path, rho in per_file.items():
                log.info("STS Spearman x100 (cross-encoder scores) %s %s: %.2f",
                         os.path.basename(path), label, 100 * rho)
            res["sts"] = per_file
            res["sts_spearman"] = next(iter(per_file.values()))
        return res
