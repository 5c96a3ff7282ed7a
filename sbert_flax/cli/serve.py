"""The `sbert-flax serve` subcommand: argparse setup and the uvicorn run.

`sbert_flax.cli.main` calls `add_parser(subparsers)`; the parsed namespace goes to `run(args)`.
`python -m sbert_flax.cli.serve --model ...` runs the same without the main CLI.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import sys
from collections.abc import Sequence

from sbert_flax.checkpoints.hub import DEFAULT_MODEL

log = logging.getLogger(__name__)

# The exit code when the batcher's worker died (its thread ended, or --max-consecutive-failures
# rounds failed in a row): EX_SOFTWARE from sysexits.h, "internal software error". Distinct from
# 0 (stopped by SIGTERM), 1 (a bug at start-up, with its traceback) and 2 (bad flags or model), so
# a supervisor restarts on it and alerts can tell it apart.
EXIT_WORKER_DIED = 70

# Top-level modules of the `serve` extra (pyproject.toml) that the server imports.
SERVE_EXTRA_MODULES = frozenset({"fastapi", "starlette", "uvicorn", "orjson",
                                 "httptools", "uvloop"})


class MissingServeExtra(ImportError):
    """`serve` was run in an install without the serve extra."""


DESCRIPTION = """Serve a sentence-embedding model over HTTP with dynamic batching: TEI routes
(/embed, /similarity, /tokenize, /info, /health, /metrics) and OpenAI routes (/v1/embeddings,
/embeddings). A cross-encoder (a sentence-transformers CrossEncoder or BertForSequenceClassification
folder) serves TEI's /rerank and /predict: alone as --model, or beside the embedder with
--rerank-model. Every device shape is compiled before /health answers 200."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve options, on any parser."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"sbert-flax dir, HF / sentence-transformers dir, or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--rerank-model", default=None, metavar="MODEL",
                   help="a cross-encoder (CrossEncoder / BertForSequenceClassification dir or hub "
                   "id) served beside --model: /rerank and /predict go to it, the embedding "
                   "routes to --model (default: none; a cross-encoder as --model is served alone)")
    p.add_argument("--revision", help="hub ids: branch, tag or commit (default: the default branch)")
    p.add_argument("--token", help="hub ids: access token for a gated or private model "
                   "(default: HF_TOKEN or the saved `hf auth login`)")
    p.add_argument("--cache-dir", help="hub ids: where downloads are cached (default: "
                   "huggingface_hub's, HF_HUB_CACHE)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (responses are float32 either way)")
    p.add_argument("--pooling", choices=("cls", "mean", "max"), help="override the model's pooling")
    p.add_argument("--max-input-length", type=int, default=None,
                   help="tokens per input incl. [CLS]/[SEP] (default: the model's max_seq_length); "
                   "longer input is truncated or refused with 422, per request")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one device batch; concurrent requests are merged up to "
                   "it (default: the encoder's, 4096, right for CPU; 16384 or more on a GPU/TPU)")
    p.add_argument("--max-client-batch-size", type=int, default=256,
                   help="most inputs in one request (more: 422; default 256)")
    p.add_argument("--max-concurrent-requests", type=int, default=512,
                   help="most embedding requests in flight (more: 429; default 512)")
    p.add_argument("--payload-limit", type=int, default=2_000_000,
                   help="most bytes in a request body (more: 413; default 2000000)")
    p.add_argument("--auto-truncate", action="store_true",
                   help="truncate over-long inputs unless a request says truncate=false (the "
                   "OpenAI routes always follow this); default: refuse them with 422")
    p.add_argument("--api-key", default=os.environ.get("SBERT_FLAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health and "
                   "/metrics (default: $SBERT_FLAX_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` name OpenAI responses carry (default: the --model argument)")
    p.add_argument("--strict-model-name", action="store_true",
                   help="answer 404 to an OpenAI request naming a model other than "
                   "--served-model-name (default: any name is accepted, as TEI does)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="most seconds from a request's arrival to its answer (body read, queue, "
                   "compute): a body that has not arrived by then gets 408, anything else 503, "
                   "its queued inputs dropped; a device call running 3 timeouts counts as a "
                   f"stuck device (exit {EXIT_WORKER_DIED}) (default 60)")
    p.add_argument("--max-batch-wait", type=float, default=0.002, metavar="SECONDS",
                   help="most seconds the device may wait for requests still being tokenized "
                   "before it runs a batch below --max-batch-tokens, so concurrent requests "
                   "share one; a lone request never waits (default 0.002; 0: never)")
    p.add_argument("--tokenization-workers", type=int, default=None, metavar="N",
                   help="threads that tokenize (default: min(4, CPU cores))")
    p.add_argument("--max-consecutive-failures", type=int, default=5, metavar="N",
                   help="device batches failing in a row after which the worker gives up: "
                   f"/health turns 503 and the process exits {EXIT_WORKER_DIED} for its "
                   "supervisor to restart it (default 5)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"), help="default info")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn)")


