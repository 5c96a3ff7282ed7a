"""Corpus encoding: a text file (one sentence a line) -> a `.npy` of embeddings, streamed.

Memory stays flat whatever the line count: lines are read lazily, `encode_chunks` yields rows in
input order, and each chunk is appended to the output file with plain sequential writes (a
`.npy` header for the known shape, then the rows). A memory map would do the same job but its
written pages stay resident in the process (they count in RSS until the kernel evicts them);
sequential writes leave them to the page cache. Everything goes to a temp name renamed at the end.

Several processes (`jax.distributed`, e.g. one per TPU host) split the file by line ranges; each
writes its shard and process 0 writes the manifest (`embeddings_file.write_manifest`), so
`util.load_embeddings(output)` returns the rows in input order.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from sbert_flax.common.files import atomic_path, count_text_lines, iter_text_lines
from sbert_flax.inference import embeddings_file
from sbert_flax.inference.quantization import quantize_embeddings

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
_BLOCK_ROWS = 65536  # rows per read/quantize block in the second pass


@dataclasses.dataclass(frozen=True)
class EncodeFileResult:
    """What `encode_file` wrote."""

    path: str  # this process's file (the output, or its shard)
    rows: int  # rows this process wrote
    total_rows: int  # lines in the input
    dim: int  # columns of the written array (packed bytes for binary precisions)
    dtype: str
    manifest: str | None  # written by process 0 of a multi-process run


def line_range(total: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous lines [start, stop) that process `process_index` encodes."""
    return total * process_index // process_count, total * (process_index + 1) // process_count


class _NpyWriter:
    """Appends rows to a `.npy` file of known shape with sequential writes (no memory map)."""

    def __init__(self, path: str, rows: int, dim: int, dtype: np.dtype):
        self.f = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self.dtype, self.dim, self.left = np.dtype(dtype), dim, rows
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (rows, dim)}
        np.lib.format.write_array_header_1_0(self.f, header)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, self.dtype)
        if block.ndim != 2 or block.shape[1] != self.dim or block.shape[0] > self.left:
            raise ValueError(f"block of shape {block.shape} does not fit the {self.left} rows x "
                             f"{self.dim} left")
        self.f.write(block.tobytes())
        self.left -= block.shape[0]

    def close(self) -> None:
        self.f.close()
        if self.left:
            raise ValueError(f"{self.left} rows were never written")


