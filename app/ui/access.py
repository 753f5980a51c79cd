"""Who may fetch what from the dashboard: default deny.

The dashboard's HTML page shells and its static files are public: they carry no
cluster data, only the layout and empty containers. Every other route under ``/ui/``
(the data fragments and the actions) needs the admin token exactly as
``/v1/management`` does: ``app._install_auth`` asks ``needs_admin_token`` and applies
the same check (``app.api.auth.token_allowed``) with the same 401 answer.

A route is public only when its view is declared with ``@public_shell``: a fragment
added without thinking about it is protected.

Actions are also refused unless the page itself sent them (``cross_site_refusal``):
the token travels in a header, never a cookie, so with a token set no other site can
act; without one (an open API on loopback), a plain cross-site form could still POST,
so an action must carry ``HX-Request`` (which only a script of this origin can add)
and no foreign ``Origin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., object])

UI_PREFIX = "/ui"
DATA_PREFIX = UI_PREFIX + "/data"  # the fragments and actions
# Endpoints (``blueprint.view``) that carry no cluster data.
_PUBLIC: set[str] = set()


def public_shell(blueprint: str) -> Callable[[F], F]:
    """Declare a view of ``blueprint`` a public page shell (no data in it)."""

    def mark(view: F) -> F:
        _PUBLIC.add(f"{blueprint}.{getattr(view, '__name__', '')}")
        return view

    return mark


def allow_static(endpoint: str) -> None:
    """Static files of the dashboard (CSS, JS, vendored htmx) are public."""
    _PUBLIC.add(endpoint)


def needs_admin_token(path: str, endpoint: str | None) -> bool:
    """True for every ``/ui`` route that is not a declared public shell or static file
    (unknown paths included: a 404 is not told apart from a 401 without the token)."""
    if not path.startswith(UI_PREFIX + "/"):
        return False  # "/ui" itself only redirects to "/ui/"
    return endpoint not in _PUBLIC


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site_refusal(method: str, headers: Mapping[str, str], host_url: str) -> str | None:
    """Why an action cannot have come from the dashboard's own page, else None.
    ``headers``: names in lower case."""
    if method in SAFE_METHODS:
        return None
    if headers.get("hx-request") != "true":
        return "dashboard actions are sent by its pages (HX-Request header missing)"
    origin = headers.get("origin")
    if origin and origin.rstrip("/") != host_url.rstrip("/"):
        return f"dashboard actions come from its own origin, not {origin}"
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return "dashboard actions come from its own pages (Sec-Fetch-Site)"
    return None


def public_endpoints() -> frozenset[str]:
    """The endpoints served without the token (for tests and docs)."""
    return frozenset(_PUBLIC)


def same_site_only() -> Any:
    """A data blueprint's ``before_request`` (after the app's Host and token checks):
    403 for an action another site made the browser send."""
    from flask import request

    headers = {name.lower(): value for name, value in request.headers.items()}
    why = cross_site_refusal(request.method, headers, request.host_url)
    if why is None:
        return None
    return {"code": 403, "status": "Forbidden", "field": "Origin", "message": why}, 403
