"""`ServeSettings`: the server's limits and identity, one frozen dataclass shared by app and CLI."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What `create_app` needs besides the encoder.

    Attributes:
      model_id: what /info reports as the model (the `--model` argument by default).
      served_model_name: the name OpenAI responses carry as `model`. None means `model_id`.
      strict_model_name: refuse (404) an OpenAI request whose `model` is not the served name.
        Off by default, as TEI: it serves one model and ignores the field, and clients such as
        LangChain's OpenAIEmbeddings send their own default name.
      max_batch_tokens: token budget of one device batch (None: the encoder's own budget).
      max_client_batch_size: most inputs one request may carry (more: 422, as TEI).
      max_concurrent_requests: most embedding requests in flight at once (more: 429).
      payload_limit: most bytes in a request body (more: 413). TEI's default, 2 MB.
      api_key: when set, every route but /health and /metrics needs `Authorization: Bearer KEY`.
      auto_truncate: truncate over-long inputs when a request does not say (TEI's `--auto-truncate`;
        else they are refused with 422); the OpenAI routes have no `truncate` field and always
        follow this.
      warmup: compile every shape and run a test batch before /health turns 200.
      version: reported by /info.
      request_timeout: seconds from a request's arrival to its answer (body read, queue,
        compute). A body that has not arrived by then gets 408, anything else 503; its queued
        inputs are dropped. A device call running 3 timeouts counts as a stuck device (the
        worker is declared dead).
      tokenization_workers: threads that tokenize (None: min(4, CPU cores)).
      max_consecutive_failures: worker rounds failing in a row after which the worker gives up:
        /health turns 503 and the serve command exits (code 70) for its supervisor to restart it.
      max_batch_wait: most seconds the worker, with the device idle, holds a batch below the
        token budget for requests still being tokenized, so that concurrent requests share one
        device batch; a lone request is never held (0: never wait).
    """

    model_id: str = "model"
    served_model_name: str | None = None
    strict_model_name: bool = False
    max_batch_tokens: int | None = None
    max_client_batch_size: int = 256
    max_concurrent_requests: int = 512
    payload_limit: int = 2_000_000
    api_key: str | None = None
    auto_truncate: bool = False
    warmup: bool = True
    version: str = ""
    request_timeout: float = 60.0
    tokenization_workers: int | None = None
    max_consecutive_failures: int = 5
    max_batch_wait: float = 0.002

    def __post_init__(self):
        for name in ("max_client_batch_size", "max_concurrent_requests", "payload_limit",
                     "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.request_timeout > 0:  # also refuses NaN
            raise ValueError(f"request_timeout={self.request_timeout} must be > 0 seconds")
        if self.tokenization_workers is not None and self.tokenization_workers < 1:
            raise ValueError(f"tokenization_workers={self.tokenization_workers} must be >= 1")
        if not 0 <= self.max_batch_wait <= 1:  # also refuses NaN
            raise ValueError(f"max_batch_wait={self.max_batch_wait} must be in [0, 1] seconds")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} must be >= 1")

    @property
    def tokenizer_threads(self) -> int:
        """`tokenization_workers`, or min(4, CPU cores) (TEI's default is the core count)."""
        return self.tokenization_workers or min(4, os.cpu_count() or 1)

    @property
    def model_name(self) -> str:
        """The name responses carry and OpenAI requests must match."""
        return self.served_model_name or self.model_id
