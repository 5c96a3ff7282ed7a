"""Embeddings files: one `.npy`, or the shards of a multi-process encode plus a JSON manifest.

Embeddings-file format (version 1). For an output path `P` and N processes, process i writes
`shard_path(P, i, N)` = `f"{P}.shard-{i:05d}-of-{N:05d}.npy"` (a standard 2-D `.npy`), and
process 0 writes `manifest_path(P)` = `f"{P}.manifest.json"`::

    {"format": "sbert-flax-embeddings", "version": 1, "rows": total, "dim": D,
     "dtype": "float32", "shards": [{"path": "<shard, relative to the manifest's folder>",
                                     "start": s, "rows": n}, ...]}

`merge_shards(P)` turns that into a single `P`, then deletes the shards and the manifest; `P`
always takes precedence over a manifest beside it, so a merge interrupted at any point leaves a
readable result."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sbert_flax.common.arraylike import to_numpy
from sbert_flax.common.files import atomic_path, read_json, write_json

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "sbert-flax-embeddings"
MANIFEST_VERSION = 1



def shard_path(path: str, index: int, count: int) -> str:
    """Where process `index` of `count` writes its rows for output `path`."""
    return f"{path}.shard-{index:05d}-of-{count:05d}.npy"


def manifest_path(path: str) -> str:
    """The manifest that process 0 writes for output `path`."""
    return f"{path}.manifest.json"


def save_embeddings(path: str, embeddings: Any) -> str:
    """Writes a 2-D array as a `.npy` atomically (temp name + rename; mode 0666 & ~umask).

    Returns:
      `path`.
    """
    arr = to_numpy(embeddings)
    if arr.ndim != 2:
        raise ValueError(f"{path}: embeddings must be 2-D [rows, dim], got shape {arr.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)  # a file object: numpy appends no ".npy" to the temp name
    return path


def write_manifest(path: str, shards: Sequence[tuple[str, int]], dim: int,
                   dtype: str = "float32") -> str:
    """Writes `manifest_path(path)` atomically for shards listed in input order.

    Args:
      path: the output path `P` the shards belong to.
      shards: (shard file path, rows) per process, in input order; stored relative to the
        manifest's folder.
      dim: embedding dimension.
      dtype: numpy dtype name of every shard.

    Returns:
      The manifest's path.

    A file at `path` itself (from an earlier run) is removed first: `load_embeddings` prefers
    `path` over the manifest, so a stale one would shadow the new shards.
    """
    mpath = manifest_path(path)
    folder = os.path.dirname(os.path.abspath(mpath))
    entries, start = [], 0
    for shard, rows in shards:
        if rows < 0:
            raise ValueError(f"{shard}: rows={rows} must be >= 0")
        entries.append({"path": os.path.relpath(os.path.abspath(shard), folder),
                        "start": start, "rows": int(rows)})
        start += int(rows)
    if os.path.isfile(path):
        os.remove(path)
    write_json(mpath, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "rows": start,
                       "dim": int(dim), "dtype": str(np.dtype(dtype)), "shards": entries})
    return mpath


def _open_npy(path: str, mmap: bool) -> np.ndarray:
    """np.load, naming the file on failure."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None


def _checked_shards(mpath: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Reads a manifest and checks every shard; returns it and [(absolute shard path, rows)]."""
    m = read_json(mpath)
    if m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{mpath}: not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest "
                         f"(format={m.get('format')!r}, version={m.get('version')!r})")
    try:
        total, dim, dtype = int(m["rows"]), int(m["dim"]), np.dtype(m["dtype"])
        entries = [(str(e["path"]), int(e["start"]), int(e["rows"])) for e in m["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    folder = os.path.dirname(os.path.abspath(mpath))
    out, expect = [], 0
    for rel, start, rows in entries:
        shard = os.path.join(folder, rel)
        if start != expect:
            raise ValueError(f"{mpath}: shard {rel} starts at row {start}, expected {expect} "
                             "(shards must be contiguous, in input order)")
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{shard}: shard listed in {mpath} is missing; re-run the "
                                    "encode (every process must finish)")
        a = _open_npy(shard, mmap=True)
        if a.ndim != 2 or a.shape[0] != rows or a.shape[1] != dim or a.dtype != dtype:
            raise ValueError(f"{shard}: holds {a.dtype} {a.shape}, but {mpath} says "
                             f"{dtype} ({rows}, {dim}); the shard is stale or truncated")
        out.append((shard, rows))
        expect += rows
    if expect != total:
        raise ValueError(f"{mpath}: shards hold {expect} rows, manifest says {total}")
    return m, out


def _resolve(path: str) -> tuple[str | None, str | None]:
    """(plain .npy path, manifest path): exactly one is set; `path` wins over its manifest."""
    if path.endswith(".manifest.json"):
        return None, path
    if os.path.exists(path):
        return path, None
    if os.path.exists(manifest_path(path)):
        return None, manifest_path(path)
    raise FileNotFoundError(f"embeddings not found: neither {path} nor {manifest_path(path)} "
                            "exists")


def load_embeddings(path: str, mmap: bool = True) -> np.ndarray:
    """Reads embeddings written by `encode --output`: a `.npy`, or shards + manifest.

    Args:
      path: the output path `P` (the plain file if present, else `P.manifest.json`), or the
        manifest's path itself.
      mmap: memory-map instead of reading into memory (a plain file or a single shard; several
        shards are concatenated into memory).

    Returns:
      [rows, dim] in input order.

    Raises:
      FileNotFoundError: nothing at `path`, or a listed shard is missing (names it).
      ValueError: a corrupt file, or a shard that disagrees with the manifest (names it).
    """
    plain, mpath = _resolve(path)
    if plain is not None:
        return _open_npy(plain, mmap)
    m, shards = _checked_shards(mpath)
    if len(shards) == 1:
        return _open_npy(shards[0][0], mmap)
    if not shards:
        return np.zeros((0, int(m["dim"])), np.dtype(m["dtype"]))
    return np.concatenate([_open_npy(s, mmap=True) for s, _ in shards])


def merge_shards(path: str, keep_shards: bool = False, block_rows: int = 65536) -> str:
    """Merges the shards of `path` (after every process finished) into one `.npy` at `path`.

    Streams the shards in order through `numpy.lib.format.open_memmap` into a temp file that is
    renamed to `path` once complete, so memory stays O(block_rows * dim). Only then are the
    shard files and, last, the manifest deleted (unless `keep_shards`): a crash at any point
    leaves either the shards + manifest or the merged `path` readable by `load_embeddings`.

    Returns:
      `path`.
    """
    mpath = manifest_path(path)
    m, shards = _checked_shards(mpath)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(m["dtype"]),
                                        shape=(int(m["rows"]), int(m["dim"])))
        row = 0
        for shard, rows in shards:
            src = _open_npy(shard, mmap=True)
            for s in range(0, rows, block_rows):
                part = np.asarray(src[s:s + block_rows])
                out[row:row + len(part)] = part
                row += len(part)
            del src
        out.flush()
        del out
    if not keep_shards:
        for shard, _ in shards:
            os.remove(shard)
        os.remove(mpath)
    return path

