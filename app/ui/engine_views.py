"""One engine's fragments and the engine actions: ``/ui/data/engines/...``.

The record, its timeline and its log tail are read as ``GET /v1/management/engines/
{id}``, ``.../events`` and ``.../logs`` read them; stop (with drain), restart, the
start form and its dry run call the same service functions as the REST API
(``app.services.engines``). Authenticated like ``/v1/management``
(``app.ui.access``); answers are HTML for htmx.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, render_template, request

from app.api.context import cluster
from app.core.errors import NotFoundError, PlacementError, SagellmError
from app.services.engines import engine_logs, plan_engine, restart_engine, start_engine, stop_engine
from app.ui.access import DATA_PREFIX, same_site_only
from app.ui.engine_detail import (
    actions,
    events_view,
    is_final,
    launch_command,
    shown_record,
    snippets,
)
from app.ui.engine_rows import engine_row
from app.ui.forms import FormProblem, read_start_form
from app.ui.freshness import digest, fragment, html_answer, problem_answer

bp = Blueprint("ui_engine", __name__, url_prefix=DATA_PREFIX)
bp.before_request(same_site_only)  # actions come from the dashboard's own pages
LOG_TAIL = 200


def _acted(verb: str, doc: dict[str, Any], status: int = 200) -> Response:
    """What an action did; the lists on the page refresh at once."""
    html = render_template("ui/fragments/acted.html", verb=verb, e=doc)
    return html_answer(html, status, changed=True)


@bp.get("/engines/<engine_id>")
def record(engine_id: str) -> Response:
    """The record: state, placement, failure and its advice, snippets, actions."""
    c = cluster()
    try:
        doc = c.registry.get(engine_id).to_dict()
    except NotFoundError as exc:
        return problem_answer(exc)
    shown = shown_record(doc)
    needs_key = bool(c.settings.api_keys)
    base = request.host_url

    def render() -> str:
        return render_template(
            "ui/fragments/engine.html",
            e=doc,
            row=engine_row(doc),
            actions=actions(doc),
            final=is_final(doc["state"]),
            snippets=snippets(doc, base, needs_key),
        )

    return fragment(digest("engine", shown, base, needs_key), render)


@bp.get("/engines/<engine_id>/events")
def events(engine_id: str) -> Response:
    """The engine's timeline, newest first."""
    c = cluster()
    try:
        c.registry.get(engine_id)
    except NotFoundError as exc:
        return problem_answer(exc)
    timeline = events_view(c.registry.events.list(engine_id))
    return fragment(
        digest("events", timeline),
        lambda: render_template("ui/fragments/events.html", events=timeline),
    )


@bp.get("/engines/<engine_id>/logs")
def logs(engine_id: str) -> Response:
    """The last lines of its log (read on its host by its worker) and the command line
    of its latest start (the log's header line)."""
    c = cluster()
    try:
        lines = engine_logs(c, engine_id, LOG_TAIL)
    except SagellmError as exc:
        problem = exc.message  # a host that is down cannot read its logs
        return fragment(
            digest("logs-problem", problem),
            lambda: render_template("ui/fragments/logs.html", problem=problem, lines=[]),
        )
    command = launch_command(lines, engine_id)
    return fragment(
        digest("logs", lines),
        lambda: render_template(
            "ui/fragments/logs.html", lines=lines, command=command, problem=None
        ),
    )


@bp.post("/engines/<engine_id>/stop")
def stop(engine_id: str) -> Response:
    """Stop gracefully: DRAINING first unless ``drain=false`` (as ``DELETE``)."""
    drain = request.args.get("drain", "true").lower() != "false"
    try:
        rec = stop_engine(cluster(), engine_id, drain=drain)
    except SagellmError as exc:
        return problem_answer(exc)
    return _acted("Stopping", rec.to_dict())


@bp.post("/engines/<engine_id>/restart")
def restart(engine_id: str) -> Response:
    """Restart in place (a FAILED engine is placed again)."""
    try:
        rec = restart_engine(cluster(), engine_id)
    except SagellmError as exc:
        return problem_answer(exc)
    return _acted("Restarting", rec.to_dict())


@bp.post("/plan")
def plan() -> Response:
    """The start form's dry run: where it would land, or why it does not fit (per
    host and GPU). Reserves nothing."""
    read = read_start_form(request.form)
    if isinstance(read, FormProblem):
        return html_answer(render_template("ui/fragments/plan.html", problem=read))
    spec, policy = read
    try:
        placed = plan_engine(cluster(), spec, policy).to_dict()
    except PlacementError as exc:
        head = exc.message.split(":\n", 1)[0]
        problem = FormProblem(head)
        return html_answer(
            render_template("ui/fragments/plan.html", problem=problem, reasons=exc.reasons)
        )
    except SagellmError as exc:
        return html_answer(
            render_template("ui/fragments/plan.html", problem=FormProblem(exc.message))
        )
    return html_answer(render_template("ui/fragments/plan.html", placed=placed, spec=spec))


@bp.post("/engines")
def start() -> Response:
    """Start the engine of the form (place, reserve, queue), as ``POST
    /v1/management/engines``; its row appears in the table at once."""
    read = read_start_form(request.form)
    if isinstance(read, FormProblem):
        return html_answer(render_template("ui/fragments/plan.html", problem=read), 400)
    spec, policy = read
    try:
        rec = start_engine(cluster(), spec, policy)
    except SagellmError as exc:
        return problem_answer(exc)
    return _acted("Starting", rec.to_dict(), 202)
