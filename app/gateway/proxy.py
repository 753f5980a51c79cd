"""The gateway's request path as plain WSGI, in front of Flask.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` are answered
here without Flask's request context and routing: on a 2-core head node CPU per
request decides the gateway's throughput (see bench/gateway.py). Everything else
falls through to the Flask app. Choice is discovery's and the balancer's; bytes are
the transport's; this module only glues them and keeps the books (in-flight counts,
metrics).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from app.api.auth import gateway_tokens, token_allowed
from app.api.metrics import GATEWAY_ERRORS, GATEWAY_LATENCY, GATEWAY_REQUESTS
from app.core.errors import SagellmError
from app.core.spec import EngineKind
from app.gateway.cold import ColdStartFailed
from app.gateway.discovery import Backend, ColdModel, ModelNotFound, NoBackend
from app.gateway.routes import RETRY_AFTER_S, Gateway, openai_error_body
from app.gateway.transport import NoAnswer, Upstream, UpstreamError

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

ROUTES = {
    "/v1/chat/completions": EngineKind.LLM,
    "/v1/completions": EngineKind.LLM,
    "/v1/embeddings": EngineKind.EMBEDDING,
}
# Not forwarded back (hop-by-hop, or set by our own server).
_SKIP = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _status(code: int) -> str:
    return f"{code} {_REASONS.get(code, 'Status')}"


def _error(
    start: StartResponse,
    code: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    err_code: str | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = openai_error_body(message, kind=kind, param=param, code=err_code)
    start(
        _status(code),
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *(extra or [])],
    )
    return [body]


def _with_key(headers: dict[str, str], backend: Backend) -> dict[str, str]:
    """``headers``, plus an external engine's own API key (``Backend.api_key``). The
    client's Authorization header is never forwarded; the key goes to no other engine."""
    if backend.api_key is None:
        return headers
    return {**headers, "Authorization": f"Bearer {backend.api_key}"}


