"""Training files read lazily: one validating pass builds a line-offset index, records are then
read by offset on demand.

A training file may be larger than RAM. `open_source` streams it once, checks every line (field
count, UTF-8, label / score syntax) and keeps only what batching needs for each good line: its
byte offset and length, its label or score, and (for no-duplicates batching) a 64-bit hash of
each text. Texts stay on disk; `TextSource[i]` reads record i with one `os.pread`, so any number
of threads may read at once.

Formats: TSV and CSV (one record per line; a CSV field may be quoted but not span lines) and
JSONL (one JSON object per line). Columns are found by name in the header (or the JSON keys),
named positionally for a header-less file (`columns=("sentence1", "sentence2", "score")`), or
given as field indices of the schema's columns in order (`columns=(1, 2, 3)`, UER's style).
"""

from __future__ import annotations

import array
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from sbert_flax.common.files import UTF8_BOM, BadLine, decode_line

FORMATS = ("tsv", "csv", "jsonl")
# How many bad lines an error spells out; the rest are counted.
MAX_REPORTED = 5
_INT_RE = re.compile(r"\s*\+?[0-9]+\s*")
_NEG_RE = re.compile(r"\s*-[0-9]+\s*")
_MAX_LABEL = np.iinfo(np.int32).max - 1  # labels are int32 and num_labels = max + 1 must fit
# \r\n, \n and a lone \r end a line, as in Python's text mode (what UER-py reads with).
_EOL = re.compile(rb"\r\n|\r|\n")
_CHUNK = 1 << 20


def skipped_summary(path: str, skipped_lines: Sequence[int], kept: int,
                    first: int = MAX_REPORTED) -> str:
    """One log line about skipped malformed lines ("" when none were skipped)."""
    if not skipped_lines:
        return ""
    shown = ", ".join(map(str, skipped_lines[:first]))
    more = ", ..." if len(skipped_lines) > first else ""
    return (f"{path}: skipped {len(skipped_lines)} malformed line(s), first: {shown}{more}; "
            f"kept {kept}")


