"""/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Thin: parse, ask discovery and the balancer, let the transport move bytes. Errors
use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from flask import Blueprint, Response, current_app, request

from app.core.errors import SagellmError, ValidationError
from app.core.models import EngineKind
from app.gateway.balancing import BalancingPolicy
from app.gateway.discovery import Backend, BackendDirectory, NoBackend
from app.gateway.inflight import InFlight
from app.gateway.transport import Transport, Upstream
from app.metrics import GATEWAY_ERRORS, GATEWAY_LATENCY, GATEWAY_REQUESTS

bp = Blueprint("gateway", __name__)
RETRY_AFTER_S = 10
# Not forwarded either way (hop-by-hop, or recomputed by our server).
_SKIP = {
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "content-encoding",
    "date",
    "server",
}


@dataclass
class Gateway:
    directory: BackendDirectory
    balancer: BalancingPolicy
    transport: Transport
    in_flight: InFlight


def _gw() -> Gateway:
    gateway: Gateway = current_app.extensions["sagellm.gateway"]
    return gateway


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _error_for(exc: SagellmError) -> Response:
    if isinstance(exc, NoBackend):
        return openai_error(
            503,
            exc.message,
            kind="service_unavailable",
            code="no_backend",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return openai_error(exc.status_code, exc.message, param=exc.field)


@bp.get("/v1/models")
def list_models() -> Response:
    seen: dict[str, Backend] = {}
    for b in _gw().directory.models():
        seen.setdefault(b.served_name, b)
    data = [
        {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sagellm",
            "kind": b.kind.value,
        }
        for name, b in sorted(seen.items())
    ]
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _proxy("/v1/chat/completions", EngineKind.LLM)


@bp.post("/v1/completions")
def completions() -> Response:
    return _proxy("/v1/completions", EngineKind.LLM)


@bp.post("/v1/embeddings")
def embeddings() -> Response:
    return _proxy("/v1/embeddings", EngineKind.EMBEDDING)


def _proxy(path: str, kind: EngineKind) -> Response:
    started = time.perf_counter()
    raw = request.get_data(cache=False)
    try:
        payload = json.loads(raw)
    except ValueError:
        return openai_error(400, "the request body must be JSON")
    if not isinstance(payload, dict):
        return openai_error(400, "the request body must be a JSON object")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        return openai_error(400, "model: must be a string", param="model")
    gw = _gw()
    try:
        candidates = gw.directory.resolve(model, kind)
    except SagellmError as exc:
        reason = "no_backend" if isinstance(exc, NoBackend) else "bad_request"
        GATEWAY_ERRORS.labels(
            model="" if isinstance(exc, NoBackend) else model or "", reason=reason
        ).inc()
        return _error_for(exc)
    stream = payload.get("stream") is True
    order = gw.balancer.order(candidates, gw.in_flight.snapshot())[:2]  # retry once
    last_error = ""
    for attempt, backend in enumerate(order):
        final = attempt == len(order) - 1
        body = raw
        if payload.get("model") != backend.served_name:
            # The engine knows only its served name; clients may use the model id/label.
            body = json.dumps({**payload, "model": backend.served_name}).encode()
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        gw.in_flight.inc(backend.engine_id)
        try:
            up = gw.transport.open(backend.base_url, path, body, headers)
        except httpx.TransportError as exc:
            gw.in_flight.dec(backend.engine_id)
            gw.directory.eject(backend.engine_id)
            GATEWAY_ERRORS.labels(model=backend.served_name, reason="upstream_connect").inc()
            last_error = f"{backend.engine_id}: {type(exc).__name__}"
            continue
        if up.status_code >= 500 and not final:
            Transport.read(up)
            gw.in_flight.dec(backend.engine_id)
            gw.directory.eject(backend.engine_id)
            GATEWAY_ERRORS.labels(model=backend.served_name, reason="upstream_5xx").inc()
            last_error = f"{backend.engine_id}: HTTP {up.status_code}"
            continue
        return _respond(gw, up, backend, stream, started)
    GATEWAY_ERRORS.labels(model=order[0].served_name if order else "", reason="all_failed").inc()
    return openai_error(
        502,
        f"every backend for {model or kind.value} failed ({last_error})",
        kind="upstream_error",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _observe(backend: Backend, code: int, started: float) -> None:
    GATEWAY_REQUESTS.labels(
        model=backend.served_name, engine=backend.engine_id, code=str(code)
    ).inc()
    GATEWAY_LATENCY.labels(model=backend.served_name, engine=backend.engine_id).observe(
        time.perf_counter() - started
    )


def _respond(gw: Gateway, up: Upstream, backend: Backend, stream: bool, started: float) -> Response:
    headers = {k: v for k, v in up.response.headers.items() if k.lower() not in _SKIP}
    headers["X-Sagellm-Engine"] = backend.engine_id
    is_sse = up.response.headers.get("content-type", "").startswith("text/event-stream")
    if not (stream and is_sse):
        try:
            content = Transport.read(up)
        finally:
            gw.in_flight.dec(backend.engine_id)
        _observe(backend, up.status_code, started)
        return Response(content, status=up.status_code, headers=headers)

    def relay() -> Iterator[bytes]:
        try:
            yield from Transport.chunks(up)
        except httpx.HTTPError:
            # upstream broke mid-stream: end ours; the client sees no [DONE]
            GATEWAY_ERRORS.labels(model=backend.served_name, reason="stream_broken").inc()
        finally:
            gw.in_flight.dec(backend.engine_id)
            _observe(backend, up.status_code, started)

    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"  # nginx & co.: do not buffer the stream
    return Response(relay(), status=up.status_code, headers=headers, direct_passthrough=True)


def make_gateway(load: Any, policy: str, read_timeout_s: float, refresh_s: float) -> Gateway:
    from app.gateway.balancing import make_balancer

    return Gateway(
        directory=BackendDirectory(load, refresh_s=refresh_s),
        balancer=make_balancer(policy),
        transport=Transport(read_timeout_s=read_timeout_s),
        in_flight=InFlight(),
    )


__all__ = ["Gateway", "ValidationError", "bp", "make_gateway"]