def add_parser(subparsers) -> None:
    """Adds the `serve` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser("serve", help="serve embeddings and reranking over HTTP (TEI and "
                              "OpenAI APIs)",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def load_encoder(args: argparse.Namespace):
    """The encoder the server runs, with the token budget when the encoder takes one."""
    from sbert_flax.inference.encoder import SentenceEncoder

    _enable_compilation_cache()
    kwargs = {}
    accepts = set(inspect.signature(SentenceEncoder.from_pretrained).parameters)
    accepts |= set(inspect.signature(SentenceEncoder.__init__).parameters)
    if "max_batch_tokens" in accepts and args.max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = args.max_batch_tokens
    return SentenceEncoder.from_pretrained(args.model, pooling=args.pooling,
                                           max_seq_length=args.max_input_length,
                                           dtype=args.dtype, revision=args.revision,
                                           token=args.token, cache_dir=args.cache_dir, **kwargs)


def load_cross_encoder(args: argparse.Namespace, source: str, max_length: int | None,
                       revision: str | None = None):
    """A cross-encoder for /rerank and /predict, as the serving backend the app takes."""
    from sbert_flax.inference.cross_encoder import CrossEncoder
    from sbert_flax.serving.rerank_backend import RerankBackend

    kwargs = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
    ce = CrossEncoder(source, max_length=max_length, dtype=args.dtype, revision=revision,
                      token=args.token, cache_dir=args.cache_dir, **kwargs)
    return RerankBackend(ce, model_id=source)


def load_models(args: argparse.Namespace) -> tuple[object | None, object | None]:
    """(the embedder or None, the cross-encoder or None) that `--model` and `--rerank-model` name.

    A cross-encoder folder as --model (config.json names a `...ForSequenceClassification`
    architecture, or sentence-transformers' config a CrossEncoder) is served alone, as TEI serves
    a reranker or classifier; --max-input-length then is its pair length.

    Raises:
      ValueError: --rerank-model beside a cross-encoder --model, or a --rerank-model that is not
        a cross-encoder.
    """
    from sbert_flax.checkpoints.loading import resolve_model_path
    from sbert_flax.serving.rerank_backend import is_cross_encoder_dir

    hub = {"token": args.token, "cache_dir": args.cache_dir}
    if is_cross_encoder_dir(resolve_model_path(args.model, revision=args.revision, **hub)):
        if args.rerank_model:
            raise ValueError(f"--model {args.model} is a cross-encoder; --rerank-model goes "
                             "beside an embedding model (serve the cross-encoder alone with "
                             "--model only)")
        if args.pooling:
            log.warning("--pooling is ignored: %s is a cross-encoder", args.model)
        _enable_compilation_cache()
        return None, load_cross_encoder(args, args.model, args.max_input_length, args.revision)
    reranker = None
    if args.rerank_model:
        if not is_cross_encoder_dir(resolve_model_path(args.rerank_model, **hub)):
            raise ValueError(f"--rerank-model {args.rerank_model} is not a cross-encoder: its "
                             "config.json names no ...ForSequenceClassification architecture "
                             "and it is no sentence-transformers CrossEncoder")
        reranker = load_cross_encoder(args, args.rerank_model, None)
    return load_encoder(args), reranker


def _enable_compilation_cache() -> None:
    # CLIs turn the persistent compilation cache on (a restart then compiles nothing);
    # SBERT_FLAX_COMPILATION_CACHE=0 opts out.
    import sbert_flax

    enable = getattr(sbert_flax, "enable_compilation_cache", None)
    if enable is None:
        from sbert_flax.inference.encoder import enable_compilation_cache as enable
    enable()


def settings_from_args(args: argparse.Namespace):
    import sbert_flax
    from sbert_flax.serving.settings import ServeSettings

    return ServeSettings(
        model_id=args.model, served_model_name=args.served_model_name,
        strict_model_name=args.strict_model_name,
        max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
        max_concurrent_requests=args.max_concurrent_requests, payload_limit=args.payload_limit,
        api_key=args.api_key or None, auto_truncate=args.auto_truncate,
        version=getattr(sbert_flax, "__version__", ""), request_timeout=args.request_timeout,
        tokenization_workers=args.tokenization_workers,
        max_consecutive_failures=args.max_consecutive_failures,
        max_batch_wait=args.max_batch_wait)


def run(args: argparse.Namespace) -> int:
    """Loads the model, serves until SIGTERM / Ctrl-C (finishing requests in flight), returns 0;
    `EXIT_WORKER_DIED` if the batcher's worker died."""
    try:
        import uvicorn  # noqa: F401 -- fail here, before the model load, without the extra

        from sbert_flax.serving.app import create_app
    except ModuleNotFoundError as e:
        # A package of the serve extra is absent: one line that says what to install. Any other
        # missing module is a broken install or a bug and keeps its traceback.
        if (e.name or "").split(".")[0] not in SERVE_EXTRA_MODULES:
            raise
        raise MissingServeExtra(f"the server needs the serve extra (no module named {e.name!r}): "
                                "pip install \"sbert-flax[serve]\"") from None

    settings = settings_from_args(args)  # bad limits fail before the slow model load
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    encoder, reranker = load_models(args)
    return serve(create_app(encoder, settings, reranker=reranker), host=args.host, port=args.port,
                 log_level=args.log_level, access_log=args.access_log)


def serve(app, *, host: str, port: int, log_level: str = "info", access_log: bool = False) -> int:
    """Runs `app` (from `create_app`) on uvicorn until SIGTERM / Ctrl-C or the worker's death.

    Returns:
      0 after a graceful stop; `EXIT_WORKER_DIED` when the batcher's worker died: /health turned
      503 at once, the requests in flight were answered 503, and the server shut down.
    """
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal through the handler
    # it found installed; with Python's default that kills the process (exit -15). A handler of
    # our own makes a graceful stop exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # timeout_graceful_shutdown=None: on SIGTERM uvicorn stops accepting and waits for every
    # request in flight; the lifespan then drains the batcher.
    # log_config=None: keep the logging set up above (uvicorn would replace the root handlers).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None,
                            access_log=access_log, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    batcher = app.state.server.batcher

    def on_fatal(error: BaseException) -> None:
        # From the dying worker thread; uvicorn's main loop looks at should_exit every 0.1 s.
        log.critical("shutting down: the batcher's worker died (exit code %d)", EXIT_WORKER_DIED)
        server.should_exit = True

    batcher.on_fatal = on_fatal
    server.run()
    if batcher.fatal is not None:
        return EXIT_WORKER_DIED
    if not server.started:  # as uvicorn.run: the lifespan or the socket failed, logged above
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbert-flax serve", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, OSError, MissingServeExtra) as e:
        print(f"sbert-flax serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
