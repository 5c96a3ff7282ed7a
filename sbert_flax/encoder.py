"""`SentenceEncoder`: load a model, encode sentences with one jitted function per shape, save it.

The serving path is torch-free: HF / sentence-transformers folders are read with safetensors
(`pytorch_model.bin` needs torch only to unpickle), tokenization is host-side, and the device runs
`forward(params, ids, mask)` compiled once per (batch, bucket) shape.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sbert_flax import checkpoint, weights
from sbert_flax.config import BertConfig, PoolingConfig
from sbert_flax.files import atomic_directory, read_json, write_json
from sbert_flax.model import BertModel
from sbert_flax.pooling import cosine_similarity, l2_normalize, pool
from sbert_flax.st_format import read_st_folder, write_st_folder
from sbert_flax.tokenization import (
    DEFAULT_BUCKETS,
    Tokenizer,
    bucket_for,
    bucket_lengths,
    load_tokenizer,
    pad_batch,
)

FORMAT_FILE = "sbert_flax.json"
FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache unless the user configured one already.

    A second process start then loads compiled executables instead of recompiling. Opt out
    with `SBERT_FLAX_COMPILATION_CACHE=0` or `SentenceEncoder(..., compilation_cache=False)`.
    """
    if os.environ.get("SBERT_FLAX_COMPILATION_CACHE", "1") == "0":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    cache_dir = cache_dir or os.environ.get("SBERT_FLAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sbert_flax", "jax")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # JAX only caches compilations slower than 1 s by default; small models and short buckets
    # compile faster than that on GPU/TPU hosts, and a restart should recompile none of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache_dir