class GatewayProxy:
    """WSGI middleware: the proxied OpenAI routes, then the wrapped app."""

    def __init__(
        self, app: WsgiApp, gateway: Gateway, api_keys: tuple[str, ...], admin_token: str
    ) -> None:
        self.app = app
        self.gw = gateway
        self.allowed = gateway_tokens(api_keys, admin_token)
        # Metric series per (model, engine, status): labels() takes a lock and hashes
        # the label values on every call; this is one dict lookup on the hot path.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        kind = ROUTES.get(environ.get("PATH_INFO", ""))
        if kind is None or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start)
        if self.allowed and not token_allowed(environ.get("HTTP_AUTHORIZATION", ""), self.allowed):
            return _error(
                start,
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                err_code="invalid_api_key",
                extra=[("WWW-Authenticate", "Bearer")],
            )
        return self._proxy(environ, start, kind)

    def _proxy(
        self, environ: dict[str, Any], start: StartResponse, kind: EngineKind
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        path = environ["PATH_INFO"]
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > 0:
            raw = environ["wsgi.input"].read(length)
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            raw = environ["wsgi.input"].read()  # the server decodes the chunked framing
        else:
            raw = b""
        try:
            payload = json.loads(raw)
        except ValueError:
            return _error(start, 400, "the request body must be JSON")
        if not isinstance(payload, dict):
            return _error(start, 400, "the request body must be a JSON object")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            return _error(start, 400, "model: must be a string", param="model")
        gw = self.gw
        try:
            try:
                candidates = gw.directory.resolve(model, kind)
            except ColdModel as cold:
                if gw.cold is None:
                    raise
                # The model is on standby: start it and wait (this greenlet only).
                gw.cold.bring_up(cold.model, cold.engines)
                gw.directory.refresh()
                candidates = gw.directory.resolve(model, kind)
        except ColdStartFailed as exc:
            GATEWAY_ERRORS.labels(model=model or "", reason="cold_start_failed").inc()
            return _error(
                start,
                503,
                exc.message,
                kind="service_unavailable",
                err_code="cold_start_failed",
                extra=[("Retry-After", str(RETRY_AFTER_S))],
            )
        except SagellmError as exc:
            if isinstance(exc, NoBackend):
                GATEWAY_ERRORS.labels(model="", reason="no_backend").inc()
                return _error(
                    start,
                    503,
                    exc.message,
                    kind="service_unavailable",
                    err_code="no_backend",
                    extra=[("Retry-After", str(RETRY_AFTER_S))],
                )
            if isinstance(exc, ModelNotFound):
                # As OpenAI answers it: the SDKs raise NotFoundError at once, no retries.
                GATEWAY_ERRORS.labels(model="", reason="unknown_model").inc()
                return _error(start, 404, exc.message, param="model", err_code="model_not_found")
            GATEWAY_ERRORS.labels(model=model or "", reason="bad_request").inc()
            return _error(start, exc.status_code, exc.message, param=exc.field)
        stream = payload.get("stream") is True
        # Retry once: only after a NoAnswer or a complete 5xx answer (see below).
        order = gw.balancer.order(candidates, gw.traffic.snapshot())[:2]
        headers = _STREAM_HEADERS if stream else _JSON_HEADERS
        last_error = ""
        for attempt, backend in enumerate(order):
            final = attempt == len(order) - 1
            body = raw
            if model != backend.served_name:
                # The engine knows only its served name; clients may use model id or label.
                body = json.dumps({**payload, "model": backend.served_name}).encode()
            gw.traffic.inc(backend.engine_id)
            try:
                up = gw.transport.open(backend.base_url, path, body, _with_key(headers, backend))
            except NoAnswer as exc:  # not one byte of an answer came back: fail over
                self._failed(backend, "upstream_connect")
                last_error = f"{backend.engine_id}: {exc}"
                continue
            except UpstreamError as exc:
                # It may be working on it (a read timeout, an answer cut short): another
                # engine would run the request twice.
                self._failed(backend, "upstream_connect")
                return _error(start, 502, f"{backend.engine_id}: {exc}", kind="upstream_error")
            except BaseException:  # a bug or a kill: still never leave the count stuck
                gw.traffic.dec(backend.engine_id)
                raise
            if up.status_code >= 500 and not final:
                with contextlib.suppress(UpstreamError):
                    gw.transport.read(up)
                self._failed(backend, "upstream_5xx")
                last_error = f"{backend.engine_id}: HTTP {up.status_code}"
                continue
            return self._respond(start, up, backend, stream, started)
        GATEWAY_ERRORS.labels(
            model=order[0].served_name if order else "", reason="all_failed"
        ).inc()
        return _error(
            start,
            502,
            f"every backend for {model or kind.value} failed ({last_error})",
            kind="upstream_error",
            extra=[("Retry-After", str(RETRY_AFTER_S))],
        )

    def _failed(self, backend: Backend, reason: str) -> None:
        self.gw.traffic.dec(backend.engine_id)
        self.gw.directory.eject(backend.engine_id)
        GATEWAY_ERRORS.labels(model=backend.served_name, reason=reason).inc()

    def _done(self, backend: Backend, code: int, started: float) -> None:
        self.gw.traffic.dec(backend.engine_id)
        self.gw.traffic.touch(backend.engine_id)  # a long stream is activity until its end
        key = (backend.served_name, backend.engine_id, code)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                GATEWAY_REQUESTS.labels(model=key[0], engine=key[1], code=str(code)),
                GATEWAY_LATENCY.labels(model=key[0], engine=key[1]),
            )
        series[0].inc()
        series[1].observe(time.perf_counter() - started)

    def _respond(
        self, start: StartResponse, up: Upstream, backend: Backend, stream: bool, started: float
    ) -> Iterable[bytes]:
        headers = [(k, v) for k, v in up.headers() if k.lower() not in _SKIP]
        headers.append(("X-Sagellm-Engine", backend.engine_id))
        code = up.status_code
        if not (stream and up.header("content-type").startswith("text/event-stream")):
            try:
                content = self.gw.transport.read(up)
            except UpstreamError as exc:
                self._failed(backend, "upstream_connect")
                return _error(start, 502, f"{backend.engine_id}: {exc}", kind="upstream_error")
            except BaseException:
                up.conn.close()
                self.gw.traffic.dec(backend.engine_id)
                raise
            self._done(backend, code, started)
            if backend.api_key is not None:  # an endpoint that echoes the key it was sent
                content = content.replace(backend.api_key.encode(), b"[redacted]")
            headers.append(("Content-Length", str(len(content))))
            start(_status(code), headers)
            return [content]
        headers += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
        try:
            start(_status(code), headers)
        except BaseException:  # the relay below never starts: release here
            up.conn.close()
            self.gw.traffic.dec(backend.engine_id)
            raise
        return self._relay(up, backend, code, started)

    def _relay(self, up: Upstream, backend: Backend, code: int, started: float) -> Iterator[bytes]:
        try:
            yield from self.gw.transport.chunks(up)
        except UpstreamError:
            # The engine broke mid-stream: end ours; the client sees no [DONE].
            GATEWAY_ERRORS.labels(model=backend.served_name, reason="stream_broken").inc()
        finally:
            # Also runs when the client went away: the WSGI server closes this generator.
            self._done(backend, code, started)
