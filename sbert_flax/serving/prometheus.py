"""Prometheus metrics exactly as text-embeddings-inference (TEI) exports them, so that the
dashboards and alerts built for TEI read this server unchanged.

TEI records with the Rust `metrics` crate and renders with `metrics-exporter-prometheus`
(router/src/prometheus.rs): a counter keeps its bare name (`te_request_count`, no `_total`), there
are no `_created` series and no `# HELP` lines, and every histogram has explicit buckets (any name
ending in `duration`: 35 buckets from 1.5e-5 s, each 1.5 times the last; `te_batch_next_size`:
1 .. 4096; `te_batch_next_tokens`: 1 .. 2^20; `te_request_input_length`: powers of two up to the
maximum input length). prometheus_client cannot write a counter without `_total` in its TYPE line,
so this module keeps its own small metric objects and renders the text format itself.

Names, types and labels, from TEI's `counter!` / `histogram!` / `gauge!` calls
(router/src/http/server.rs, router/src/lib.rs `ResponseMetadata::record_metrics`,
core/src/infer.rs, core/src/queue.rs, core/src/tokenization.rs):

- `te_request_count{method}`, `te_request_success{method}` (counters; method "single" when
  `inputs` is one input, else "batch"), `te_request_failure{err}` (counter; err "validation",
  "batch_size", "tokenization", "overloaded", "model_type", "inference", "dropped"; this server
  adds "unhealthy", "payload_too_large", "unauthorized", "timeout", "client_disconnected", ... for
  refusals TEI has no name for).
- `te_request_duration`, `te_request_tokenization_duration`, `te_request_queue_duration`,
  `te_request_inference_duration` (histograms, per successful request).
- `te_embed_count`, `te_embed_success` (counters, per input) and `te_embed_duration`,
  `te_embed_tokenization_duration`, `te_embed_queue_duration`, `te_embed_inference_duration`
  (histograms; TEI observes them per input, this server per request, with the request's times).
- `te_request_input_length` (histogram, tokens per input), `te_batch_next_size`,
  `te_batch_next_tokens` (histograms, per device batch), `te_queue_size` (gauge).

sbert-flax's own, beside TEI's: `te_request_input_count` (inputs per request),
`te_batch_inference_duration` (device time per batch), `te_compile_count`,
`te_requests_receiving` (requests whose body is still arriving: they hold no slot yet),
`te_requests_in_flight`, `te_ready` (gauges).

Each app has its own `ServeMetrics`: two apps in one process never share a series.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _geometric(start: float, factor: float, n: int) -> tuple[float, ...]:
    # Computed as TEI computes them (value *= factor, then push), so the bounds are the same floats.
    out, value = [], start
    for _ in range(n):
        value *= factor
        out.append(value)
    return tuple(out)


DURATION_BUCKETS = _geometric(0.00001, 1.5, 35)  # seconds, 1.5e-5 .. ~22,000
BATCH_SIZE_BUCKETS = tuple(float(2 ** i) for i in range(13))  # 1 .. 4096 inputs
BATCH_TOKENS_BUCKETS = tuple(float(2 ** i) for i in range(21))  # 1 .. 2^20 tokens


def input_length_buckets(max_input_length: int) -> tuple[float, ...]:
    """TEI's `te_request_input_length` buckets: 2^0 .. 2^19, those <= the maximum input length."""
    return tuple(float(2 ** i) for i in range(20) if 2 ** i <= max_input_length)


def _number(x: float) -> str:
    """A value as Rust's `Display` writes an f64: shortest round trip, never an exponent."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return np.format_float_positional(x, trim="-")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Family:
    """A named metric with zero or more label names; one child per label-value tuple."""

    kind = ""

    def __init__(self, name: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], _Family] = {}

    def labels(self, *values: str):
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._child()
        return child

    def _child(self):
        raise NotImplementedError

    def _series(self) -> list[tuple[tuple[tuple[str, str], ...], _Family]]:
        if not self.labelnames:
            return [((), self)]
        with self._lock:
            items = sorted(self._children.items())
        return [(tuple(zip(self.labelnames, key, strict=True)), child) for key, child in items]

    def render(self) -> str:
        lines = [f"# TYPE {self.name} {self.kind}"]
        for pairs, child in self._series():
            lines.extend(child._lines(self.name, pairs))
        return "\n".join(lines) + "\n"

    def _lines(self, name: str, pairs) -> list[str]:
        raise NotImplementedError


class Counter(_Family):
    """A monotonically increasing count, rendered under its bare name (TEI has no `_total`)."""

    kind = "counter"

    def __init__(self, name: str, labelnames: Sequence[str] = ()):
        super().__init__(name, labelnames)
        self.value = 0

    def _child(self):
        return Counter(self.name)

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up, got inc({amount})")
        with self._lock:
            self.value += amount

    def _lines(self, name, pairs):
        return [f"{name}{_labels(pairs)} {_number(self.value)}"]


class Gauge(_Family):
    """A value that goes up and down, or is read from a function at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, labelnames: Sequence[str] = ()):
        super().__init__(name, labelnames)
        self.value = 0.0
        self._fn: Callable[[], float] | None = None

    def _child(self):
        return Gauge(self.name)

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)

    def set_function(self, fn: Callable[[], float]) -> None:
        self._fn = fn

    def get(self) -> float:
        return float(self._fn()) if self._fn is not None else self.value

    def _lines(self, name, pairs):
        return [f"{name}{_labels(pairs)} {_number(self.get())}"]