def _read_blocks(path: str, block_rows: int = _BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Rows of a 2-D `.npy` in blocks, read (not mapped) so that RSS stays bounded."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        rows, dim = shape
        for start in range(0, rows, block_rows):
            k = min(block_rows, rows - start)
            yield np.fromfile(f, dtype=dtype, count=k * dim).reshape(k, dim)


def _global_ranges(float_path: str, process_count: int) -> np.ndarray:
    """int8/uint8 calibration: per-dimension [min; max] over every process's rows.

    sentence-transformers takes the ranges from the embeddings being quantized; with several
    processes they must be the whole corpus's, or the shards would use different scales.
    """
    lo = hi = None
    for block in _read_blocks(float_path):
        if len(block):
            bmin, bmax = block.min(axis=0), block.max(axis=0)
            lo = bmin if lo is None else np.minimum(lo, bmin)
            hi = bmax if hi is None else np.maximum(hi, bmax)
    if process_count > 1:
        from jax.experimental import multihost_utils

        dim = np.load(float_path, mmap_mode="r").shape[1]
        mine = np.stack([lo if lo is not None else np.full(dim, np.inf, np.float32),
                         hi if hi is not None else np.full(dim, -np.inf, np.float32)])
        every = np.asarray(multihost_utils.process_allgather(mine))  # [P, 2, dim]
        lo, hi = every[:, 0].min(axis=0), every[:, 1].max(axis=0)
    if lo is None:
        raise ValueError("cannot calibrate int8/uint8 ranges from an empty input")
    return np.stack([lo, hi]).astype(np.float32)


def encode_file(encoder, input_path: str, output_path: str, *, batch_size: int | None = None,
                normalize: bool = False, precision: str = "float32", truncate_dim: int | None = None,
                show_progress_bar: bool = False, process_index: int = 0, process_count: int = 1,
                chunk_size: int = 8192, merge: bool = False, prompt: str | None = None,
                prompt_name: str | None = None) -> EncodeFileResult:
    """Encodes every line of `input_path` into `output_path` (`.npy`, row i = line i + 1).

    Args:
      encoder: a `SentenceEncoder`.
      input_path: UTF-8 text, one sentence a line (a non-UTF-8 or NUL line names file:line).
      output_path: the `.npy` to write (a multi-process run writes shards + a manifest beside it).
      batch_size, normalize, truncate_dim, show_progress_bar, prompt, prompt_name: as
        `SentenceEncoder.encode`.
      precision: "float32", or quantized like sentence-transformers' `quantize_embeddings`
        ("int8"/"uint8" calibrated on the whole corpus, "binary"/"ubinary" bit-packed).
      process_index, process_count: this process's share of a multi-process run.
      chunk_size: rows per write.
      merge: multi-process: process 0 merges the shards into one `.npy` after every process is
        done (needs a filesystem all processes share).

    Raises:
      ValueError: a bad line (file:line), an unknown precision.
      FileNotFoundError: the input or the output's folder is missing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
    encoder.prompts.resolve(prompt, prompt_name)  # an unknown prompt_name fails before any file work
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):  # before the slow part, not after it
        raise FileNotFoundError(f"output directory does not exist: {out_dir}")
    total = count_text_lines(input_path)  # validates every line before any encoding
    start, stop = line_range(total, process_index, process_count)
    target = output_path if process_count == 1 else embeddings_file.shard_path(output_path, process_index,
                                                                     process_count)
    dim = truncate_dim or encoder.dim
    lines = itertools.islice(iter_text_lines(input_path), start, stop)

    def write_floats(path: str) -> None:
        writer = _NpyWriter(path, stop - start, dim, np.float32)
        try:
            for _, chunk in encoder.encode_chunks(lines, chunk_size, batch_size=batch_size,
                                                  normalize=normalize, truncate_dim=truncate_dim,
                                                  show_progress_bar=show_progress_bar,
                                                  prompt=prompt, prompt_name=prompt_name):
                writer.write(chunk)
        finally:
            writer.f.close()
        writer.close()

    if precision == "float32":
        with atomic_path(target) as tmp:
            write_floats(tmp)
        out_dtype, out_dim = "float32", dim
    else:
        # Two passes: floats to a scratch file, then (int8/uint8) ranges over all of it and the
        # quantized rows to the target.
        fd, float_tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.float32-", dir=out_dir)
        os.close(fd)
        try:
            write_floats(float_tmp)
            ranges = (_global_ranges(float_tmp, process_count)
                      if precision in ("int8", "uint8") else None)
            probe = quantize_embeddings(np.zeros((1, dim), np.float32), precision, ranges=ranges)
            with atomic_path(target) as q_tmp:
                qw = _NpyWriter(q_tmp, stop - start, probe.shape[1], probe.dtype)
                try:
                    for block in _read_blocks(float_tmp):
                        qw.write(quantize_embeddings(block, precision, ranges=ranges))
                finally:
                    qw.f.close()
                qw.close()
        finally:
            os.remove(float_tmp)
        out_dtype, out_dim = str(probe.dtype), probe.shape[1]
    manifest = None
    if process_count > 1:
        from jax.experimental import multihost_utils

        # Every shard must be complete before process 0 describes (or merges) them.
        rows = np.asarray(multihost_utils.process_allgather(np.int64(stop - start))).reshape(-1)
        multihost_utils.sync_global_devices("sbert_flax.encode_file: shards written")
        if process_index == 0:
            shards = [(embeddings_file.shard_path(output_path, i, process_count), int(r))
                      for i, r in enumerate(rows)]
            manifest = embeddings_file.write_manifest(output_path, shards, out_dim, out_dtype)
            if merge:
                embeddings_file.merge_shards(output_path)
        multihost_utils.sync_global_devices("sbert_flax.encode_file: manifest written")
    return EncodeFileResult(target, stop - start, total, out_dim, out_dtype, manifest)
