"""The gateway's Flask side: ``GET /v1/models`` and the shared pieces. The proxied POST
routes are served by ``app.gateway.proxy`` (plain WSGI, in front of Flask). Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app

from app.gateway.balancing import BalancingPolicy
from app.gateway.discovery import Backend, BackendDirectory
from app.gateway.transport import Transport
from app.state.inflight import InFlight

bp = Blueprint("gateway", __name__)
RETRY_AFTER_S = 10


@dataclass
class Gateway:
    directory: BackendDirectory
    balancer: BalancingPolicy
    transport: Transport
    in_flight: InFlight


def _gw() -> Gateway:
    gateway: Gateway = current_app.extensions["sagellm.gateway"]
    return gateway


def openai_error_body(
    message: str, *, kind: str, param: str | None = None, code: str | None = None
) -> bytes:
    """OpenAI's error shape, for the Flask routes and the WSGI proxy alike."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json.dumps(body).encode()


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    resp = Response(
        openai_error_body(message, kind=kind, param=param, code=code),
        status=status,
        mimetype="application/json",
    )
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


@bp.get("/v1/models")
def list_models() -> Response:
    seen: dict[str, Backend] = {}
    for b in _gw().directory.backends():
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


def make_gateway(
    load: Any, policy: str, read_timeout_s: float, refresh_s: float, changes: Any = None
) -> Gateway:
    """The gateway of one process. ``changes``: the Redis client whose record-change
    channel keeps discovery current (None: discovery re-reads every ``refresh_s``)."""
    from app.gateway.balancing import make_balancer

    feed = None
    if changes is not None:
        from functools import partial

        from app.state.change_feed import ChangeFeed

        feed = partial(ChangeFeed, changes)
    directory = BackendDirectory(load, refresh_s=refresh_s, feed=feed)
    return Gateway(
        directory=directory,
        balancer=make_balancer(policy),
        transport=Transport(read_timeout_s=read_timeout_s),
        # What the process publishes says how current its routing is (for drains).
        in_flight=InFlight(fresh=directory.fresh_as_of),
    )
