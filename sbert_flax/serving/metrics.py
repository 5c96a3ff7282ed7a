"""Prometheus metrics, named as text-embeddings-inference names them (`te_*`), so the dashboards
and alerts teams already have for TEI read this server too.

Each app gets its own `CollectorRegistry`: two apps in one process (tests, an application that
embeds two models) never collide on metric names.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from 0.1 ms to ~100 s, doubling.
TIME_BUCKETS = tuple(1e-4 * 2 ** i for i in range(21))
SIZE_BUCKETS = tuple(2 ** i for i in range(15))  # 1 .. 16384 (rows or tokens)
TOKEN_BUCKETS = tuple(2 ** i for i in range(4, 20))  # 16 .. 524288


class ServeMetrics:
    """The server's counters, gauges and histograms on one registry."""

    def __init__(self, compile_count: Callable[[], float], queue_size: Callable[[], float]):
        self.registry = r = CollectorRegistry()
        self.request_count = Counter("te_request_count", "Requests received", ["route"], registry=r)
        self.request_success = Counter("te_request_success", "Requests answered with 2xx",
                                       ["route"], registry=r)
        self.request_failure = Counter("te_request_failure", "Requests answered with an error",
                                       ["route", "err"], registry=r)
        self.request_duration = Histogram("te_request_duration", "Request time, seconds",
                                          ["route"], buckets=TIME_BUCKETS, registry=r)
        self.tokenization_duration = Histogram(
            "te_request_tokenization_duration", "Tokenization time per request, seconds",
            buckets=TIME_BUCKETS, registry=r)
        self.queue_duration = Histogram(
            "te_request_queue_duration", "Time a request's first input waited for the device, seconds",
            buckets=TIME_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "te_request_inference_duration", "Time from a request's first device batch to its last, seconds",
            buckets=TIME_BUCKETS, registry=r)
        self.request_inputs = Histogram("te_request_input_count", "Inputs per request",
                                         buckets=SIZE_BUCKETS, registry=r)
        self.batch_size = Histogram("te_batch_next_size", "Inputs per device batch",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("te_batch_next_tokens", "Real tokens per device batch",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_duration = Histogram("te_batch_inference_duration",
                                        "Device time per batch, seconds",
                                        buckets=TIME_BUCKETS, registry=r)
        self.dropped_inputs = Counter("te_dropped_inputs", "Queued inputs dropped because their "
                                      "client disconnected", registry=r)
        self.queue_size = Gauge("te_queue_size", "Inputs waiting for the device", registry=r)
        self.queue_size.set_function(queue_size)
        self.compile_count = Gauge("te_compile_count", "Device programs compiled since start "
                                   "(constant after warm-up)", registry=r)
        self.compile_count.set_function(compile_count)
        self.in_flight = Gauge("te_requests_in_flight", "Embedding requests being served",
                               registry=r)
        self.ready = Gauge("te_ready", "1 once every shape is compiled and a test batch ran",
                           registry=r)
