"""Rows of an embeddings file (one `.npy`, or the shards + manifest of a multi-process encode),
read in blocks or by id without loading the file.

Blocks are read with plain file reads, not through a memory map: pages a map touches count in
the process's resident memory until it is unmapped, so streaming a corpus larger than RAM
through one would look (and, under a memory limit, act) like loading it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from sbert_flax.inference.embeddings_file import _checked_shards, _resolve


@dataclasses.dataclass(frozen=True)
class _Part:
    """One `.npy` of the rows [start, start + rows)."""

    path: str
    start: int
    rows: int
    offset: int  # byte offset of the first row in the file


def _read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a `.npy`, naming the file on any problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    if fortran:
        raise ValueError(f"{path}: a Fortran-ordered array; save it C-ordered (np.save of "
                         "np.ascontiguousarray)")
    return shape, dtype, offset


class EmbeddingRows:
    """The rows of `sbert-flax encode --output P`: `P` (a `.npy`) or `P.manifest.json`.

    Attributes:
      path: what was given.
      files: the `.npy` files read, in row order.
      count, dim, dtype: rows, columns and the stored dtype.
    """

    def __init__(self, path: str):
        self.path = path
        plain, mpath = _resolve(path)
        if plain is not None:
            listed = [(plain, None)]
        else:
            _, shards = _checked_shards(mpath)  # every shard present, contiguous, one shape
            listed = list(shards)
        parts, start, dim, dtype = [], 0, None, None
        for file, _rows in listed:
            shape, dt, offset = _read_npy_header(file)
            if len(shape) != 2:
                raise ValueError(f"{file}: embeddings must be 2-D [rows, dim], got shape {shape}")
            if not np.issubdtype(dt, np.floating):
                raise ValueError(
                    f"{file}: holds {dt.name} embeddings (quantized by `encode --precision`?); "
                    "an index is built from float embeddings: encode with --precision float32 "
                    "and choose the index's own --precision")
            need = offset + shape[0] * shape[1] * dt.itemsize
            if os.path.getsize(file) < need:
                raise ValueError(f"{file}: truncated ({os.path.getsize(file)} bytes, the header "
                                 f"says {shape} {dt.name} = {need} bytes)")
            if dim is not None and (shape[1], dt) != (dim, dtype):
                raise ValueError(f"{file}: {dt.name} with dim {shape[1]}, but the first shard "
                                 f"is {dtype.name} with dim {dim}")
            dim, dtype = shape[1], dt
            parts.append(_Part(file, start, shape[0], offset))
            start += shape[0]
        self.parts: tuple[_Part, ...] = tuple(parts)
        self.files = tuple(p.path for p in parts)
        self.count, self.dim, self.dtype = start, int(dim or 0), dtype or np.dtype(np.float32)

    def _row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [<= rows, dim]) blocks in order; a block never spans two files."""
        if rows < 1:
            raise ValueError(f"rows={rows} must be >= 1")
        for p in self.parts:
            with open(p.path, "rb") as f:
                f.seek(p.offset)
                for s in range(0, p.rows, rows):
                    k = min(rows, p.rows - s)
                    block = np.fromfile(f, dtype=self.dtype, count=k * self.dim)
                    if block.size != k * self.dim:  # shrank since the header was checked
                        raise ValueError(f"{p.path}: ended at row {s + block.size // self.dim} "
                                         f"of {p.rows}")
                    yield p.start + s, block.reshape(k, self.dim).astype(np.float32, copy=False)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), dim]: the rows `ids` (any order, repeats allowed), read one by one."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"row ids must be in [0, {self.count}); got {ids.min()}..{ids.max()}")
        out = np.empty((ids.size, self.dim), np.float32)
        starts = np.asarray([p.start for p in self.parts], np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        nbytes = self._row_bytes()
        for j in np.unique(which):
            p = self.parts[j]
            fd = os.open(p.path, os.O_RDONLY)
            try:
                for r in np.flatnonzero(which == j):
                    raw = os.pread(fd, nbytes, p.offset + (int(ids[r]) - p.start) * nbytes)
                    out[r] = np.frombuffer(raw, self.dtype)
            finally:
                os.close(fd)
        return out

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """float32 [min(n, count), dim]: rows drawn without replacement, in row order."""
        n = min(n, self.count)
        ids = np.sort(np.random.default_rng(seed).choice(self.count, n, replace=False))
        return self.take(ids)