class DataError(ValueError):
    """A data file cannot be used as given; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Schema:
    """The columns a loss reads.

    Attributes:
      texts: required text columns, in batch order.
      optional: text columns used when the file has them (mnrl's hard "negative").
      numbered: optional columns that may instead come numbered, `name_1 .. name_n` (the n-tuples
        `sbert-flax mine-negatives` writes, sentence-transformers' n-tuple columns).
      target: "label" (integer class id), "score" (float) or None.
    """

    texts: tuple[str, ...]
    optional: tuple[str, ...] = ()
    target: str | None = None
    numbered: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.target not in (None, "label", "score"):
            raise ValueError(f"target={self.target!r}; expected 'label', 'score' or None")


def detect_format(path: str, data_format: str = "auto") -> str:
    """"tsv" | "csv" | "jsonl" from `data_format`, or from the extension when "auto"."""
    if data_format != "auto":
        if data_format not in FORMATS:
            raise DataError(f"data format {data_format!r}; expected auto | {' | '.join(FORMATS)}")
        return data_format
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(ext, "tsv")


def scan_lines(f) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its end-of-line) for each line of a binary file, streaming.

    A final line end does not start an empty line; a lone \\r splits lines like \\n.
    """
    pos = 0  # file offset of buf[0]
    buf = b""
    while True:
        chunk = f.read(_CHUNK)
        buf += chunk
        start = 0
        for m in _EOL.finditer(buf):
            if chunk and m.group() == b"\r" and m.end() == len(buf):
                break  # maybe the first half of a \r\n split across chunks
            yield pos + start, buf[start: m.start()]
            start = m.end()
        buf = buf[start:]
        pos += start
        if not chunk:
            break
    if buf:
        yield pos, buf


def stable_hash(text: str) -> int:
    """A 64-bit hash of a text that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little",
                          signed=True)


def _numbered(base: str, names: Sequence[str], have: Sequence[str]) -> list[str]:
    """`base_1, base_2, ...` as far as `names` has them, unless `base` itself is there."""
    if base in have:
        return []
    found: list[str] = []
    while f"{base}_{len(found) + 1}" in names:
        found.append(f"{base}_{len(found) + 1}")
    return found


class _Parser:
    """Splits one decoded line into {column: raw value} for the columns of a schema."""

    def __init__(self, path: str, fmt: str, schema: Schema, header: list[str] | None,
                 columns: Sequence[str | int] | None):
        self.path, self.fmt, self.schema = path, fmt, schema
        wanted = (*schema.texts, *schema.optional, *((schema.target,) if schema.target else ()))
        self.index: dict[str, int] = {}
        self.num_fields: int | None = None
        if fmt == "jsonl":
            if columns is not None and not all(isinstance(c, str) for c in columns):
                raise DataError(f"{path}: JSONL records are read by key; columns must be names")
            self.keys = {w: w for w in wanted}
            self.present = self._present_jsonl(header)
            return
        if columns is not None and all(isinstance(c, int) for c in columns):
            # UER's index form: field indices of the schema's columns, in order.
            names = (*schema.texts, *schema.optional[: max(0, len(columns) - len(schema.texts)
                                                           - (1 if schema.target else 0))],
                     *((schema.target,) if schema.target else ()))
            if len(columns) != len(names):
                raise DataError(f"{path}: {len(columns)} column indices for {len(names)} columns "
                                f"{list(names)}")
            if min(columns) < 0:
                raise DataError(f"{path}: negative column index in {list(columns)}")
            self.index = dict(zip(names, columns, strict=True))
            self.num_fields = len(header) if header is not None else max(columns) + 1
            if max(columns) >= self.num_fields:
                raise DataError(f"{path}: columns {tuple(columns)} out of range for "
                                f"{self.num_fields} fields per line")
        else:
            named = list(columns) if columns is not None else header
            if named is None:
                raise DataError(f"{path}: a file without a header needs columns= (names of its "
                                f"fields in order, e.g. {','.join(wanted)}, or their indices)")
            if not all(isinstance(c, str) for c in named):
                raise DataError(f"{path}: columns mixes names and indices: {list(named)}")
            names = [n.strip() for n in named]
            for n in set(names):
                if names.count(n) > 1 and n in wanted:
                    raise DataError(f"{path}:1: column {n!r} named twice ({names})")
            self.index = {w: names.index(w) for w in wanted if w in names}
            for base in schema.numbered:
                self.index.update((c, names.index(c)) for c in _numbered(base, names, self.index))
            self.num_fields = len(names)
            missing = [w for w in (*schema.texts, *((schema.target,) if schema.target else ()))
                       if w not in self.index]
            if missing:
                where = "header" if columns is None else "columns"
                raise DataError(
                    f"{path}:1: {where} has no {', '.join(repr(m) for m in missing)} column (found "
                    f"{names}); this loss reads {', '.join(wanted)}. Rename the header, or for a "
                    "file without one pass has_header=False and columns= (--no_header --columns)")
        self.present = [*(c for c in (*schema.texts, *schema.optional) if c in self.index),
                        *(c for c in self.index if c not in wanted)]  # numbered, in order

    def _present_jsonl(self, first: list[str] | None) -> list[str]:
        # Optional JSONL text columns are used iff the first record has them.
        opt = [c for c in self.schema.optional if first is not None and c in first]
        for base in self.schema.numbered:
            opt += _numbered(base, first or [], opt)
        return [*self.schema.texts, *opt]

    def fields(self, line: str) -> dict[str, Any] | str:
        """{column: value} or a reason string for a malformed line."""
        if self.fmt == "jsonl":
            if not line.strip():
                return "empty line"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"not valid JSON ({e.msg})"
            if not isinstance(obj, dict):
                return f"expected a JSON object, got {type(obj).__name__}"
            out = {}
            for c in (*self.present, *((self.schema.target,) if self.schema.target else ())):
                if c not in obj:
                    return f"no {c!r} key"
                v = obj[c]
                if c != self.schema.target and not isinstance(v, str):
                    return f"{c!r} is {type(v).__name__}, expected a string"
                out[c] = v
            return out
        if self.fmt == "csv":
            try:
                parts = next(csv.reader([line]), [])
            except csv.Error as e:
                return f"not valid CSV ({e})"
            sep = "comma-separated"
        else:
            parts = line.split("\t")
            sep = "tab-separated"
        if len(parts) != self.num_fields:
            if line.strip() == "":
                return "empty line"
            return f"expected {self.num_fields} {sep} fields, got {len(parts)}"
        return {c: parts[i] for c, i in self.index.items()}


def _parse_label(raw: Any, label_names: Mapping[str, int] | None, num_labels: int | None
                 ) -> int | str:
    if label_names is not None:
        label = label_names.get(str(raw).strip())
        if label is None:
            return f"unknown label {raw!r} (known: {sorted(label_names)})"
    elif isinstance(raw, bool):
        return f"label {raw!r} is not an integer"
    elif isinstance(raw, int):
        label = raw
        if label < 0:
            return f"negative label {label}"
    elif isinstance(raw, str) and _INT_RE.fullmatch(raw):
        label = int(raw)
    elif isinstance(raw, str) and _NEG_RE.fullmatch(raw):
        return f"negative label {raw.strip()}"
    else:
        return f"label {raw!r} is not an integer"
    if label > _MAX_LABEL:
        return f"label {label} is too large for a class id"
    if num_labels is not None and label >= num_labels:
        return f"label {label} >= num_labels {num_labels}"
    return label


def _parse_score(raw: Any) -> float | str:
    if isinstance(raw, bool):
        return f"score {raw!r} is not a number"
    try:
        score = float(raw)
    except (TypeError, ValueError):
        return f"score {raw!r} is not a number"
    if not math.isfinite(score):
        return f"score {raw!r} is not finite"
    return score


@dataclasses.dataclass(frozen=True)
class Record:
    """One example: its texts by column name and its target (label or score, or None)."""

    texts: dict[str, str]
    target: int | float | None


class TextSource:
    """Random access to the good records of one file, read by byte offset (grain's
    RandomAccessDataSource protocol: `len` and `[i]`).

    Build it with `open_source`. Attributes: `path`, `format`, `columns` (text columns present,
    in batch order), `schema`, `targets` (int32 labels / float32 scores / None), `num_labels`,
    `skipped_lines` (1-based line numbers of skipped malformed lines), `text_hashes` (int64
    [N, len(columns)] or None).
    """

    def __init__(self, path: str, fmt: str, parser: _Parser, starts: np.ndarray,
                 lengths: np.ndarray, targets: np.ndarray | None, num_labels: int | None,
                 skipped_lines: tuple[int, ...], text_hashes: np.ndarray | None):
        self.path, self.format, self._parser = path, fmt, parser
        self.schema = parser.schema
        self.columns = tuple(parser.present)
        self._starts, self._lengths = starts, lengths
        self.targets, self.num_labels = targets, num_labels
        self.skipped_lines = skipped_lines
        self.text_hashes = text_hashes
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> Record:
        return Record(self.read_texts(int(i)), None if self.targets is None else self.targets[i].item())

    def __repr__(self) -> str:
        return f"TextSource({self.path!r}, {self.format}, {len(self)} records, columns={self.columns})"

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read_texts(self, i: int) -> dict[str, str]:
        """The text columns of record i, read from disk."""
        raw = os.pread(self._file(), int(self._lengths[i]), int(self._starts[i]))
        fields = self._parser.fields(raw.decode("utf-8"))
        if isinstance(fields, str):  # the file changed since it was indexed
            raise DataError(f"{self.path}: record {i} no longer parses ({fields}); was the file "
                            "modified during training?")
        return {c: fields[c] for c in self.columns}

    def texts(self, indices: Sequence[int]) -> dict[str, list[str]]:
        """Columns of several records: {column: [text of each index]}."""
        out: dict[str, list[str]] = {c: [] for c in self.columns}
        for i in indices:
            for c, t in self.read_texts(int(i)).items():
                out[c].append(t)
        return out

    def skipped_summary(self, first: int = MAX_REPORTED) -> str:
        """One log line about skipped malformed lines ("" when none were skipped)."""
        return skipped_summary(self.path, self.skipped_lines, len(self), first)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}


def open_source(path: str, schema: Schema, *, data_format: str = "auto", has_header: bool = True,
                columns: Sequence[str | int] | None = None, skip_bad_lines: bool = False,
                label_names: Mapping[str, int] | None = None, num_labels: int | None = None,
                score_scale: float = 1.0, hash_texts: bool = False) -> TextSource:
    """Indexes a training file in one streaming pass, validating every line.

    Args:
      path: the file.
      schema: the columns to read.
      data_format: "auto" (by extension: .csv, .jsonl/.json, else TSV) | "tsv" | "csv" | "jsonl".
      has_header: the first line names the columns (TSV/CSV; ignored for JSONL).
      columns: names of the fields in order (a header-less file, or to override a header), or
        field indices of the schema's columns in order (texts, optional texts, target).
      skip_bad_lines: skip malformed lines (recorded in `skipped_lines`) instead of raising.
      label_names: label strings -> ids (e.g. NLI names), instead of integer labels.
      num_labels: classes; labels >= it are malformed. Default max label + 1.
      score_scale: scores are divided by it (e.g. 5 for STS-B's 0..5 scale).
      hash_texts: record a 64-bit hash of each text (for no-duplicates batching).

    Raises:
      DataError: unreadable file, bad header / columns, no examples, or malformed lines without
        skip_bad_lines; the message lists the first few as `path:line: reason` and the count.
    """
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if num_labels is not None and num_labels < 1:
        raise DataError(f"{path}: num_labels must be >= 1, got {num_labels}")
    if score_scale <= 0 or not math.isfinite(score_scale):
        raise DataError(f"score_scale must be a positive number, got {score_scale}")
    fmt = detect_format(path, data_format)
    starts, lengths = array.array("q"), array.array("q")
    labels, scores, hashes = array.array("i"), array.array("d"), array.array("q")
    bad: list[tuple[int, str]] = []
    parser: _Parser | None = None
    with open(path, "rb") as f:
        lines = scan_lines(f)
        lineno = 0
        for offset, raw in lines:
            lineno += 1
            if lineno == 1 and raw.startswith(UTF8_BOM):
                raw, offset = raw[len(UTF8_BOM):], offset + len(UTF8_BOM)
            try:
                line = decode_line(raw, path, lineno)
            except BadLine as e:
                if parser is None and (has_header and fmt != "jsonl"):
                    raise DataError(str(e)) from None
                bad.append((lineno, e.what))
                continue
            if parser is None:
                parser = _first_line(path, fmt, schema, line, has_header, columns)
                if has_header and fmt != "jsonl":
                    continue
            fields = parser.fields(line)
            if isinstance(fields, str):
                bad.append((lineno, fields))
                continue
            if schema.target == "label":
                label = _parse_label(fields[schema.target], label_names, num_labels)
                if isinstance(label, str):
                    bad.append((lineno, label))
                    continue
                labels.append(label)
            elif schema.target == "score":
                score = _parse_score(fields[schema.target])
                if isinstance(score, str):
                    bad.append((lineno, score))
                    continue
                scores.append(score / score_scale)
            if hash_texts:
                hashes.extend(stable_hash(fields[c]) for c in parser.present)
            starts.append(offset)
            lengths.append(len(raw))
    if parser is None:
        what = "a header line naming the columns" if has_header and fmt != "jsonl" else "records"
        raise DataError(f"{path}: empty file, expected {what}")
    if bad and not skip_bad_lines:
        shown = "; ".join(f"{path}:{n}: {why}" for n, why in bad[:MAX_REPORTED])
        more = f" (first {MAX_REPORTED} shown)" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{path}: {len(bad)} malformed line(s){more}: {shown}. Fix the file, or "
                        "skip them with skip_bad_lines=True (--skip_bad_lines)")
    if not starts:
        raise DataError(f"{path}: no examples" + (f" ({len(bad)} malformed lines skipped)" if bad else ""))
    targets: np.ndarray | None = None
    if schema.target == "label":
        targets = np.frombuffer(labels, np.int32).copy()
        if num_labels is None:
            num_labels = (max(label_names.values()) if label_names else int(targets.max())) + 1
    elif schema.target == "score":
        targets = np.frombuffer(scores, np.float64).astype(np.float32)
    text_hashes = (np.frombuffer(hashes, np.int64).reshape(len(starts), len(parser.present)).copy()
                   if hash_texts else None)
    return TextSource(path, fmt, parser, np.frombuffer(starts, np.int64).copy(),
                      np.frombuffer(lengths, np.int64).copy(), targets,
                      num_labels if schema.target == "label" else None,
                      tuple(n for n, _ in bad), text_hashes)


def _first_line(path: str, fmt: str, schema: Schema, line: str, has_header: bool,
                columns: Sequence[str | int] | None) -> _Parser:
    if fmt == "jsonl":
        try:
            first = json.loads(line)
        except json.JSONDecodeError:
            first = None
        return _Parser(path, fmt, schema, list(first) if isinstance(first, dict) else None, columns)
    if not has_header:
        return _Parser(path, fmt, schema, None, columns)
    header = next(csv.reader([line]), []) if fmt == "csv" else line.split("\t")
    return _Parser(path, fmt, schema, header, columns)


def parse_columns(spec: str | Sequence[str | int] | None) -> tuple[str | int, ...] | None:
    """`--columns`: "1,2,3" -> (1, 2, 3) (field indices); "sentence1,sentence2,score" -> names."""
    if spec is None or spec == "" or spec == ():
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str | int] = []
    for x in items:
        if isinstance(x, int) or (isinstance(x, str) and x.strip().lstrip("-").isdigit()):
            out.append(int(x))
        else:
            out.append(str(x).strip())
    if any(isinstance(x, int) for x in out) and not all(isinstance(x, int) for x in out):
        raise DataError(f"--columns {spec!r}: give either all names or all field indices")
    return tuple(out)
