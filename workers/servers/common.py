"""What both engine servers share: arguments, the Flask app, OpenAI-shaped errors, serving.

Each server is one process holding one model. It loads the model first and binds its
port only afterwards, so an answering ``/health`` always means "ready" (invariant 4).
It is served by werkzeug's threaded WSGI server: one process keeps one copy of the
model (gunicorn's forked workers would each load it), and werkzeug writes each chunk
of a streamed response as soon as it is yielded (waitress, for one, buffers output,
which breaks SSE). SIGTERM stops it promptly with exit status 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler, make_server

log = logging.getLogger(__name__)
access_log = logging.getLogger("workers.servers.access")

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Large enough for a full batch of long inputs, small enough to refuse absurd bodies.
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerArgs:
    """Command-line settings of one engine server, with ``device`` already resolved."""

    model: str
    host: str
    port: int
    served_model_name: str
    device: str  # "cpu" or "cuda"


def resolve_device(choice: str) -> str:
    """Turn ``--device`` into ``"cpu"`` or ``"cuda"``.

    ``auto`` picks CUDA only when torch sees a GPU *and* ``CUDA_VISIBLE_DEVICES`` is
    non-empty: the worker pins every engine with that variable, so an engine started
    without it must not wander onto whatever GPU happens to be first.
    """
    import torch  # local: importing torch takes seconds and only the servers need it

    if choice == "cpu":
        return "cpu"
    cuda_ok = torch.cuda.is_available()
    if choice == "cuda":
        if not cuda_ok:
            raise SystemExit("--device cuda: torch sees no CUDA device")
        return "cuda"
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() != ""
    return "cuda" if cuda_ok and pinned else "cpu"


def parse_args(description: str, argv: Sequence[str] | None = None) -> ServerArgs:
    """Parse the flags every engine server takes (see ``--help``)."""
    # No abbreviations: "--po" must never be read as "--port" (see app.core.engine_policy).
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="Hugging Face model id or local path")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, required=True, help="port to bind")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="name clients use in the 'model' field (default: the --model value)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="auto: cuda when a GPU is visible and CUDA_VISIBLE_DEVICES is set, else cpu",
    )
    ns = parser.parse_args(argv)
    return ServerArgs(
        model=ns.model,
        host=ns.host,
        port=ns.port,
        served_model_name=ns.served_model_name or ns.model,
        device=resolve_device(ns.device),
    )


def configure_logging() -> None:
    """Log to stderr (the worker redirects it to the engine's log file)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --- errors -----------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 about one request field, named in ``param`` and in the message."""
    return ApiError(400, message, param=param)


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    error_type: str = "invalid_request_error",
) -> tuple[Response, int]:
    """The JSON body and status of an OpenAI-style error."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return jsonify(body), status


# --- request fields -----------------------------------------------------------------------


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why it is not one."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def optional_int(
    body: Mapping[str, Any],
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    """``body[name]`` as an int within bounds; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    # bool is an int subclass; "max_tokens": true is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {value!r}.", name)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be >= {minimum}, got {value}.", name)
    if maximum is not None and value > maximum:
        raise bad_request(f"'{name}' must be <= {maximum}, got {value}.", name)
    return value


def optional_float(
    body: Mapping[str, Any],
    name: str,
    default: float,
    *,
    minimum: float,
    maximum: float,
    minimum_exclusive: bool = False,
) -> float:
    """``body[name]`` as a number within bounds; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{name}' must be a number, got {value!r}.", name)
    low_ok = value > minimum if minimum_exclusive else value >= minimum
    if not low_ok or value > maximum:
        low = "(" if minimum_exclusive else "["
        raise bad_request(f"'{name}' must be in {low}{minimum}, {maximum}], got {value}.", name)
    return float(value)


def optional_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    """``body[name]`` as a JSON boolean; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {value!r}.", name)
    return value


# --- the app -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """The one model a server serves, and the names a request may call it by."""

    served_name: str
    model: str  # the --model value: HF id or local path
    created: int = field(default_factory=lambda: int(time.time()))
    card_extra: Mapping[str, Any] = field(default_factory=dict)  # extra /v1/models fields

    def check_requested(self, body: Mapping[str, Any]) -> None:
        """Refuse a request naming another model: 404, as OpenAI and vLLM answer.

        An omitted (or null) ``model`` means "whatever this server serves".
        """
        requested = body.get("model")
        if requested is None:
            return
        if not isinstance(requested, str):
            raise bad_request(f"'model' must be a string, got {requested!r}.", "model")
        if requested not in (self.served_name, self.model):
            raise ApiError(
                404,
                f"The model '{requested}' does not exist; this server serves '{self.served_name}'.",
                param="model",
                code="model_not_found",
            )

    def card(self) -> dict[str, Any]:
        """This model's entry in ``GET /v1/models``."""
        return {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "sagellm",
            "root": self.model,
            **self.card_extra,
        }