class Histogram(_Family):
    """Cumulative buckets, `_sum` and `_count`, as metrics-exporter-prometheus writes them.

    `mirror`: histograms that get every observation too (TEI's `te_embed_*_duration` record the
    same times as `te_request_*_duration`).
    """

    kind = "histogram"

    def __init__(self, name: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
                 mirror: Sequence[Histogram] = ()):
        super().__init__(name, labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{name}: buckets must increase strictly, got {self.buckets}")
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0
        self.mirror = tuple(mirror)

    def _child(self):
        return Histogram(self.name, self.buckets)

    def observe(self, value: float, times: int = 1) -> None:
        value = float(value)
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += times
            self.sum += value * times
            self.count += times
        for m in self.mirror:
            m.observe(value, times)

    def _lines(self, name, pairs):
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines, running = [], 0
        for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
            running += c
            lines.append(f"{name}_bucket{_labels((*pairs, ('le', _number(bound))))} {running}")
        lines.append(f"{name}_sum{_labels(pairs)} {_number(total)}")
        lines.append(f"{name}_count{_labels(pairs)} {n}")
        return lines


def failure_label(error_type: str) -> str:
    """The `err` label of `te_request_failure` for an error type of this server's JSON errors."""
    return {"empty": "validation", "backend": "inference", "tokenizer": "tokenization"}.get(
        error_type, error_type)


class ServeMetrics:
    """The server's metrics; `render()` is the text of GET /metrics.

    Args:
      compile_count: read at scrape time (device programs compiled since start).
      queue_size: read at scrape time (inputs waiting for the device).
      max_input_length: the top of `te_request_input_length`'s buckets, as in TEI.
    """

    def __init__(self, compile_count: Callable[[], float], queue_size: Callable[[], float],
                 max_input_length: int = 512):
        d = DURATION_BUCKETS
        # ---- TEI's ----
        self.request_count = Counter("te_request_count", ["method"])
        self.request_success = Counter("te_request_success", ["method"])
        self.request_failure = Counter("te_request_failure", ["err"])
        self.embed_count = Counter("te_embed_count")
        self.embed_success = Counter("te_embed_success")
        self.embed_duration = Histogram("te_embed_duration", d)
        self.embed_tokenization_duration = Histogram("te_embed_tokenization_duration", d)
        self.embed_queue_duration = Histogram("te_embed_queue_duration", d)
        self.embed_inference_duration = Histogram("te_embed_inference_duration", d)
        self.request_duration = Histogram("te_request_duration", d, mirror=[self.embed_duration])
        self.tokenization_duration = Histogram("te_request_tokenization_duration", d,
                                               mirror=[self.embed_tokenization_duration])
        self.queue_duration = Histogram("te_request_queue_duration", d,
                                        mirror=[self.embed_queue_duration])
        self.inference_duration = Histogram("te_request_inference_duration", d,
                                            mirror=[self.embed_inference_duration])
        self.input_length = Histogram("te_request_input_length",
                                      input_length_buckets(max_input_length))
        self.batch_size = Histogram("te_batch_next_size", BATCH_SIZE_BUCKETS)
        self.batch_tokens = Histogram("te_batch_next_tokens", BATCH_TOKENS_BUCKETS)
        self.queue_size = Gauge("te_queue_size")
        self.queue_size.set_function(queue_size)
        # Queued inputs dropped because their client went away: TEI counts those as
        # te_request_failure{err="dropped"} (core/src/queue.rs).
        self.dropped_inputs = self.request_failure.labels("dropped")
        # ---- sbert-flax's own ----
        self.request_inputs = Histogram("te_request_input_count", BATCH_SIZE_BUCKETS)
        self.batch_duration = Histogram("te_batch_inference_duration", d)
        self.compile_count = Gauge("te_compile_count")
        self.compile_count.set_function(compile_count)
        self.receiving = Gauge("te_requests_receiving")
        self.in_flight = Gauge("te_requests_in_flight")
        self.ready = Gauge("te_ready")
        self.families: list[_Family] = [v for v in vars(self).values() if isinstance(v, _Family)
                                        and v is not self.dropped_inputs]

    def tokenized(self, ids: Sequence[Sequence[int]], seconds: float) -> None:
        """One request's inputs were tokenized (TEI: `te_embed_count` per input, then
        `te_request_input_length` per input)."""
        self.tokenization_duration.observe(seconds)
        self.embed_count.inc(len(ids))
        self.request_inputs.observe(len(ids))
        for x in ids:
            self.input_length.observe(len(x))

    def finished(self, shape: tuple[str, int] | None, ok: bool, seconds: float) -> None:
        """A request ended. `shape` is its (method, inputs) for an inference route (None for the
        others and for a body that never parsed, which TEI does not count either)."""
        if shape is None:
            return
        method, n = shape
        self.request_count.labels(method).inc()
        if ok:
            self.request_success.labels(method).inc()
            self.embed_success.inc(n)
            self.request_duration.observe(seconds)

    def failed(self, err: str) -> None:
        """A request was refused or failed; `err` is TEI's label or one of our error types."""
        self.request_failure.labels(failure_label(err)).inc()

    def render(self) -> bytes:
        """The Prometheus text format, one block per metric."""
        return "\n".join(f.render() for f in self.families).encode()
