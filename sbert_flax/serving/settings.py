"""`ServeSettings`: the server's limits and identity, one frozen dataclass shared by app and CLI."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What `create_app` needs besides the encoder.

    Attributes:
      model_id: what /info reports as the model (the `--model` argument by default).
      served_model_name: the name OpenAI clients pass as `model`; requests naming another model get
        404. None means `model_id`.
      max_batch_tokens: token budget of one device batch (None: the encoder's own budget).
      max_client_batch_size: most inputs one request may carry (more: 413).
      max_concurrent_requests: most embedding requests in flight at once (more: 429).
      payload_limit: most bytes in a request body (more: 413). TEI's default, 2 MB.
      api_key: when set, every route but /health and /metrics needs `Authorization: Bearer KEY`.
      auto_truncate: truncate over-long inputs when a request does not say (TEI's `--auto-truncate`);
        the OpenAI routes have no `truncate` field and always follow this.
      warmup: compile every shape and run a test batch before /health turns 200.
      version: reported by /info.
    """

    model_id: str = "model"
    served_model_name: str | None = None
    max_batch_tokens: int | None = None
    max_client_batch_size: int = 256
    max_concurrent_requests: int = 512
    payload_limit: int = 2_000_000
    api_key: str | None = None
    auto_truncate: bool = False
    warmup: bool = True
    version: str = ""

    def __post_init__(self):
        for name in ("max_client_batch_size", "max_concurrent_requests", "payload_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} must be >= 1")

    @property
    def model_name(self) -> str:
        """The name responses carry and OpenAI requests must match."""
        return self.served_model_name or self.model_id