def create_app(import_name: str, identity: ModelIdentity) -> Flask:
    """A Flask app with ``/health``, ``/v1/models`` and JSON errors for everything.

    Only built once the model is loaded, so ``/health`` answering 200 means ready.
    """
    app = Flask(import_name)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep OpenAI's field order

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/v1/models")
    def list_models() -> Response:
        return jsonify({"object": "list", "data": [identity.card()]})

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int]:
        return error_response(
            exc.status, exc.message, param=exc.param, code=exc.code, error_type=exc.error_type
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        if status == 404:
            message = f"Unknown route: {request.method} {request.path}"
        else:
            message = exc.description or exc.name
        return error_response(status, message, code=exc.name.lower().replace(" ", "_"))

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(
            500, f"Internal server error: {type(exc).__name__}: {exc}", error_type="server_error"
        )

    return app


# --- serving -------------------------------------------------------------------------------


def _exit_during_startup(signum: int, frame: FrameType | None) -> NoReturn:
    # Loading a model takes a while; a stop asked for meanwhile is still a clean stop.
    log.info("signal %d while loading the model: exiting", signum)
    raise SystemExit(0)


def install_startup_signal_handlers() -> None:
    """Make SIGTERM/SIGINT during model loading exit with status 0."""
    signal.signal(signal.SIGTERM, _exit_during_startup)
    signal.signal(signal.SIGINT, _exit_during_startup)


class _RequestHandler(WSGIRequestHandler):
    """werkzeug's handler with a plain access log.

    werkzeug colours its lines with ANSI codes (noise in a log file), and the control
    plane's /health polls would otherwise drown everything else.
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.path == "/health" and str(code) == "200":
            return
        access_log.info('%s "%s" %s %s', self.address_string(), self.requestline, code, size)


def serve(
    app: Flask,
    host: str,
    port: int,
    on_shutdown: Callable[[], bool] | None = None,
) -> NoReturn:
    """Serve ``app`` until SIGTERM or SIGINT, then stop accepting and exit (status 0).

    The accept loop runs on a thread so that the main thread is free to wait for the
    signal (``shutdown()`` deadlocks when called from the serving thread itself).
    ``on_shutdown`` stops in-flight work and returns whether it finished in time; either
    way the process then leaves with ``os._exit(0)`` rather than tear the interpreter
    down under a thread that may still be inside torch.
    """
    server = make_server(host, port, app, threaded=True, request_handler=_RequestHandler)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # A short poll interval: shutdown() waits up to one interval for the loop to notice.
    loop = threading.Thread(
        target=functools.partial(server.serve_forever, poll_interval=0.1),
        name="http",
        daemon=True,
    )
    loop.start()
    log.info("ready: listening on http://%s:%d", host, server.server_port)
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        if not loop.is_alive():
            log.error("HTTP server thread died; exiting")
            break
    server.shutdown()
    server.server_close()
    drained = on_shutdown() if on_shutdown is not None else True
    if not drained:
        log.warning("work still running after the grace period; exiting anyway")
    log.info("stopped")
    # Leave without tearing the interpreter down: a thread that has just finished its
    # work can still be inside torch (its intra-op pool, a generation's last step), and
    # C++ static destructors under it abort the process ("terminate called without an
    # active exception", exit -6), which reads as a crash to whoever stopped us.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_server(
    description: str,
    build_app: Callable[[ServerArgs], tuple[Flask, Callable[[], bool] | None]],
    argv: Sequence[str] | None = None,
) -> int:
    """Entry point shared by the servers: parse flags, load (via ``build_app``), serve.

    ``build_app`` loads the model and returns the app plus its shutdown hook. The port
    is bound only after it returns. Returns the process exit status.
    """
    configure_logging()
    install_startup_signal_handlers()
    args = parse_args(description, argv)
    log.info("loading %s (served as %r) on %s", args.model, args.served_model_name, args.device)
    started = time.monotonic()
    app, on_shutdown = build_app(args)
    log.info("model loaded in %.1f s", time.monotonic() - started)
    # A port that cannot be bound ends the process with status 1 and werkzeug's own
    # message ("Port N is in use by another program...") on stderr.
    serve(app, args.host, args.port, on_shutdown)
    return 0
