"""Use cases on hosts: forgetting one for good."""

from __future__ import annotations

from app.core.errors import IllegalTransition, NotFoundError
from app.core.models import STOPPING_STATES, EngineRecord, EngineState
from app.services.cluster import Cluster


def forget_host(cluster: Cluster, name: str) -> list[str]:
    """Forget a DOWN host for good (decommissioned, or gone for days): its engines end
    FAILED (``EngineRecord.fail``; STOPPING ones STOPPED), their reservations are
    released, the host and its GPU capacity leave the cluster. Returns the engines it
    ended. A live host is refused: stop its worker first."""
    host = cluster.registry.host(name)
    if host is None:
        raise NotFoundError(f"host {name!r} is not known")
    if host.up:
        raise IllegalTransition(
            f"host {name} is up (heartbeat {host.heartbeat_age_s:.0f}s ago): stop its worker "
            "before forgetting it"
        )

    def end(r: EngineRecord) -> None:
        # Owns nothing afterwards: the same write releases its reservation.
        if r.state in STOPPING_STATES:
            r.mark_stopped()
        elif r.state is not EngineState.STOPPED:
            r.fail(f"host {name} was forgotten")

    ended = []
    for rec in cluster.registry.engines(host=name):
        if rec.owns_nothing:
            cluster.ledger.release(rec.id)  # holds nothing; make sure of it
            continue
        cluster.registry.update(rec.id, end)
        ended.append(rec.id)
    cluster.ledger.forget_host(name)
    cluster.registry.forget_host(name)
    return ended
