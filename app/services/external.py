"""External engines (``app.core.external``): register an OpenAI-compatible endpoint
that sagellm did not start, forget it, and refuse what only engines sagellm started
can do.

Registration writes the record (UNHEALTHY until probed) and keeps the API key apart
(``app.state.external_keys``), then asks a worker for the first probe at once
(``sagellm.probe_external`` on the control queue; beat repeats it every health
interval). The API process sends nothing to the endpoint itself: probing is the
workers' work, as for every engine, and a registration answers in milliseconds
whether or not the endpoint is reachable.
"""

from __future__ import annotations

from app.core.errors import IllegalTransition
from app.core.external import (
    DuplicateRegistration,
    check_api_key,
    external_record,
    normalise_base_url,
    probed,
)
from app.core.models import EngineRecord
from app.core.spec import EngineKind
from app.services.cluster import Cluster
from app.state.events import encode_event
from app.state.external_keys import ExternalKeys
from app.state.queues import send_to_control
from app.state.registry import new_engine_id

PROBE_TASK = "sagellm.probe_external"
PROBE_TASK_EXPIRES_S = 60.0


def register_external(
    cluster: Cluster,
    *,
    base_url: str,
    served_model_name: str,
    kind: EngineKind = EngineKind.LLM,
    api_key: str | None = None,
) -> EngineRecord:
    """Record the endpoint at ``base_url`` serving ``served_model_name``; its first probe
    is queued. ``ValidationError`` naming the field on bad input and
    ``DuplicateRegistration`` when the same URL and name are registered already: nothing
    is recorded then."""
    url = normalise_base_url(base_url)
    key = check_api_key(api_key) if api_key is not None else None
    for rec in cluster.registry.engines():
        if rec.external_url == url and rec.spec.name == served_model_name:
            raise DuplicateRegistration(
                f"{url} is registered already as {served_model_name!r} (engine {rec.id}); "
                "delete that one first to change its key or kind"
            )
    engine_id = new_engine_id()
    rec = external_record(engine_id, served_model_name, kind, url, api_key_set=key is not None)
    secrets = ExternalKeys.of(cluster.registry)
    if key is not None:
        secrets.put(engine_id, key)  # first: the record is never without its key
    registered = encode_event(
        "registered",
        f"external {kind.value} engine at {url} as {served_model_name}",
        base_url=url,
        api_key_set=key is not None,
    )
    try:
        cluster.registry.create(rec, events=[registered])
    except BaseException:
        if key is not None:
            secrets.drop(engine_id)
        raise
    if key is not None:
        secrets.keep(engine_id)
    probe_external_now(cluster, engine_id)
    return rec


def probe_external_now(cluster: Cluster, engine_id: str) -> None:
    """Queue one probe of that external engine on the control queue (any worker)."""
    send_to_control(cluster.celery, PROBE_TASK, (engine_id,), expires_s=PROBE_TASK_EXPIRES_S)


def wait_until_probed(cluster: Cluster, engine_id: str, timeout_s: float) -> EngineRecord:
    """The record once its probe ran (RUNNING or UNHEALTHY with the reason), else when
    ``timeout_s`` ran out (still waiting for a worker to probe it)."""
    return cluster.registry.wait(engine_id, probed, timeout_s)


def forget_external(cluster: Cluster, engine_id: str) -> EngineRecord | None:
    """Delete an external engine's record, its key and its timeline in one atomic step
    (nothing is signalled: nothing of it runs here); the record as it was. None when
    ``engine_id`` is not external (it is stopped, not forgotten). ``NotFoundError`` for
    an unknown engine."""
    rec = cluster.registry.get(engine_id)
    if rec.external_url is None:
        return None
    cluster.registry.delete(engine_id, only_if=lambda r: r.external_url is not None)
    return rec


def refuse_if_external(cluster: Cluster, engine_id: str, what: str) -> None:
    """``IllegalTransition`` (409) when ``engine_id`` is external: sagellm did not start
    it, so it cannot ``what`` it. ``NotFoundError`` for an unknown engine."""
    rec = cluster.registry.get(engine_id)
    if rec.external_url is not None:
        raise IllegalTransition(
            f"engine {engine_id} is external (at {rec.external_url}): sagellm did not start "
            f"it, so it cannot {what} it; DELETE /v1/management/engines/{engine_id} forgets it"
        )
