"""Cheap refreshes: what keeps five open dashboards on a 200-engine cluster cheap.

Each fragment the pages poll is answered in three steps, cheapest first:

1. Its **ETag** is a digest of exactly the values it shows (its *key*: the view
   objects its template renders from, plus the query that chose them). The page sends
   it back (``If-None-Match``); unchanged, the answer is an empty ``304`` and the
   template is not rendered at all. A record write that changes nothing shown (a
   health check's timestamp) leaves the key as it was.
2. Changed, the HTML is looked up by that digest in a small cache shared by every
   dashboard this process serves: the first poller renders, the others reuse it.
3. Only then is the template rendered; lists cache their rows' HTML by row
   (``RowCache``), so one engine that changed state renders one row.

Every answer says how long rendering took (``Server-Timing: render;dur=ms``), which
``bench/dashboard.py`` reads.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from flask import Response, render_template, request
from markupsafe import Markup

from app.core.errors import SagellmError

K = TypeVar("K", bound=Hashable)

# Part of every ETag: a new version of the dashboard never matches an old page's tag.
UI_VERSION = "1"
# The event an action's answer raises on the page (ui.js, the templates' hx-trigger).
CHANGED_EVENT = "sagellm:changed"
# How often each fragment is polled while its page is open (seconds). The templates
# and bench/dashboard.py read them from here.
POLL_S = {
    "cluster": 3,
    "engines": 2,
    "engine": 2,
    "events": 3,
    "logs": 2,
    "gateway": 5,
    "presets": 10,
    "preset_progress": 1,
}


def digest(*parts: object) -> str:
    """A short stable digest of ``parts`` (their ``repr``): the same in every process,
    unlike ``hash``."""
    text = repr((UI_VERSION, *parts)).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, digest_size=12).hexdigest()


class RenderCache:
    """The latest renders of one fragment by ETag, shared by every page this process
    serves (a handful: the current state, and the one before it for slow pollers)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._html: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_render(self, etag: str, render: Callable[[], str]) -> tuple[str, bool]:
        """The HTML for ``etag``, and whether it was rendered now."""
        with self._lock:
            html = self._html.get(etag)
            if html is not None:
                self._html.move_to_end(etag)
                return html, False
        html = render()
        with self._lock:
            self._html[etag] = html
            while len(self._html) > self._size:
                self._html.popitem(last=False)
        return html, True


class RowCache(Generic[K]):
    """Rendered rows by the row's view object: a list re-renders only the rows whose
    values changed. Keeps only the rows of the latest list."""

    def __init__(self) -> None:
        self._html: dict[K, Markup] = {}
        self._lock = threading.Lock()

    def render(self, rows: Iterable[K], render_row: Callable[[K], str]) -> list[Markup]:
        with self._lock:
            old = self._html
        new: dict[K, Markup] = {}
        out = []
        for row in rows:
            html = new.get(row) or old.get(row)
            if html is None:
                html = Markup(render_row(row))  # rendered by a template: escaped
            new[row] = html
            out.append(html)
        with self._lock:
            self._html = new
        return out


def fragment(
    etag: str, render: Callable[[], str], cache: RenderCache | None = None, status: int = 200
) -> Response:
    """The answer to a poll: 304 when the page already shows ``etag``, else the HTML
    (from ``cache`` when another page asked for the same state)."""
    if status == 200 and request.if_none_match.contains(etag):
        resp = Response(status=304)
        resp.set_etag(etag)
        return no_store(resp)
    began = time.perf_counter()
    if cache is not None and status == 200:
        html, rendered = cache.get_or_render(etag, render)
    else:
        html, rendered = render(), True
    took_ms = (time.perf_counter() - began) * 1000
    resp = Response(html, status=status, mimetype="text/html")
    if status == 200:
        resp.set_etag(etag)
    how = "new" if rendered else "cached"
    resp.headers["Server-Timing"] = f"render;dur={took_ms:.3f};desc={how}"
    return no_store(resp)


def html_answer(html: str, status: int = 200, *, changed: bool = False) -> Response:
    """An action's answer (never cached, no ETag). ``changed``: the page's polled
    lists refresh at once instead of at their next poll (``HX-Trigger``)."""
    resp = no_store(Response(html, status=status, mimetype="text/html"))
    if changed:
        resp.headers["HX-Trigger"] = CHANGED_EVENT
    return resp


def problem_answer(exc: SagellmError) -> Response:
    """A refused request, shown where its answer goes: the message a person can act
    on, the reasons per host and GPU when there are some, with the API's status."""
    reasons = getattr(exc, "reasons", [])
    html = render_template("ui/fragments/problem.html", message=exc.message, reasons=reasons)
    return html_answer(html, exc.status_code)


def no_store(resp: Response) -> Response:
    # Data fragments are fetched with the admin token: no cache may keep them. The page
    # revalidates with its own If-None-Match (``ui.js``), not the browser's cache.
    resp.headers["Cache-Control"] = "no-store"
    return resp
