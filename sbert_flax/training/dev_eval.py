"""Evaluation during training, on the training mesh: STS Spearman for any loss, and the softmax
classifier's dev/test accuracy with per-label P/R/F1.

Both run jitted functions over the sharded params directly (no host copy, no second model):
every process builds the same full batch and feeds its own rows; outputs are replicated so every
process reads all of them.

Sentences embed the way `SentenceEncoder.encode` embeds them: packed by the same `Packer` (several
sentences per row, block-diagonal attention, positions restarting per sentence) and pooled by the
same `SentenceEmbedder.embed_packed`, so a dev score is the score of what encode would return.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sbert_flax.common import sharding
from sbert_flax.common.xla import compiler_options
from sbert_flax.inference.packing import Packer
from sbert_flax.models.tokenization import Tokenizer
from sbert_flax.retrieval.sts import pair_cosines, read_sts, spearman
from sbert_flax.training import eval_metrics as metrics
from sbert_flax.training.pipeline import eval_batches
from sbert_flax.training.sources import TextSource
from sbert_flax.training.state import StateLayout
from sbert_flax.training.step import TraceCounter, make_eval_step

log = logging.getLogger("sbert_flax.train")


class Evaluator:
    """STS files and (softmax) classification sets, evaluated with the current params.

    Args:
      graphdef: the trained model's graph; it has an `.embedder` (`SentenceEmbedder`).
      layout: state shardings (mesh and param shardings).
      tokenizer: host tokenizer.
      seq_length: max tokens per sentence.
      batch_size: global rows per classification batch (a multiple of the device count); the
        embedding batches pack sentences into rows under a budget of batch_size x seq_length
        tokens.
      sts_paths: `s1 \\t s2 \\t score` files; each is read once here (errors name file:line).
      classify: build the softmax classifier's eval step too.
    """

    def __init__(self, graphdef: nnx.GraphDef, layout: StateLayout, tokenizer: Tokenizer, *,
                 seq_length: int, batch_size: int, sts_paths: Sequence[str] = (),
                 classify: bool = False):
        self.layout, self.tokenizer = layout, tokenizer
        self.seq_length, self.batch_size = seq_length, batch_size
        self.sts = {p: read_sts(p) for p in sts_paths}
        self.counter = TraceCounter()
        self._classify = make_eval_step(graphdef, layout, self.counter) if classify else None
        mesh = layout.mesh
        bsh = sharding.batch_sharding(mesh)
        # The token budget of today's largest padded batch (batch_size rows of seq_length); rows
        # a multiple of the device count, since every device takes a slice of them.
        self.packer = Packer(batch_size * seq_length, seq_length, row_multiple=mesh.devices.size)
        self.embed_traces = 0  # compiled packed shapes (at most len(packer.shapes()))

        def embed(params: Any, ids: jax.Array, segments: jax.Array, positions: jax.Array
                  ) -> jax.Array:
            self.embed_traces += 1
            return nnx.merge(graphdef, params).embedder.embed_packed(
                ids, segments, positions, Packer.slots(ids.shape[1]))  # [rows, slots, D]

        self._embed = jax.jit(embed, in_shardings=(layout.shardings.params, bsh, bsh, bsh),
                              out_shardings=sharding.replicated(mesh),
                              compiler_options=compiler_options(mesh.devices.flat))

    # ---- ahead of time (`sbert-flax compile`) -------------------------------------------------

    def lower_embed(self, params: Any, rows: int, length: int) -> jax.stages.Lowered:
        """The packed embed program at one (rows, length) shape of `packer`, lowered for `params`
        (arrays or their `ShapeDtypeStruct`s): what `sbert-flax compile` compiles for a slice."""
        x = jax.ShapeDtypeStruct((rows, length), jnp.int32)  # ids, segments, positions
        return self._embed.lower(params, x, x, x)

    def lower_classify(self, params: Any, batch: dict[str, Any]) -> jax.stages.Lowered:
        """The classifier's eval step lowered for `params` and `batch` (arrays or shapes)."""
        if self._classify is None:
            raise ValueError("this Evaluator was built without the classifier (classify=False)")
        return self._classify.lower(params, batch)

    # ---- STS --------------------------------------------------------------------------------

    def embed(self, params: Any, sentences: Sequence[str]) -> np.ndarray:
        """Embeddings float32 [n, D] of `sentences`, packed as `SentenceEncoder.encode` packs.

        Every process packs the same batches (packing is deterministic) and feeds its contiguous
        slice of each batch's rows; the result is replicated, so each reads every embedding.
        """
        ids = self.tokenizer.encode(list(sentences), self.seq_length)
        out: np.ndarray | None = None
        pc, pi = jax.process_count(), jax.process_index()
        for batch in self.packer.pack(ids, pad_id=self.tokenizer.pad_id):
            rows = batch.shape[0] // pc
            local = {k: getattr(batch, k)[pi * rows:(pi + 1) * rows]
                     for k in ("ids", "segments", "positions")}
            g = sharding.put_batch(local, self.layout.mesh)
            res = np.asarray(self._embed(params, g["ids"], g["segments"], g["positions"]))
            if out is None:
                out = np.zeros((len(ids), res.shape[-1]), np.float32)
            out[batch.index] = res[batch.row, batch.slot]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def sts_spearman(self, params: Any) -> dict[str, float]:
        """{path: Spearman of cosine vs gold} for every STS file (coefficients in [-1, 1])."""
        out = {}
        for path, (s1, s2, gold) in self.sts.items():
            unique = list(dict.fromkeys([*s1, *s2]))
            row = {s: i for i, s in enumerate(unique)}
            emb = self.embed(params, unique)
            cos = pair_cosines(emb[[row[s] for s in s1]], emb[[row[s] for s in s2]])
            out[path] = spearman(cos, gold)
        return out

    # ---- classification (softmax) ------------------------------------------------------------

    def classify(self, params: Any, source: TextSource) -> np.ndarray:
        """Predicted labels int64 [N] of a labelled source."""
        preds = np.full(len(source), -1, np.int64)
        for b in eval_batches(source, self.tokenizer, global_batch=self.batch_size,
                              seq_length=self.seq_length, joint_length=True,  # [a; b] in one call
                              process_index=jax.process_index(), process_count=jax.process_count()):
            out = self._classify(params, sharding.put_batch(b, self.layout.mesh))
            idx, logits = np.asarray(out["index"]), np.asarray(out["logits"])
            keep = idx >= 0
            preds[idx[keep]] = np.argmax(logits[keep], axis=-1)
        return preds

    def report(self, params: Any, source: TextSource, num_labels: int, name: str) -> dict[str, Any]:
        """Accuracy, macro F1 and per-label P/R/F1 of a labelled source (logged UER-style)."""
        preds = self.classify(params, source)
        gold = source.targets
        log.info("%s:\n%s", name, metrics.format_report(preds, gold, num_labels))
        return metrics.classification_report(preds, gold, num_labels)

    def evaluate(self, params: Any, dev: TextSource | None, num_labels: int | None,
                 label: str) -> dict[str, Any]:
        """Everything there is to evaluate: dev classification (softmax) and each STS file.

        `sts_spearman` is the first STS file's (what picks the best model); `sts` has them all.
        """
        res: dict[str, Any] = {}
        if dev is not None and self._classify is not None:
            res.update(self.report(params, dev, num_labels, f"dev {label}"))
        if self.sts:
            per_file = self.sts_spearman(params)
            for path, rho in per_file.items():
                log.info("STS Spearman x100 %s %s: %.2f", os.path.basename(path), label, 100 * rho)
            res["sts"] = per_file
            res["sts_spearman"] = next(iter(per_file.values()))
        return res
