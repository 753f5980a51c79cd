"""The dashboard's page shells: ``/ui/...``, public, with no cluster data in them.

Each page is the layout (navigation, the sign-in dialog) and empty containers that
fetch their content from ``/ui/data/...`` (``app.ui.fragments`` and friends) with the
admin token, as often as ``POLL_S`` says. Nothing here reads the cluster: declare a
view ``@public_shell`` only if that stays true (``app.ui.access``).

Every ``/ui`` answer carries a Content-Security-Policy that lets the page talk to
this origin only: no CDN, no other host, no inline script.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, abort, redirect, render_template, request

from app.core.models import EngineState
from app.core.placement import POLICIES
from app.core.spec import KINDS, RUNTIME_NAMES
from app.ui.access import UI_PREFIX, allow_static, public_shell
from app.ui.freshness import POLL_S

bp = Blueprint(
    "ui",
    __name__,
    url_prefix=UI_PREFIX,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
allow_static("ui.static")
root = Blueprint("ui_root", __name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@root.get("/")
def to_dashboard() -> Any:
    """``/`` is the dashboard."""
    return redirect(f"{UI_PREFIX}/", code=302)


@bp.after_app_request
def _headers(resp: Response) -> Response:
    if request.path == UI_PREFIX or request.path.startswith(UI_PREFIX + "/"):
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
    return resp


@bp.app_template_filter("isotime")
def isotime(t: float) -> str:
    """A Unix time as ISO 8601 UTC (``<time datetime=...>``; ui.js shows it as an age)."""
    return datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _page(template: str, page: str, **context: object) -> str:
    return render_template(
        template,
        page=page,
        poll=POLL_S,
        states=[s.value for s in EngineState],  # generic: states added later show up
        kinds=KINDS,
        runtimes=RUNTIME_NAMES,
        policies=sorted(POLICIES),
        **context,
    )


def _checked(value: str) -> str:
    if not _ID.match(value):
        abort(404)
    return value


@bp.get("/")
@public_shell("ui")
def cluster() -> str:
    """Hosts and GPUs: who holds how much memory where."""
    return _page("ui/cluster.html", "cluster")


@bp.get("/engines")
@public_shell("ui")
def engines() -> str:
    """The engines table, and the form that starts one."""
    return _page("ui/engines.html", "engines")


@bp.get("/engines/<engine_id>")
@public_shell("ui")
def engine(engine_id: str) -> str:
    """One engine: record, failure, events, live log, actions."""
    return _page("ui/engine.html", "engines", engine_id=_checked(engine_id))


@bp.get("/presets")
@public_shell("ui")
def presets() -> str:
    """Built-in presets, and a preset of your own."""
    return _page("ui/presets.html", "presets")


@bp.get("/presets/<name>")
@public_shell("ui")
def preset(name: str) -> str:
    """One built-in preset: its YAML, its plan, apply with live progress."""
    return _page("ui/preset.html", "presets", preset_name=_checked(name))


@bp.get("/gateway")
@public_shell("ui")
def gateway() -> str:
    """What the gateway serves and how it is doing."""
    return _page("ui/gateway.html", "gateway")
