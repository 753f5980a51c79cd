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
from app.gateway.cold import ColdStarter
from app.gateway.discovery import BackendDirectory
from app.gateway.transport import Transport
from app.state.gateway_report import GatewayTraffic

bp = Blueprint("gateway", __name__)
RETRY_AFTER_S = 10


@dataclass
class Gateway:
    directory: BackendDirectory
    balancer: BalancingPolicy
    transport: Transport
    # Requests in flight and each engine's last request, reported for drains and idle
    # stops (app.state.gateway_report).
    traffic: GatewayTraffic
    cold: ColdStarter | None = None  # who starts STANDBY models


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
    directory = _gw().directory
    seen: dict[str, str] = {}
    for b in directory.backends():
        seen.setdefault(b.served_name, b.kind.value)
    standby: set[str] = set()
    for k in directory.standby():  # on demand: the first request starts it
        if k.served_name not in seen:
            seen[k.served_name] = k.kind.value
            standby.add(k.served_name)
    data = [
        {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "sagellm",
            "kind": kind,
            **({"status": "standby"} if name in standby else {}),
        }
        for name, kind in sorted(seen.items())
    ]
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


def make_gateway(
    load: Any, policy: str, read_timeout_s: float, refresh_s: float, changes: Any = None
) -> Gateway:
    """The gateway of one process. ``changes``: the Redis client whose record-change
    channel keeps discovery current (None: discovery re-reads every ``refresh_s``), and
    from which external engines' API keys are read (None: none are sent)."""
    from app.gateway.balancing import make_balancer

    feed = secrets = None
    if changes is not None:
        from functools import partial

        from app.state.change_feed import ChangeFeed
        from app.state.external_keys import ExternalKeys

        feed = partial(ChangeFeed, changes)
        secrets = ExternalKeys(changes).read
    directory = BackendDirectory(load, refresh_s=refresh_s, feed=feed, secrets=secrets)
    return Gateway(
        directory=directory,
        balancer=make_balancer(policy),
        transport=Transport(read_timeout_s=read_timeout_s),
        # What the process reports says how current its routing is (for drains).
        traffic=GatewayTraffic(fresh=directory.fresh_seq),
    )
