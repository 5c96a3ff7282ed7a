"""Input files by content, for `--resume`: what a checkpoint records of its training and dev files.

A path says nothing about what is in it: re-mined negatives written over the training file, or an
edited dev set, keep the path. A fingerprint is the file's size, mtime and sha256, of the whole
file when that is cheap (up to FULL_HASH_BYTES) and of its first and last MiB otherwise.

Two fingerprints of the same size differ in content when their hashes differ. With full hashes,
equal hashes prove the same content, so a copied or touched file (a new mtime) still resumes. With
edge hashes the middle was never read, so a new mtime counts as a change: a file rewritten in place
to the same size (a label flipped mid-file) is caught, at the price of a refusal after a bare
`touch` (which --force overrides).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

# sha256 reads several hundred MB/s: up to this size a full hash costs well under a second, less
# than the validating pass that reads the training file anyway.
FULL_HASH_BYTES = 256 << 20
EDGE_BYTES = 1 << 20
_READ = 1 << 20


def file_fingerprint(path: str) -> dict[str, Any]:
    """{"size", "mtime_ns", "sha256"} (the whole file) or {"size", "mtime_ns", "edges_sha256"}
    (its first and last EDGE_BYTES, for a file over FULL_HASH_BYTES); JSON-able."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            while chunk := f.read(_READ):
                h.update(chunk)
            kind = "sha256"
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(-EDGE_BYTES, os.SEEK_END)
            h.update(f.read(EDGE_BYTES))
            kind = "edges_sha256"
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, kind: h.hexdigest()}


def files_fingerprint(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The fingerprints of `paths`, in order (a BEIR folder's corpus, queries and qrels)."""
    return [file_fingerprint(p) for p in paths]


def change(was: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """How `now`'s content differs from `was`'s, for a message; "" when it is the same (as far as
    the two fingerprints can tell)."""
    if was.get("size") != now.get("size"):
        return f"size {was.get('size')} -> {now.get('size')} bytes"
    for kind in ("sha256", "edges_sha256"):
        if kind in was and kind in now:
            if was[kind] != now[kind]:
                what = "sha256" if kind == "sha256" else "sha256 of the first and last MiB"
                return f"{what} {was[kind][:12]}... -> {now[kind][:12]}..."
            if kind == "sha256":
                return ""  # the whole content compared equal: a new mtime does not matter
    if was.get("mtime_ns") != now.get("mtime_ns"):
        return (f"modified {_when(was.get('mtime_ns'))} -> {_when(now.get('mtime_ns'))}, same "
                "size; too large to hash in full, so its middle cannot be shown unchanged")
    return ""


def files_change(was: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> str:
    """`change` over lists of fingerprints (the first file that differs); "" when all match."""
    if len(was) != len(now):
        return f"{len(was)} files -> {len(now)}"
    for i, (a, b) in enumerate(zip(was, now, strict=True)):
        c = change(a, b)
        if c:
            return c if len(was) == 1 else f"file {i + 1} of {len(was)}: {c}"
    return ""


def _when(mtime_ns: Any) -> str:
    if not isinstance(mtime_ns, int):
        return "?"
    t = datetime.datetime.fromtimestamp(mtime_ns / 1e9, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")
