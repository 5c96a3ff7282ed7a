"""`CrossEncoder`: sentence-pair scoring (reranking) in sentence-transformers' shape, on JAX.

`predict(pairs)` and `rank(query, documents)` as `sentence_transformers.CrossEncoder` has them,
same scores: host-side pair tokenization (`pair_batches`), pairs packed several to a row into a
few fixed shapes (`packing.Packer`), one jitted program per shape with params as arguments
(`encode_programs.score_program`), results put back in input order. Input is read in windows, tokenized and
packed on a background thread while earlier batches compute, so memory is O(window).

Activations are sentence-transformers': the model's saved one (Sigmoid for one label, Identity
otherwise, by default), then `apply_softmax` over the labels. They run on the host in float32.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.checkpoints.cross_encoder_folder import (
    default_activation,
    write_cross_encoder_folder,
)
from sbert_flax.checkpoints.cross_encoder_loading import LoadedCrossEncoder, load_cross_encoder
from sbert_flax.common.files import atomic_directory
from sbert_flax.inference.activations import resolve_activation, softmax
from sbert_flax.inference.encode_programs import ScoreProgram, run_in_flight, score_program
from sbert_flax.inference.encoder import (
    DEFAULT_MAX_BATCH_TOKENS,
    DTYPES,
    IN_FLIGHT,
    MIN_WINDOW,
    ROW_UNIT,
    WINDOW_BATCHES,
)
from sbert_flax.inference.packing import ROW_LENGTHS, Packer
from sbert_flax.inference.pair_batches import (
    PackedPairBatch,
    PairEncoder,
    PairIds,
    check_pairs,
    pack_pairs,
)
from sbert_flax.inference.window_stream import Reassembly, Window, prefetch
from sbert_flax.models.config import BertConfig
from sbert_flax.models.cross_encoder import ClassifierConfig, abstract_classifier
from sbert_flax.models.tokenization import Tokenizer


def _is_single_pair(pairs: Any) -> bool:
    """sentence-transformers' rule: a list / tuple whose first item is not itself a list / tuple."""
    if isinstance(pairs, np.ndarray):
        return pairs.ndim == 1 and pairs.size > 0
    return isinstance(pairs, (list, tuple)) and len(pairs) > 0 \
        and not isinstance(pairs[0], (list, tuple, np.ndarray))