def abstract_model(cfg: BertConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and abstract param shapes, without allocating weights."""
    model = nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    return nnx.split(model)


def check_params(params: dict, cfg: BertConfig, source: str) -> None:
    """Every expected param present with the config's shape, nothing extra; errors name the path."""
    _, abstract = abstract_model(cfg)
    want = {jax.tree_util.keystr(p): v.shape for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))}
    have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise weights.WeightsError(f"{source}: params missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in want.items():
        if tuple(have[k]) != tuple(shape):
            raise weights.WeightsError(f"{source}: param {k} has shape {have[k]}, config needs {shape}")


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


class SentenceEncoder:
    """A BERT sentence encoder: tokenizer + Flax backbone + pooling.

    Args:
      config: the backbone architecture.
      params: nested dict of float32 arrays, as produced by `weights.hf_to_flax`.
      tokenizer: host-side tokenizer.
      pooling: pooling mode and whether the model normalises (sentence-transformers' Normalize).
      max_seq_length: tokens per sentence incl. [CLS]/[SEP]; longer input is truncated.
      dtype: compute dtype, "float32" (default) or "bfloat16"; params stay float32.
      buckets: candidate padded lengths; see `tokenization.DEFAULT_BUCKETS`.
      compilation_cache: use JAX's persistent compilation cache (see `enable_compilation_cache`).
      devices: devices for data-parallel encode; default all local devices.
    """

    def __init__(self, config: BertConfig, params: dict, tokenizer: Tokenizer, pooling: PoolingConfig,
                 max_seq_length: int, dtype: str = "float32", buckets: Sequence[int] = DEFAULT_BUCKETS,
                 compilation_cache: bool = True, devices: Sequence[jax.Device] | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}")
        if not 2 <= max_seq_length <= config.max_position_embeddings:
            raise ValueError(f"max_seq_length={max_seq_length} must be in [2, "
                             f"max_position_embeddings={config.max_position_embeddings}]")
        if compilation_cache:
            enable_compilation_cache()
        self.config = config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = int(max_seq_length)
        self.dtype = dtype
        self.buckets = tuple(sorted(buckets))
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._graphdef, abstract = abstract_model(config)
        nnx.replace_by_pure_dict(abstract, params)
        self.params = jax.device_put(abstract, NamedSharding(self.mesh, P()))  # replicated
        self._fns: dict = {}
        self.num_traces = 0  # incremented at trace time: the number of compilations
        self.last_stats = EncodeStats()

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, pooling: str | None = None, max_seq_length: int | None = None,
                        dtype: str = "float32", normalize: bool | None = None, **kwargs) -> SentenceEncoder:
        """Loads an sbert-flax dir, a HF / sentence-transformers dir, or a hub id.

        Args:
          path: local directory, or a Hugging Face hub id (downloaded with huggingface_hub).
          pooling: "cls" | "mean" | "max" to override the folder's pooling ("cls" is what UER-py
            used in training); None keeps the folder's (mean for plain HF folders).
          max_seq_length: override the folder's sequence length.
          dtype: compute dtype.
          normalize: override whether embeddings are L2-normalised by the model.
          **kwargs: passed to the constructor (buckets, compilation_cache, devices).
        """
        local = resolve_model_path(path)
        if os.path.isfile(os.path.join(local, FORMAT_FILE)):
            meta = read_json(os.path.join(local, FORMAT_FILE))
            cfg = BertConfig.from_json_file(os.path.join(local, "config.json"))
            params = checkpoint.load_params(local)
            check_params(params, cfg, local)
            pool_cfg = PoolingConfig(meta["pooling"], bool(meta.get("normalize", False)))
            msl, lower, tok_dir = meta["max_seq_length"], bool(meta.get("lowercase_text", False)), local
        else:
            st = read_st_folder(local)
            cfg = st.config
            wfile = weights.find_weights_file(st.model_dir)
            # Errors name the weights file; the config they were checked against is beside it.
            params = weights.hf_to_flax(weights.read_weights(wfile), cfg, source=wfile)
            pool_cfg, msl, lower, tok_dir = st.pooling, st.max_seq_length, st.lowercase_text, st.model_dir
        tokenizer = load_tokenizer(tok_dir, lowercase_text=lower)
        if msl is None:
            # sentence-transformers' rule for folders without sentence_bert_config.json.
            msl = min(tokenizer.model_max_length, cfg.max_position_embeddings)
        pool_cfg = PoolingConfig(pooling or pool_cfg.mode,
                                 pool_cfg.normalize if normalize is None else normalize)
        return cls(cfg, params, tokenizer, pool_cfg, max_seq_length or msl, dtype=dtype, **kwargs)

    @classmethod
    def from_uer(cls, checkpoint_path: str, vocab_path: str, config_path: str, pooling: str = "cls",
                 max_seq_length: int = 128, tower: int | None = None, **kwargs) -> SentenceEncoder:
        """Loads a UER-py checkpoint (sbert or single-tower `.bin`) with its UER or HF config.

        `tower` (sbert checkpoints): None takes tower 0 and requires the towers to be tied;
        0 or 1 takes that tower and ignores the other (see `weights.uer_to_hf`).
        """
        tokenizer = load_tokenizer(vocab_path)  # cheap: a bad vocab path fails before the big read
        state = weights.read_state_dict(checkpoint_path)
        cfg_dict = read_json(config_path)
        hf = weights.uer_to_hf(state, tower=tower, source=checkpoint_path)
        if "model_type" in cfg_dict or "num_hidden_layers" in cfg_dict:
            cfg = BertConfig.from_hf_dict(cfg_dict, source=config_path)
        else:
            cfg = weights.config_from_uer_hf(cfg_dict, hf, source=checkpoint_path)
        params = weights.hf_to_flax(hf, cfg, source=checkpoint_path)
        return cls(cfg, params, tokenizer, PoolingConfig(pooling), max_seq_length, **kwargs)

    # ---- encoding -----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def _forward_fn(self, dtype: str, mode: str, normalize: bool, output: str):
        key = (dtype, mode, normalize, output)
        if key not in self._fns:
            model = nnx.merge(self._graphdef, self.params)
            model.dtype = jnp.dtype(DTYPES[dtype])
            graphdef = nnx.graphdef(model)
            data = NamedSharding(self.mesh, P("data"))

            def forward(params, ids, mask):
                self.num_traces += 1  # runs once per compilation, never per call
                hidden = nnx.merge(graphdef, params)(ids, mask)  # [B, L, D]
                if output == "token":
                    return hidden.astype(jnp.float32)
                emb = pool(hidden, mask, mode)
                return l2_normalize(emb) if normalize else emb

            self._fns[key] = jax.jit(forward, in_shardings=(NamedSharding(self.mesh, P()), data, data),
                                     out_shardings=data)
        return self._fns[key]

    def _batch_rows(self, n: int, batch_size: int) -> int:
        """Rows per device batch: `batch_size` rounded up to the device count; a lone short
        request is padded only to the next power of two, not to a full batch."""
        ndev = len(self.devices)
        full = -(-batch_size // ndev) * ndev
        if n >= full:
            return full
        small = 1 << max(0, (n - 1).bit_length())
        return min(full, -(-max(small, ndev) // ndev) * ndev)

    def encode(self, sentences: str | Sequence[str], batch_size: int = 64, normalize: bool = False,
               show_progress_bar: bool = False, max_seq_length: int | None = None,
               dtype: str | None = None, output: Literal["sentence", "token"] = "sentence"):
        """Embeds sentences.

        Args:
          sentences: a string or a sequence of strings.
          batch_size: sentences per device step (rounded up to a multiple of the device count).
          normalize: L2-normalise the embeddings (the model's own Normalize module, if any,
            applies regardless, as in sentence-transformers).
          show_progress_bar: tqdm bar over batches.
          max_seq_length: override the truncation length for this call.
          dtype: override the compute dtype for this call.
          output: "sentence" -> float32 array [n, dim] in input order; "token" -> list of float32
            arrays [tokens_i, dim] (the real tokens of each sentence).

        Raises:
          TypeError: an item is not a string (names its index).
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        if output not in ("sentence", "token"):
            raise ValueError(f"output={output!r}; expected 'sentence' or 'token'")
        sentences = list(sentences)
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentences[{i}] is {type(s).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        msl = int(max_seq_length or self.max_seq_length)
        if not 2 <= msl <= self.config.max_position_embeddings:
            raise ValueError(f"max_seq_length={msl} must be in [2, {self.config.max_position_embeddings}]")
        dtype = dtype or self.dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}")
        n = len(sentences)
        if n == 0:
            self.last_stats = EncodeStats()
            return np.zeros((0, self.dim), np.float32) if output == "sentence" else []

        ids = self.tokenizer.encode(sentences, msl)
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable")  # longest first, as sentence-transformers
        buckets = bucket_lengths(msl, self.buckets)
        rows = self._batch_rows(n, batch_size)
        fn = self._forward_fn(dtype, self.pooling.mode, normalize or self.pooling.normalize, output)
        data = NamedSharding(self.mesh, P("data"))

        stats = EncodeStats(sentences=n, real_tokens=int(lengths.sum()))
        shapes: set[tuple[int, int]] = set()
        outs = []
        starts = range(0, n, rows)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        for start in starts:
            idx = order[start:start + rows]
            length = bucket_for(int(lengths[idx].max()), buckets)
            b_ids, b_mask = pad_batch([ids[i] for i in idx], length, rows, self.tokenizer.pad_id)
            # Dispatch is asynchronous: the host pads the next batch while the device computes.
            outs.append(fn(self.params, jax.device_put(b_ids, data), jax.device_put(b_mask, data)))
            shapes.add((rows, length))
            stats.batches += 1
            stats.padded_slots += rows * length
        stats.shapes = tuple(sorted(shapes))
        self.last_stats = stats

        if output == "token":
            result: list = [None] * n
            for start, out in zip(range(0, n, rows), outs, strict=True):
                out = np.asarray(out)
                for j, i in enumerate(order[start:start + rows]):
                    result[i] = out[j, : lengths[i]]
            return result
        emb = np.concatenate([np.asarray(o) for o in outs])[:n]
        result_arr = np.empty_like(emb)
        result_arr[order] = emb
        return result_arr

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] of two embedding arrays."""
        a = np.atleast_2d(np.asarray(a, np.float32))
        b = np.atleast_2d(np.asarray(b, np.float32))
        return np.asarray(cosine_similarity(jnp.asarray(a), jnp.asarray(b)))

    # ---- saving -------------------------------------------------------------------------------

    def param_dict(self) -> dict:
        """The parameters as a nested dict of host numpy arrays."""
        return jax.tree.map(np.asarray, nnx.to_pure_dict(self.params))

    def save(self, path: str, overwrite: bool = False) -> None:
        """Writes the sbert-flax format: orbax params + config.json + tokenizer + sbert_flax.json."""
        with atomic_directory(path, overwrite) as tmp:
            checkpoint.save_params(tmp, self.param_dict())
            write_json(os.path.join(tmp, "config.json"), self.config.to_hf_dict())
            self.tokenizer.save(tmp)
            write_json(os.path.join(tmp, FORMAT_FILE), {
                "format": "sbert-flax", "version": FORMAT_VERSION, "pooling": self.pooling.mode,
                "normalize": self.pooling.normalize, "max_seq_length": self.max_seq_length,
                "lowercase_text": self.tokenizer.lowercase_text,
            })

    def export_pytorch(self, path: str, overwrite: bool = False) -> None:
        """Writes a sentence-transformers folder (safetensors) with the same embeddings."""
        state = weights.flax_to_hf(self.param_dict(), self.config)
        with atomic_directory(path, overwrite) as tmp:
            write_st_folder(tmp, self.config, state, self.pooling, self.max_seq_length,
                            self.tokenizer.lowercase_text, self.tokenizer)


def resolve_model_path(path: str) -> str:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path)
    except Exception as e:
        raise OSError(
            f"{path!r} is not a local directory and could not be downloaded from the Hugging Face "
            f"hub ({type(e).__name__}: {e}). If you are offline, download the model elsewhere and "
            "pass its local directory instead."
        ) from None
