"""The web dashboard: ``/ui/`` on the API server (same process, same auth).

Server-rendered HTML (Jinja templates) with a little JavaScript: htmx (vendored under
``static/vendor/``, with its license) polls each page's fragments and sends the
actions; ``static/ui.js`` keeps the admin token for the browser session and sends it
as ``Authorization: Bearer`` on every request (no cookie: nothing a cross-site page
could make the browser send). No CDN, no build step, no other host.

* ``pages``: the public page shells (layout, empty containers), and ``/`` -> ``/ui/``.
* ``fragments``, ``engine_views``, ``preset_views``: the data fragments and actions
  under ``/ui/data/``, authenticated exactly like ``/v1/management`` (``access``).
* ``cluster_view``, ``engine_rows``, ``engine_detail``, ``traffic``, ``forms``: what
  the templates show, shaped from the code the REST API uses.
* ``freshness``: ETags from what a fragment shows, shared and per-row renders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask


def install(flask_app: Flask) -> None:
    """Register the dashboard's blueprints on the API's app."""
    from app.ui import engine_views, fragments, pages, preset_views

    flask_app.register_blueprint(pages.root)
    flask_app.register_blueprint(pages.bp)
    flask_app.register_blueprint(fragments.bp)
    flask_app.register_blueprint(engine_views.bp)
    flask_app.register_blueprint(preset_views.bp)
