"""Training data, the front door: what each loss reads, and eager readers for small files.

The lazy machinery lives in `sources` (line-offset index, records read by offset) and `pipeline`
(grain batches); this module re-exports their public names and keeps the small eager helpers
(`read_pair_tsv`, `tokenize_pairs`) that benchmarks and evaluation use on dev-sized files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sbert_flax.models.tokenization import Tokenizer
from sbert_flax.training.pipeline import (
    FIRST_TRAIN_BUCKETS,
    TRAIN_BUCKETS,
    Batch,
    BatchPlan,
    PipelineConfig,
    TrainPipeline,
    bucket_of,
    eval_batches,
)
from sbert_flax.training.sources import (
    DataError,
    Schema,
    TextSource,
    open_source,
    parse_columns,
    skipped_summary,
)

__all__ = ["FIRST_TRAIN_BUCKETS", "NLI_LABELS", "TRAIN_BUCKETS", "Batch", "BatchPlan", "DataError", "PairData",
           "PipelineConfig", "Schema", "TextSource", "TokenizedPairs", "TrainPipeline", "bucket_of",
           "eval_batches", "open_source", "parse_columns", "read_pair_tsv", "schema_for",
           "tokenize_pairs"]

# The label names of the raw CNLI/OCNLI files (`id \t premise \t hypothesis \t label-name`), in the
# order UER's converted train/dev/test.tsv use.
NLI_LABELS: Mapping[str, int] = {"entailment": 0, "neutral": 1, "contradiction": 2}

# The columns each loss reads (COMMON "Training interfaces"): text columns, optional text
# columns, and the target column ("labels" in a batch for "label", "scores" for "score").
SCHEMAS: Mapping[str, Schema] = {
    "softmax": Schema(("text_a", "text_b"), target="label"),
    # A hard negative as `negative`, or several as `negative_1 .. negative_n` (mined n-tuples).
    "mnrl": Schema(("anchor", "positive"), optional=("negative",), numbered=("negative",)),
    "cached-mnrl": Schema(("anchor", "positive"), optional=("negative",), numbered=("negative",)),
    "cosent": Schema(("sentence1", "sentence2"), target="score"),
    # Cross-encoders (cross_encoder_losses.py): labelled pairs, or an anchor with its positive and
    # mined negatives (a triplet, or the n-tuples of `sbert-flax mine-negatives`).
    "ce-bce": Schema(("text_a", "text_b"), target="label"),
    "ce-softmax": Schema(("text_a", "text_b"), target="label"),
    "ce-listwise": Schema(("anchor", "positive"), optional=("negative",), numbered=("negative",)),
}


def schema_for(loss: str) -> Schema:
    """The columns `loss` reads from a training file."""
    try:
        return SCHEMAS[loss]
    except KeyError:
        raise ValueError(f"loss {loss!r}; expected one of {sorted(SCHEMAS)}") from None


@dataclasses.dataclass(frozen=True)
class PairData:
    """Sentence pairs with integer labels, read eagerly from one (small) file.

    Attributes:
      text_a, text_b: the sentences.
      labels: int32 [N] class ids in [0, num_labels).
      num_labels: number of classes (given, or max label + 1).
      path: the file read.
      skipped_lines: 1-based line numbers of malformed lines skipped (skip_bad_lines=True).
    """

    text_a: list[str]
    text_b: list[str]
    labels: np.ndarray
    num_labels: int
    path: str
    skipped_lines: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def skipped_summary(self, first: int = 5) -> str:
        """One log line about skipped malformed lines ("" when none were skipped)."""
        return skipped_summary(self.path, self.skipped_lines, len(self), first)


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of each side of each pair ([CLS] ... [SEP], unpadded) and the labels."""

    a: list[np.ndarray]
    b: list[np.ndarray]
    labels: np.ndarray
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def read_pair_tsv(path: str, *, skip_bad_lines: bool = False,
                  label_names: Mapping[str, int] | None = None, num_labels: int | None = None,
                  columns: tuple[int, int, int] | None = None, has_header: bool = True) -> PairData:
    """Reads a whole UER classifier TSV (`text_a`, `text_b`, `label`) into memory.

    Same validation as the lazy training source (`sources.open_source` with the softmax schema);
    meant for dev/test files and benchmarks, not for training files of any size.

    Raises:
      DataError: unreadable file, bad header, no examples, or malformed lines (`path:line: why`)
        without skip_bad_lines.
    """
    src = open_source(path, SCHEMAS["softmax"], data_format="tsv", has_header=has_header,
                      columns=columns, skip_bad_lines=skip_bad_lines, label_names=label_names,
                      num_labels=num_labels)
    cols = src.texts(range(len(src)))
    out = PairData(text_a=cols["text_a"], text_b=cols["text_b"], labels=src.targets,
                   num_labels=int(src.num_labels), path=path, skipped_lines=src.skipped_lines)
    src.close()
    return out


def tokenize_pairs(data: PairData, tokenizer: Tokenizer, seq_length: int) -> TokenizedPairs:
    """Tokenizes each side on its own, `[CLS] a [SEP]` and `[CLS] b [SEP]`, like UER's siamese."""
    if seq_length < 2:
        raise DataError(f"seq_length must be >= 2 ([CLS] and [SEP]), got {seq_length}")
    return TokenizedPairs(a=tokenizer.encode(data.text_a, seq_length),
                          b=tokenizer.encode(data.text_b, seq_length),
                          labels=np.asarray(data.labels, dtype=np.int32), pad_id=tokenizer.pad_id)
