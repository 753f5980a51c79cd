"""Polled fragments of the cluster, engines and gateway pages: ``/ui/data/...``.

Each reads the cluster with the code the REST API uses (``Registry.snapshot``, the
read behind ``GET /v1/management/status``; ``app.core.status``; the in-flight counts
of ``/backends``; the services), shapes it into frozen view objects, and answers
through ``app.ui.freshness`` (ETag, shared renders, per-row renders). Authenticated
like ``/v1/management`` (``app.ui.access``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, get_template_attribute, render_template, request

from app.api.cluster import in_flight_counts
from app.api.context import cluster
from app.core import status as views
from app.services.models import models_on_hosts
from app.ui.access import DATA_PREFIX, same_site_only
from app.ui.cluster_view import HostInputs, cluster_inputs, host_card, without_heartbeat
from app.ui.engine_rows import STATES, EngineFilter, EngineRow, RowMemo, state_counts
from app.ui.freshness import RenderCache, RowCache, digest, fragment
from app.ui.traffic import HISTORY, chart, model_rates

bp = Blueprint("ui_fragments", __name__, url_prefix=DATA_PREFIX)
bp.before_request(same_site_only)  # actions come from the dashboard's own pages

_CLUSTER = RenderCache()
_HOST_HTML: RowCache[HostInputs] = RowCache()
_ENGINES = RenderCache()
_ROW_HTML: RowCache[EngineRow] = RowCache()
_ROWS = RowMemo()
_MODELS = RenderCache()


@bp.get("/session")
def session() -> Response:
    """200 when the token is right (or none is needed): the sign-in check."""
    return Response("ok", mimetype="text/plain", headers={"Cache-Control": "no-store"})


@bp.get("/cluster")
def cluster_fragment() -> Response:
    """Hosts (up or DOWN, heartbeat, address) and a memory bar per GPU."""
    c = cluster()
    snap = c.registry.snapshot(capacity=True, reservations=True)
    margin_mib = c.settings.gpu_safety_margin_mib
    hosts = cluster_inputs(snap, margin_mib)  # what the page shows: its ETag

    def render() -> str:
        gpus = get_template_attribute("ui/fragments/_host.html", "host_gpus")
        bars = _HOST_HTML.render(
            (without_heartbeat(h) for h in hosts), lambda h: gpus(host_card(h, margin_mib))
        )
        cards = [host_card(h, margin_mib) for h in hosts]
        return render_template(
            "ui/fragments/cluster.html",
            cards=list(zip(cards, bars, strict=True)),
            margin_gb=c.settings.gpu_safety_margin_gb,
        )

    return fragment(digest("cluster", margin_mib, hosts), render, _CLUSTER)


@bp.get("/engines")
def engines_fragment() -> Response:
    """The engines table, filtered by state, host and kind."""
    wanted = EngineFilter.from_args(request.args)
    snap = cluster().registry.snapshot()
    every = _ROWS.rows(snap.engines, in_flight_counts())
    kept = [(row, token) for row, token in every if wanted.keeps(row)]
    hosts = sorted({row.host for row, _ in every if row.host})
    counts = state_counts(snap.engines)

    def render() -> str:
        macro = get_template_attribute("ui/fragments/_engine_row.html", "engine_row")
        return render_template(
            "ui/fragments/engines.html",
            rows=_ROW_HTML.render((row for row, _ in kept), macro),
            shown=len(kept),
            total=len(every),
            counts=counts,
            hosts=hosts,
            wanted=wanted,
            states=STATES,
        )

    key = digest("engines", wanted, [token for _, token in kept], hosts, counts)
    return fragment(key, render, _ENGINES)


@bp.get("/models")
def models_fragment() -> Response:
    """``<option>``s of the models the hosts have on disk (the start form's datalist)."""
    c = cluster()
    hosts = models_on_hosts(c.registry, default_max_model_len=c.settings.default_max_model_len)
    options: dict[str, list[str]] = {}
    for h in hosts:
        for m in h["models"]:
            est = m.get("estimate")
            note = f"{h['host']}" + (f", {est.per_gpu_mib / 1024:.1f} GB" if est else "")
            options.setdefault(str(m["model"]), []).append(note)
    items = sorted((model, "; ".join(notes)) for model, notes in options.items())

    def render() -> str:
        return render_template("ui/fragments/models.html", items=items)

    return fragment(digest("models", items), render, _MODELS)


@bp.get("/gateway")
def gateway_fragment() -> Response:
    """Models served, replicas, requests per second, errors, latency, and a chart."""
    snap = cluster().registry.snapshot()
    backends = views.backend_rows((d.doc for d in snap.engines), in_flight_counts())
    served: dict[str, dict[str, Any]] = {}
    for kind in ("llm", "embedding"):
        for b in backends[f"{kind}_backends"]:
            name = b["served_model_name"]
            m = served.setdefault(
                name, {"name": name, "kind": kind, "replicas": 0, "healthy": 0, "in_flight": 0}
            )
            m["replicas"] += 1
            m["healthy"] += 1 if b["healthy"] else 0
            m["in_flight"] += b["in_flight"]
    samples = HISTORY.sample()
    rates = {r.model: r for r in model_rates(samples)}
    graph = chart(samples)
    models = [served[k] for k in sorted(served)]
    key = digest("gateway", models, sorted(rates.items()), graph)
    return fragment(
        key,
        lambda: render_template(
            "ui/fragments/gateway.html",
            models=models,
            rates=rates,
            extra=[r for name, r in sorted(rates.items()) if name not in served],
            chart=graph,
            samples=len(samples),
        ),
    )