class CrossEncoder:
    """A BERT cross-encoder: pair tokenizer + `SequenceClassifier`, data-parallel over devices.

    Args:
      model: a `LoadedCrossEncoder`, or a path / hub id / UER file loaded with
        `load_cross_encoder(model, max_length=..., num_labels=..., **load_kwargs)`.
      max_length: tokens per pair (longer pairs are truncated longest-first); default the model's.
      activation_fn: applied to the logits by `predict` and `rank` (see `resolve_activation`);
        None: the model's saved one, else Sigmoid for one label and Identity for several.
      num_labels: only with a path: see `load_cross_encoder`.
      dtype: compute dtype, "float32" (default) or "bfloat16"; params and logits stay float32.
      devices: default all local devices.
      max_batch_tokens: token budget of a device batch (`packing`).
      row_lengths: candidate packed row lengths; max_length is always one.
      attention_impl: None (XLA; splash on TPU for packed rows) or "cudnn" (flash attention on
        NVIDIA GPUs, bf16/fp16), as `SentenceEncoder`'s.
      host_workers: threads tokenizing and packing windows ahead of the devices (0: none).
      **load_kwargs: for a path, passed to `load_cross_encoder` (new_head, vocab_path, ...).
    """

    def __init__(self, model: LoadedCrossEncoder | str, *, max_length: int | None = None,
                 activation_fn: Any = None, num_labels: int | None = None,
                 dtype: str = "float32", devices: Sequence[jax.Device] | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 row_lengths: Sequence[int] | None = None, attention_impl: str | None = None,
                 host_workers: int = 1, **load_kwargs: Any):
        if isinstance(model, str):
            model = load_cross_encoder(model, max_length=max_length, num_labels=num_labels,
                                       **load_kwargs)
        elif load_kwargs or num_labels is not None:
            raise TypeError("num_labels and loading options apply only when `model` is a path")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}")
        self.model = model
        self.config: BertConfig = model.config
        self.head: ClassifierConfig = model.head
        self.tokenizer: Tokenizer = model.tokenizer
        self.max_length = int(max_length or model.max_length)
        if not 3 <= self.max_length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length={self.max_length} must be in [3, "
                             f"{self.config.max_position_embeddings}]")
        spec = activation_fn if activation_fn is not None else (
            model.activation or default_activation(self.num_labels))
        self.activation_name, self.activation_fn = resolve_activation(spec)
        self.dtype = dtype
        self.max_batch_tokens = int(max_batch_tokens)
        self.row_lengths = tuple(row_lengths or ROW_LENGTHS)
        self.attention_impl = attention_impl
        self.host_workers = int(host_workers)
        self.in_flight = IN_FLIGHT
        self.devices = list(devices or jax.local_devices())
        mesh = Mesh(np.array(self.devices), ("data",))
        graphdef, abstract = abstract_classifier(self.config, self.head)
        nnx.replace_by_pure_dict(abstract, model.params)
        self._graphdef = graphdef
        self.params = jax.device_put(abstract, NamedSharding(mesh, P()))  # replicated
        self._data = NamedSharding(mesh, P("data"))
        self.pair_encoder = PairEncoder(self.tokenizer)
        self._programs: dict[str, ScoreProgram] = {}

    @classmethod
    def from_pretrained(cls, path: str, max_length: int | None = None, activation_fn: Any = None,
                        **kwargs: Any) -> CrossEncoder:
        """Loads a CrossEncoder / HF sequence-classification folder or hub id (see `__init__`)."""
        return cls(path, max_length=max_length, activation_fn=activation_fn, **kwargs)

    @classmethod
    def from_uer(cls, checkpoint_path: str, vocab_path: str, config_path: str,
                 max_length: int = 128, **kwargs: Any) -> CrossEncoder:
        """Loads a UER-py `run_classifier` checkpoint with its vocab and UER / HF config."""
        return cls(checkpoint_path, max_length=max_length, vocab_path=vocab_path,
                   config_path=config_path, **kwargs)

    @classmethod
    def from_parts(cls, config: BertConfig, head: ClassifierConfig, params: dict,
                   tokenizer: Tokenizer, max_length: int, activation: str | None = None,
                   **kwargs: Any) -> CrossEncoder:
        """A cross-encoder over host params already in memory (e.g. a trainer's best params)."""
        return cls(LoadedCrossEncoder(config, head, params, tokenizer, int(max_length), activation),
                   **kwargs)

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    @property
    def num_compiles(self) -> int:
        """Shapes compiled for this cross-encoder's programs (shared process-wide)."""
        return sum(p.traces for p in self._programs.values())

    # ---- the device side ----------------------------------------------------------------------

    def packer(self, max_batch_tokens: int | None = None) -> Packer:
        return Packer(int(max_batch_tokens or self.max_batch_tokens), self.max_length,
                      len(self.devices), self.row_lengths)

    def _fn(self, dtype: str) -> Callable:
        if dtype not in self._programs:
            model = nnx.merge(self._graphdef, self.params)
            model.backbone.dtype = jnp.dtype(DTYPES[dtype])
            model.backbone.attention_impl = self.attention_impl
            self._programs[dtype] = score_program(nnx.graphdef(model), self.devices)
        return self._programs[dtype].fn

    def _dispatch(self, batch: PackedPairBatch, dtype: str) -> jax.Array:
        put = jax.device_put((batch.ids, batch.token_types, batch.segments, batch.positions),
                             self._data)
        out = self._fn(dtype)(self.params, *put)
        out.copy_to_host_async()  # overlaps the next batch's compute
        return out

    def dispatch(self, batch: PackedPairBatch, dtype: str | None = None) -> jax.Array:
        """Starts one packed batch (`pack_pairs(self.packer(), ...)`) without waiting, for a
        server's own batcher: logits [rows, slots, num_labels]; `np.asarray` waits for them."""
        return self._dispatch(batch, dtype or self.dtype)

    def _run(self, batches: Iterable[PackedPairBatch], dtype: str
             ) -> Iterator[tuple[PackedPairBatch, np.ndarray]]:
        """(batch, host logits [rows, slots, K]) in dispatch order, `in_flight` on the devices."""
        yield from run_in_flight(batches, lambda b: self._dispatch(b, dtype), self.in_flight)

    def warmup(self, dtype: str | None = None) -> int:
        """Compiles (and runs once) every packed shape; returns how many."""
        shapes = self.packer().shapes()
        for rows, length in shapes:
            z = np.zeros((rows, length), np.int32)
            seg = z.copy()
            seg[:, 0] = 1
            empty = np.zeros((4, 0), np.int32)
            dummy = PackedPairBatch(z, seg, z, np.zeros(0, np.int64), *empty, token_types=z)
            np.asarray(self._dispatch(dummy, dtype or self.dtype))
        return len(shapes)

    # ---- logits -------------------------------------------------------------------------------

    def tokenize(self, pairs: Sequence[Sequence[str]], max_length: int | None = None) -> PairIds:
        """`[CLS] a [SEP] b [SEP]` ids and token types, truncated longest-first to max_length."""
        return self.pair_encoder.encode(check_pairs(pairs), int(max_length or self.max_length))

    def score_ids(self, pairs: PairIds, dtype: str | None = None) -> np.ndarray:
        """Raw logits float32 [n, num_labels] of tokenized pairs, on the precompiled shapes."""
        out = np.zeros((len(pairs), self.num_labels), np.float32)
        batches = pack_pairs(self.packer(), pairs, self.tokenizer.pad_id)
        for batch, res in self._run(batches, dtype or self.dtype):
            out[batch.index] = res[batch.row, batch.slot]
        return out

    def logits_chunks(self, pairs: Iterable[Sequence[str]], chunk_size: int = 100_000, *,
                      batch_size: int | None = None, show_progress_bar: bool = False,
                      dtype: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Streams raw logits: (input indices, float32 [k, num_labels]) chunks in input order.

        `pairs` is read lazily in windows (a list, a generator), so memory stays bounded.
        `batch_size` is the device batch in rows of 64 tokens (None: `max_batch_tokens`).
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        dtype = dtype or self.dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}")
        budget = batch_size * ROW_UNIT if batch_size else self.max_batch_tokens
        packer = self.packer(budget)
        window = max(MIN_WINDOW, WINDOW_BATCHES * budget // (2 * ROW_UNIT))
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(desc="predict", unit="pair", unit_scale=True)
        windows: collections.deque[Window] = collections.deque()
        out = Reassembly(chunk_size, lambda x: x)
        prepare = functools.partial(self._prepare_window, packer=packer)
        prepared = prefetch(prepare, _windows(pairs, window), self.host_workers,
                            self.host_workers + 1)

        def batches() -> Iterator[PackedPairBatch]:
            for w in prepared:
                windows.append(w)
                yield from w.batches

        for batch, res in self._run(batches(), dtype):
            windows[0].store(batch, res)  # results come back in dispatch order
            if bar is not None:
                bar.update(len(batch.index))
            while windows and windows[0].done:
                out.add(windows.popleft())
            yield from out.chunks()
        while windows:  # windows of no pairs have no batches
            out.add(windows.popleft())
        yield from out.chunks(final=True)
        if bar is not None:
            bar.close()

    def _prepare_window(self, item: tuple[int, list], *, packer: Packer) -> Window:
        start, pairs = item
        ids = self.pair_encoder.encode(check_pairs(pairs, start), self.max_length)
        batches = pack_pairs(packer, ids, self.tokenizer.pad_id)
        return Window(start, len(pairs), batches, np.zeros((len(pairs), self.num_labels), np.float32))

    # ---- sentence-transformers' API -----------------------------------------------------------

    def predict(self, pairs: Sequence[Sequence[str]] | Sequence[str] | Iterable,
                batch_size: int | None = None, show_progress_bar: bool = False,
                activation_fn: Any = None, apply_softmax: bool = False,
                convert_to_numpy: bool = True, convert_to_tensor: bool = False,
                dtype: str | None = None):
        """Scores sentence pairs, as `sentence_transformers.CrossEncoder.predict`.

        Args:
          pairs: (text_a, text_b) pairs (a list, a generator), or one pair.
          batch_size: device batch as rows of 64 tokens, packed (None: `max_batch_tokens`).
          show_progress_bar: tqdm bar in pairs.
          activation_fn: for this call instead of the model's (see `resolve_activation`).
          apply_softmax: with several labels, softmax over them (after the activation).
          convert_to_numpy: float32 array ([n] for one label, [n, num_labels] otherwise); False
            gives a list of per-pair arrays.
          convert_to_tensor: a `jax.Array` instead (overrides convert_to_numpy).
          dtype: compute dtype for this call.

        Returns:
          The scores in input order; for a single pair, its score alone.

        Raises:
          TypeError: an item is not a pair of strings (names its index).
        """
        single = _is_single_pair(pairs)
        if single:
            pairs = [list(pairs)]
        elif isinstance(pairs, np.ndarray):
            pairs = pairs.tolist()
        parts = [c for _, c in self.logits_chunks(pairs, chunk_size=1 << 62, batch_size=batch_size,
                                                   show_progress_bar=show_progress_bar,
                                                   dtype=dtype)]
        logits = np.concatenate(parts) if parts else np.zeros((0, self.num_labels), np.float32)
        fn = self.activation_fn if activation_fn is None else resolve_activation(activation_fn)[1]
        scores = np.asarray(fn(logits), np.float32)
        if self.num_labels == 1:
            scores = scores[:, 0]
        if apply_softmax and scores.ndim > 1:
            scores = softmax(scores)
        if convert_to_tensor:
            result: Any = jnp.asarray(scores)
        elif convert_to_numpy:
            result = scores
        else:
            result = list(scores)
        return result[0] if single else result

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None,
             return_documents: bool = False, batch_size: int | None = None,
             show_progress_bar: bool = False, activation_fn: Any = None
             ) -> list[dict[str, Any]]:
        """Documents sorted by score for `query`, as `sentence_transformers.CrossEncoder.rank`:
        [{"corpus_id", "score"[, "text"]}], best first (ties in corpus order), the first `top_k`.

        Raises:
          ValueError: the model has several labels (rank needs one score per pair).
        """
        if self.num_labels != 1:
            raise ValueError(f"rank() needs a model with num_labels=1, this one has "
                             f"{self.num_labels}; use predict() on (query, document) pairs")
        documents = list(documents)
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size,
                              show_progress_bar=show_progress_bar, activation_fn=activation_fn)
        results = []
        for i, score in enumerate(scores.tolist()):
            results.append({"corpus_id": i, "score": score})
            if return_documents:
                results[-1]["text"] = documents[i]
        return sorted(results, key=lambda r: r["score"], reverse=True)[:top_k]

    # ---- saving -------------------------------------------------------------------------------

    def param_dict(self) -> dict:
        """{"backbone", "pooler", "classifier"} as a nested dict of host numpy arrays."""
        return jax.tree.map(np.asarray, nnx.to_pure_dict(self.params))

    def save(self, path: str, overwrite: bool = False) -> None:
        """Writes a sentence-transformers CrossEncoder folder (safetensors; see
        `cross_encoder_folder`), which `sentence_transformers.CrossEncoder`, transformers'
        `BertForSequenceClassification` and this class load to the same scores."""
        if self.activation_name is None:
            import warnings

            warnings.warn("a custom activation_fn cannot be saved; the folder gets "
                          "sentence-transformers' default for its label count", stacklevel=2)
        state = weights.seq_cls_flax_to_hf(self.param_dict(), self.config, self.num_labels)
        with atomic_directory(path, overwrite) as tmp:
            write_cross_encoder_folder(tmp, self.config, self.head, state, self.tokenizer,
                                       self.max_length, self.activation_name,
                                       self.model.hf_config)

    export_pytorch = save  # the saved folder is the PyTorch one; the name SentenceEncoder uses


def _windows(pairs: Iterable, window: int) -> Iterator[tuple[int, list]]:
    """(start, pairs) windows: MIN_WINDOW first, doubling up to `window`, so the devices start
    after a small window is prepared rather than a full one."""
    it = iter(pairs)
    start, size = 0, min(window, MIN_WINDOW)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield start, chunk
        start += len(chunk)
        size = min(window, 2 * size)

