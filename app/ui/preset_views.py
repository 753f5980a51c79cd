"""Preset fragments and actions: ``/ui/data/presets/...``.

Built-in presets and one pasted on the page are read, planned and applied by the code
``/v1/management/presets`` uses (read by ``app.api.presets.read_builtin`` and
``read_preset_text``: the same admission of each engine and the same model locations
filled in; applied by ``app.services.presets.apply_preset``). An apply runs in the
request, as the REST API's does; meanwhile the page polls ``progress``, which reads
the preset's engine records (each carries its preset and engine name) from the
registry: PENDING -> STARTING -> RUNNING or FAILED, and the rollback's
DRAINING/STOPPING/STOPPED when one failed.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, render_template, request

from app.api.context import cluster
from app.api.presets import read_builtin, read_preset_text
from app.core.errors import NotFoundError, SagellmError, ValidationError
from app.core.presets import Preset
from app.services.cluster import Cluster
from app.services.preset_files import builtin_preset_files, get_builtin, server_locations
from app.services.presets import PresetApplyError, apply_preset
from app.ui.access import DATA_PREFIX, same_site_only
from app.ui.cluster_view import engine_label
from app.ui.freshness import (
    POLL_S,
    RenderCache,
    digest,
    fragment,
    html_answer,
    problem_answer,
)

bp = Blueprint("ui_presets", __name__, url_prefix=DATA_PREFIX)
bp.before_request(same_site_only)  # actions come from the dashboard's own pages
PASTED_SOURCE = "the dashboard"
MAX_PASTED_CHARS = 200_000
_LIST = RenderCache()


@bp.context_processor
def _polling() -> dict[str, Any]:
    return {"poll": POLL_S}


def _pasted(text: str) -> Preset:
    if len(text) > MAX_PASTED_CHARS:
        raise ValidationError(f"the preset is over {MAX_PASTED_CHARS} characters", field="yaml")
    return read_preset_text(text, PASTED_SOURCE)


@bp.get("/presets")
def presets_list() -> Response:
    """Built-in presets: name, description, engines (or why one cannot load here)."""
    c = cluster()
    locations = server_locations(c.settings.data_dir)
    items: list[tuple[str, str, tuple[str, ...], str]] = []
    for name in sorted(builtin_preset_files()):
        problem = ""
        try:
            p = read_builtin(name)
        except SagellmError as exc:
            problem = exc.message  # e.g. a model no host has: say so, still describe it
            try:
                p = get_builtin(name, locations=locations)
            except SagellmError:
                items.append((name, "", (), problem))
                continue
        items.append((name, p.description or "", tuple(e.name for e in p.engines), problem))
    return fragment(
        digest("presets", items),
        lambda: render_template("ui/fragments/presets.html", items=items),
        _LIST,
    )


def _plan_view(c: Cluster, preset: Preset, *, yaml_text: str, builtin: bool) -> str:
    planned = apply_preset(c, preset, dry_run=True).to_dict()
    return render_template(
        "ui/fragments/preset.html",
        preset=preset,
        plan=planned["plan"],
        ok=planned["ok"],
        yaml_text=yaml_text,
        builtin=builtin,
        since=time.time(),
        names=[e.name for e in preset.engines],
    )


@bp.get("/presets/<name>")
def preset_detail(name: str) -> Response:
    """A built-in preset: its YAML as written, its plan now, the apply button; or, when
    it cannot be used on this cluster, its YAML and why."""
    c = cluster()
    path = builtin_preset_files().get(name)
    if path is None:
        return problem_answer(NotFoundError(f"no built-in preset {name!r}"))
    text = path.read_text(encoding="utf-8")
    try:
        preset = read_builtin(name)
        return html_answer(_plan_view(c, preset, yaml_text=text, builtin=True))
    except SagellmError as exc:
        html = render_template(
            "ui/fragments/preset_unusable.html", source=str(path), yaml_text=text, problem=exc
        )
        return html_answer(html)


@bp.post("/presets/pasted/plan")
def pasted_plan() -> Response:
    """The plan of a preset pasted on the page (``${VAR}`` must be expanded)."""
    c = cluster()
    text = request.form.get("yaml", "")
    try:
        preset = _pasted(text)
        return html_answer(_plan_view(c, preset, yaml_text=text, builtin=False))
    except SagellmError as exc:
        return problem_answer(exc)


def _apply(c: Cluster, preset: Preset) -> Response:
    try:
        result = apply_preset(c, preset).to_dict()
    except PresetApplyError as exc:
        failed = exc.to_dict()
        html = render_template("ui/fragments/applied.html", failed=failed, result=None)
        return html_answer(html, exc.status_code)
    except SagellmError as exc:
        return problem_answer(exc)
    html = render_template("ui/fragments/applied.html", result=result, failed=None)
    return html_answer(html, changed=True)


@bp.post("/presets/<name>/apply")
def apply_builtin(name: str) -> Response:
    """Apply a built-in: place all, start all, wait for RUNNING, roll back on failure."""
    c = cluster()
    try:
        preset = read_builtin(name)
    except SagellmError as exc:
        return problem_answer(exc)
    return _apply(c, preset)


@bp.post("/presets/pasted/apply")
def pasted_apply() -> Response:
    """Apply the pasted preset, as ``POST /v1/management/presets/apply`` does."""
    c = cluster()
    try:
        preset = _pasted(request.form.get("yaml", ""))
    except SagellmError as exc:
        return problem_answer(exc)
    return _apply(c, preset)


@bp.get("/presets/<name>/progress")
def progress(name: str) -> Response:
    """Each engine of the preset and its newest record: its state now, and whether it
    was created by an apply from this page (after ``since``)."""
    try:
        since = float(request.args.get("since", "0"))
    except ValueError:
        since = 0.0
    names = request.args.getlist("engine")[:100]
    newest: dict[str, dict[str, Any]] = {}
    for d in cluster().registry.snapshot().engines:  # oldest first: the last one wins
        spec = d.doc.get("spec") or {}
        if spec.get("preset") == name and spec.get("preset_engine"):
            newest[str(spec["preset_engine"])] = d.doc
    rows = []
    for engine in names or sorted(newest):
        doc = newest.get(engine)
        if doc is None:
            rows.append((engine, "", "", "", "", False, ""))
            continue
        rows.append(
            (
                engine,
                str(doc["id"]),
                str(doc["state"]),
                str(doc.get("host") or ""),
                engine_label(doc),
                float(doc.get("created_at") or 0) >= since,
                str((doc.get("failure") or {}).get("reason") or ""),
            )
        )
    return fragment(
        digest("preset-progress", name, rows),
        lambda: render_template("ui/fragments/preset_progress.html", rows=rows),
    )
