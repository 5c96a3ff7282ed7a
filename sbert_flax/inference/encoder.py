"""`SentenceEncoder`: streaming, packed, jit-compiled encode over the local devices.

The serving path is torch-free: host-side tokenization, then packed batches of a few fixed shapes
(`packing.Packer`) go to one `jax.jit` per output kind, params passed as arguments. Input is read
lazily in windows; windows are tokenized and packed longest-first on background threads, a few
ahead of the one on the devices (`stream.prefetch`), while the caller's thread dispatches batches
with at most `IN_FLIGHT` on the devices, copies each result to the host as soon as it is done and
files it into its window (`stream.Window`, `stream.Reassembly`). Device memory is therefore
O(batch) and host memory O(window) plus the output the caller keeps.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax.checkpoints import weight_maps as weights
from sbert_flax.checkpoints.flax_folder import write_flax_folder
from sbert_flax.checkpoints.loading import DEFAULT_MODEL, LoadedModel, load_model
from sbert_flax.checkpoints.st_folder import write_st_folder
from sbert_flax.common.arraylike import l2_normalize_rows
from sbert_flax.common.files import atomic_directory
from sbert_flax.inference.encode_programs import EncodeProgram, encode_program, run_in_flight
from sbert_flax.inference.packing import ROW_LENGTHS, PackedBatch, Packer
from sbert_flax.inference.window_stream import Reassembly, Window, prefetch
from sbert_flax.models.config import BertConfig, PoolingConfig
from sbert_flax.models.embedder import abstract_embedder, embedder_params
from sbert_flax.models.pooling import cosine_similarity
from sbert_flax.models.prompts import Prompts, side_prompt_kwargs
from sbert_flax.models.tokenization import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Token budget of one device batch by default: 64 rows of 64 tokens. On CPU bigger batches gain
# nothing; on a GPU/TPU pass a larger `max_batch_tokens` (e.g. 16384, TEI's default).
DEFAULT_MAX_BATCH_TOKENS = 4096
ROW_UNIT = 64  # `encode(batch_size=N)` means a budget of N rows of this many tokens
IN_FLIGHT = 2  # batches dispatched but not yet copied back: bounds device memory
WINDOW_BATCHES = 64  # sentences are sorted and packed within a window of about this many batches
MIN_WINDOW = 1024  # sentences a window holds at least (fewer leave packing little to choose from)
# The first window is this fraction of a full one (then doubling): at a 64k-token budget a full
# window is 131k sentences, and the devices would wait for all of them to be tokenized and packed.
WINDOW_RAMP = 8
# Threads preparing windows (tokenize, pack) ahead of the devices; windows prepared or waiting:
# workers + 1 (bounded memory). One is the default: each `encode_batch` call already spreads over
# every core (the tokenizers library's own pool), so a second thread preparing the window after
# next only takes CPU from the next one (measured in bench/host_pipeline.py, (e)).
HOST_WORKERS = 1


class InputTooLong(ValueError):
    """An input exceeds the model's limit and truncation is off."""

    def __init__(self, index: int, length: int, limit: int):
        super().__init__(f"input {index} has {length} tokens, more than the limit of {limit} "
                         "(pass truncate=true to cut it)")
        self.index, self.length, self.limit = index, length, limit


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache, unless the user configured one already.

    A second process start then loads compiled executables instead of recompiling. The library
    never calls this itself (it changes process-wide JAX config); the `sbert-flax` CLI does.
    Opt out with `SBERT_FLAX_COMPILATION_CACHE=0`. Returns the cache directory, or None.
    """
    if os.environ.get("SBERT_FLAX_COMPILATION_CACHE", "1") == "0":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    cache_dir = cache_dir or os.environ.get("SBERT_FLAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sbert_flax", "jax")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # JAX only caches compilations slower than 1 s by default; small models and short rows
    # compile faster than that on GPU/TPU hosts, and a restart should recompile none of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache_dir


@dataclasses.dataclass
class EncodeStats:
    """What the last `encode` call did: for benchmarks and padding/compile accounting."""

    sentences: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_slots: int = 0
    shapes: tuple[tuple[int, int], ...] = ()

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_slots if self.padded_slots else 0.0

    def add(self, batch: PackedBatch) -> None:
        self.sentences += len(batch.index)
        self.batches += 1
        self.real_tokens += batch.real_tokens
        self.padded_slots += batch.shape[0] * batch.shape[1]
        if batch.shape not in self.shapes:
            self.shapes = tuple(sorted({*self.shapes, batch.shape}))


class SentenceEncoder:
    """A BERT sentence encoder: tokenizer + `SentenceEmbedder`, data-parallel over local devices.

    Args:
      model: what `loading.load_model` returns (host config, params, tokenizer, pooling, length).
      dtype: compute dtype, "float32" (default) or "bfloat16"; params stay float32.
      devices: devices for data-parallel encode; default all local devices.
      max_batch_tokens: token budget of a device batch (see `packing`).
      row_lengths: candidate packed row lengths (`buckets` is an alias); max_seq_length is
        always one.
      attention_impl: None (XLA) or "cudnn" (flash attention on NVIDIA GPUs, bf16/fp16).
      host_workers: threads preparing windows (tokenize, pack) while the devices compute;
        0 prepares them on the caller's thread, between dispatches.
    """

    def __init__(self, model: LoadedModel, *, dtype: str = "float32",
                 devices: Sequence[jax.Device] | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 row_lengths: Sequence[int] | None = None, buckets: Sequence[int] | None = None,
                 attention_impl: str | None = None, host_workers: int = HOST_WORKERS):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}")
        if host_workers < 0:
            raise ValueError(f"host_workers={host_workers} must be >= 0")
        self.host_workers = int(host_workers)
        self.in_flight = IN_FLIGHT
        self.model = model
        self.config: BertConfig = model.config
        self.tokenizer: Tokenizer = model.tokenizer
        self.pooling: PoolingConfig = model.pooling
        self.max_seq_length = int(model.max_seq_length)
        self.prompts: Prompts = model.prompts
        self.dtype = dtype
        self.max_batch_tokens = int(max_batch_tokens)
        self.row_lengths = tuple(row_lengths or buckets or ROW_LENGTHS)
        self.attention_impl = attention_impl
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        graphdef, abstract = abstract_embedder(model.config, model.pooling)
        nnx.replace_by_pure_dict(abstract, embedder_params(model.params))
        self._graphdef = graphdef
        self.params = jax.device_put(abstract, NamedSharding(self.mesh, P()))  # replicated
        self._data = NamedSharding(self.mesh, P("data"))  # batches: rows split over devices
        self._fns: dict[tuple[str, str], EncodeProgram] = {}
        self._packers: dict = {}
        self.last_stats = EncodeStats()

    @property
    def num_compiles(self) -> int:
        """Shapes compiled for the programs this encoder runs. Programs are shared process-wide
        (`programs.encode_program`): an encoder of an architecture already compiled adds none."""
        return sum(p.traces for p in self._fns.values())

    @property
    def num_traces(self) -> int:  # the name before the packed encode
        return self.num_compiles

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_MODEL, pooling: str | None = None,
                        max_seq_length: int | None = None, dtype: str = "float32",
                        normalize: bool | None = None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        **kwargs) -> SentenceEncoder:
        """Loads an sbert-flax dir, a HF / sentence-transformers dir, or a hub id.

        Args:
          path: local directory, or a Hugging Face hub id (downloaded with huggingface_hub).
          pooling: "cls" | "mean" | "max" to override the folder's pooling ("cls" is what UER-py
            used in training); None keeps the folder's (mean for plain HF folders).
          max_seq_length: override the folder's sequence length.
          dtype: compute dtype.
          normalize: override whether embeddings are L2-normalised by the model.
          revision: hub ids: branch, tag or commit (default: the default branch).
          token: hub ids: access token for gated / private models (None: HF_TOKEN or the login).
          cache_dir: hub ids: the download cache (default: huggingface_hub's).
          **kwargs: passed to the constructor (devices, max_batch_tokens, row_lengths, ...).
        """
        model = load_model(path, pooling=pooling, max_seq_length=max_seq_length, normalize=normalize,
                           revision=revision, token=token, cache_dir=cache_dir)
        return cls(model, dtype=dtype, **kwargs)

    @classmethod
    def from_uer(cls, checkpoint_path: str, vocab_path: str, config_path: str, pooling: str = "cls",
                 max_seq_length: int = 128, tower: int | None = None, **kwargs) -> SentenceEncoder:
        """Loads a UER-py checkpoint (sbert or single-tower `.bin`) with its UER or HF config.

        `tower` (sbert checkpoints): None takes tower 0 and requires the towers to be tied;
        0 or 1 takes that tower and ignores the other (see `uer.uer_to_hf`).
        """
        model = load_model(checkpoint_path, pooling=pooling, max_seq_length=max_seq_length,
                           vocab_path=vocab_path, config_path=config_path, tower=tower)
        return cls(model, **kwargs)

    @classmethod
    def from_parts(cls, config: BertConfig, params: dict, tokenizer: Tokenizer,
                   pooling: PoolingConfig, max_seq_length: int, prompts: Prompts | None = None,
                   **kwargs) -> SentenceEncoder:
        """An encoder over host params already in memory (e.g. a trainer's best params)."""
        return cls(LoadedModel(config, params, tokenizer, pooling, int(max_seq_length),
                               prompts=prompts or Prompts()), **kwargs)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    # ---- compiled functions -------------------------------------------------------------------

    def packer(self, max_batch_tokens: int | None = None, max_seq_length: int | None = None) -> Packer:
        key = (int(max_batch_tokens or self.max_batch_tokens), int(max_seq_length or self.max_seq_length))
        if key not in self._packers:
            self._packers[key] = Packer(key[0], key[1], len(self.devices), self.row_lengths)
        return self._packers[key]

    def _fn(self, dtype: str, output: str):
        key = (dtype, output)
        if key not in self._fns:
            model = nnx.merge(self._graphdef, self.params)
            model.backbone.dtype = jnp.dtype(DTYPES[dtype])
            model.backbone.attention_impl = self.attention_impl
            self._fns[key] = encode_program(nnx.graphdef(model), output, self.devices)
        return self._fns[key].fn

    def _dispatch(self, batch: PackedBatch, dtype: str, output: str) -> jax.Array:
        put = jax.device_put((batch.ids, batch.segments, batch.positions), self._data)
        out = self._fn(dtype, output)(self.params, *put)
        out.copy_to_host_async()  # the copy overlaps the next batch's compute
        return out

    def _run(self, batches: Iterable[PackedBatch], dtype: str, output: str
             ) -> Iterator[tuple[PackedBatch, np.ndarray]]:
        """Runs batches with at most `in_flight` on the devices; yields (batch, host result) in order.

        The `batches` iterator is advanced (tokenizing, packing) while earlier batches compute.
        """
        yield from run_in_flight(batches, lambda b: self._dispatch(b, dtype, output), self.in_flight)

    # ---- serving-level API --------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], *, truncate: bool = True, direction: str = "right",
                 max_length: int | None = None) -> list[np.ndarray]:
        """Token ids (with [CLS]/[SEP]) per text.

        Raises:
          InputTooLong: `truncate=False` and an input is longer than the limit (names the index).
        """
        limit = int(max_length or self.max_seq_length)
        if truncate:
            return self.tokenizer.encode(texts, limit, truncation_side=direction)
        ids = self.tokenizer.encode(texts, None)
        for i, x in enumerate(ids):
            if len(x) > limit:
                raise InputTooLong(i, len(x), limit)
        return ids

    def embed_ids(self, ids: Sequence[np.ndarray], *, normalize: bool = False,
                  dtype: str | None = None) -> np.ndarray:
        """Embeds token-id sequences (from `tokenize`) on the precompiled shapes; float32 [n, dim]."""
        out = np.zeros((len(ids), self.dim), np.float32)
        stats = EncodeStats()
        batches = self.packer().pack(ids, pad_id=self.tokenizer.pad_id)
        for batch, res in self._run(batches, dtype or self.dtype, "sentence"):
            out[batch.index] = res[batch.row, batch.slot]
            stats.add(batch)
        self.last_stats = stats
        return l2_normalize_rows(out) if normalize else out

    def warmup(self, dtype: str | None = None) -> int:
        """Compiles (and runs once) every shape of the token budget; returns how many shapes."""
        shapes = self.packer().shapes()
        for rows, length in shapes:
            z = np.zeros((rows, length), np.int32)
            seg = z.copy()
            seg[:, 0] = 1  # one 1-token sentence per row: a realistic mask, nothing degenerate
            dummy = PackedBatch(z, seg, z, np.zeros(0, np.int64), *np.zeros((4, 0), np.int32))
            np.asarray(self._dispatch(dummy, dtype or self.dtype, "sentence"))
        return len(shapes)

    # ---- encoding -----------------------------------------------------------------------------

    def _windows(self, sentences: Iterable[str], window: int) -> Iterator[tuple[int, list[str]]]:
        """(start, texts) windows of the input: the first WINDOW_RAMP-th of `window` (at least
        MIN_WINDOW), doubling up to `window`, so the devices start after a small window is
        prepared rather than a full one, and later windows overlap their compute."""
        it = iter([sentences] if isinstance(sentences, str) else sentences)
        start = 0
        size = min(window, max(MIN_WINDOW, window // WINDOW_RAMP))
        while True:
            texts = list(itertools.islice(it, size))
            if not texts:
                return
            for j, s in enumerate(texts):
                if not isinstance(s, str):
                    raise TypeError(f"sentences[{start + j}] is {type(s).__name__}, expected str")
            yield start, texts
            start += len(texts)
            size = min(window, 2 * size)

    def encode_chunks(self, sentences: Iterable[str], chunk_size: int = 100_000, *,
                      batch_size: int | None = None, normalize: bool = False,
                      truncate_dim: int | None = None, show_progress_bar: bool = False,
                      max_seq_length: int | None = None, dtype: str | None = None,
                      output: Literal["sentence", "token"] = "sentence",
                      prompt: str | None = None, prompt_name: str | None = None,
                      ) -> Iterator[tuple[np.ndarray, np.ndarray | list[np.ndarray]]]:
        """Streams embeddings: yields (row indices, float32 [k, dim]) chunks in input order.

        Reads `sentences` lazily (a list, a generator, an open file: lines are stripped), so
        memory stays bounded whatever the input size. Arguments are those of `encode`; with
        `output="token"` each chunk is a list of [tokens_i, dim] arrays.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        if output not in ("sentence", "token"):
            raise ValueError(f"output={output!r}; expected 'sentence' or 'token'")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        msl = int(max_seq_length or self.max_seq_length)
        if not 2 <= msl <= self.config.max_position_embeddings:
            raise ValueError(f"max_seq_length={msl} must be in [2, {self.config.max_position_embeddings}]")
        dtype = dtype or self.dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}")
        if truncate_dim is not None and not 1 <= truncate_dim <= self.dim:
            raise ValueError(f"truncate_dim={truncate_dim} must be in [1, {self.dim}]")
        # Resolved before the first sentence is read: a bad prompt_name fails before any work.
        prefix = self.prompts.resolve(prompt, prompt_name)
        stats = EncodeStats()
        self.last_stats = stats
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(desc="encode", unit="sent", unit_scale=True)

        def finish(emb: np.ndarray) -> np.ndarray:
            if truncate_dim is not None:
                emb = emb[:, :truncate_dim]
            return l2_normalize_rows(emb) if normalize else emb

        windows: collections.deque[Window] = collections.deque()  # dispatched, not complete
        out = Reassembly(chunk_size, finish)

        def batches() -> Iterator[PackedBatch]:
            for w in self.prepared_windows(sentences, batch_size=batch_size, max_seq_length=msl,
                                           prefix=prefix, output=output):
                windows.append(w)
                yield from w.batches

        for batch, res in self._run(batches(), dtype, output):
            windows[0].store(batch, res)  # batches come back in dispatch order
            stats.add(batch)
            if bar is not None:
                bar.update(len(batch.index))
            while windows and windows[0].done:
                out.add(windows.popleft())
            yield from out.chunks()
        while windows:  # windows of only empty input have no batches
            out.add(windows.popleft())
        yield from out.chunks(final=True)
        if bar is not None:
            bar.close()

    def prepared_windows(self, sentences: Iterable[str], *, batch_size: int | None = None,
                         max_seq_length: int | None = None, prefix: str = "",
                         output: Literal["sentence", "token"] = "sentence",
                         workers: int | None = None) -> Iterator[Window]:
        """The windows `encode_chunks` dispatches, tokenized and packed (the host side alone).

        Windows are prepared on `workers` background threads (default `host_workers`), up to
        workers + 1 ahead of the one the caller holds; they come in input order.
        """
        budget = batch_size * ROW_UNIT if batch_size else self.max_batch_tokens
        msl = int(max_seq_length or self.max_seq_length)
        packer = self.packer(budget, msl)
        window = max(MIN_WINDOW, WINDOW_BATCHES * budget // 32)  # ~32 tokens a sentence, generously
        workers = self.host_workers if workers is None else int(workers)
        prepare = functools.partial(self._prepare_window, packer=packer, max_seq_length=msl,
                                    prefix=prefix, output=output)
        yield from prefetch(prepare, self._windows(sentences, window), workers, workers + 1)

    def _prepare_window(self, item: tuple[int, list[str]], *, packer: Packer, max_seq_length: int,
                        prefix: str, output: str) -> Window:
        """Tokenizes and packs one window; runs on a preparation thread."""
        start, texts = item
        if prefix:
            # As sentence-transformers: the prompt is text, tokenized with the sentence (its
            # tokens count against max_seq_length and are pooled).
            texts = [prefix + t for t in texts]
        ids = self.tokenizer.encode_ids(texts, max_seq_length)
        batches = packer.pack(ids, pad_id=self.tokenizer.pad_id)
        result: np.ndarray | list = (np.zeros((len(texts), self.dim), np.float32)
                                     if output == "sentence" else [None] * len(texts))
        return Window(start, len(texts), batches, result)

    def encode(self, sentences: str | Iterable[str], batch_size: int | None = None,
               normalize: bool = False, show_progress_bar: bool = False,
               max_seq_length: int | None = None, dtype: str | None = None,
               output: Literal["sentence", "token"] = "sentence", truncate_dim: int | None = None,
               prompt: str | None = None, prompt_name: str | None = None):
        """Embeds sentences.

        Args:
          sentences: a string, or any iterable of strings (list, generator, file object).
          batch_size: device batch as rows of 64 tokens (a token budget of batch_size x 64,
            packed); None uses the encoder's `max_batch_tokens`.
          normalize: L2-normalise the embeddings (after `truncate_dim`; the model's own Normalize
            module, if any, applies regardless, as in sentence-transformers).
          show_progress_bar: tqdm bar in sentences.
          max_seq_length: override the truncation length for this call.
          dtype: override the compute dtype for this call.
          output: "sentence" -> float32 array [n, dim] in input order; "token" -> list of float32
            arrays [tokens_i, dim] (the real tokens of each sentence).
          truncate_dim: keep the first `truncate_dim` dimensions (Matryoshka models).
          prompt: text prepended to every sentence (e.g. "查询：").
          prompt_name: a key of `self.prompts.prompts` (the model's
            `config_sentence_transformers.json`); `prompt` wins if both are given. With neither,
            the model's `default_prompt_name` applies, as in sentence-transformers.

        Raises:
          TypeError: an item is not a string (names its index).
          ValueError: an unknown `prompt_name` (lists the model's prompt names).
        """
        chunks = self.encode_chunks(sentences, chunk_size=1 << 62, batch_size=batch_size,
                                    normalize=normalize, truncate_dim=truncate_dim,
                                    show_progress_bar=show_progress_bar,
                                    max_seq_length=max_seq_length, dtype=dtype, output=output,
                                    prompt=prompt, prompt_name=prompt_name)
        parts = [c for _, c in chunks]
        if output == "token":
            return [t for part in parts for t in part]
        if not parts:
            return np.zeros((0, truncate_dim or self.dim), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def encode_query(self, sentences: str | Iterable[str], **kwargs: Any):
        """`encode` for the query side of a search, as sentence-transformers' `encode_query`:
        without `prompt` / `prompt_name` the model's "query" prompt (empty unless configured)
        applies, never `default_prompt_name`."""
        return self._encode_side("query", sentences, kwargs)

    def encode_document(self, sentences: str | Iterable[str], **kwargs: Any):
        """`encode` for the corpus side, as sentence-transformers' `encode_document`: without
        `prompt` / `prompt_name` the first of the "document", "passage", "corpus" prompts."""
        return self._encode_side("document", sentences, kwargs)

    def _encode_side(self, side: str, sentences: str | Iterable[str], kwargs: dict[str, Any]):
        kwargs.update(side_prompt_kwargs(self, side, kwargs.pop("prompt", None),
                                         kwargs.pop("prompt_name", None)))
        return self.encode(sentences, **kwargs)

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] of two embedding arrays."""
        a = np.atleast_2d(np.asarray(a, np.float32))
        b = np.atleast_2d(np.asarray(b, np.float32))
        return np.asarray(cosine_similarity(jnp.asarray(a), jnp.asarray(b)))

    # ---- saving -------------------------------------------------------------------------------

    def param_dict(self) -> dict:
        """The backbone parameters as a nested dict of host numpy arrays."""
        return jax.tree.map(np.asarray, nnx.to_pure_dict(self.params))["backbone"]

    def save(self, path: str, overwrite: bool = False) -> None:
        """Writes the sbert-flax format (see `flax_format`)."""
        with atomic_directory(path, overwrite) as tmp:
            write_flax_folder(tmp, self.config, self.param_dict(), self.pooling, self.max_seq_length,
                              self.tokenizer, self.prompts)

    def export_pytorch(self, path: str, overwrite: bool = False) -> None:
        """Writes a sentence-transformers folder (safetensors) with the same embeddings."""
        state = weights.flax_to_hf(self.param_dict(), self.config)
        with atomic_directory(path, overwrite) as tmp:
            write_st_folder(tmp, self.config, state, self.pooling, self.max_seq_length,
                            self.tokenizer.lowercase_text, self.tokenizer, self.prompts)

