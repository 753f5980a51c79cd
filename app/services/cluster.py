"""What every service works with: the cluster (settings, state store, a Celery app that
sends tasks by name), the checks every start passes, and queueing a start.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from app.core.errors import NotFoundError, NoWorkerError, StateLostError
from app.core.models import EngineRecord
from app.core.spec import EngineSpec
from app.services.admission import admit
from app.settings import Settings
from app.state.client import connect
from app.state.gateway_report import GatewayReports
from app.state.ledger import Ledger
from app.state.queues import send_to_host, sending_app
from app.state.registry import Registry
from app.state.task_stats import TaskStats

START_TASK_EXPIRES_S = 60.0


@dataclass
class Cluster:
    """What the use cases work with: the settings, the state store, and a Celery app to
    send tasks (by name) to the hosts' workers."""

    settings: Settings
    registry: Registry
    ledger: Ledger
    celery: Celery

    @property
    def task_stats(self) -> TaskStats:
        """Celery task counts and durations, as every worker records them."""
        return TaskStats.of(self.registry)

    @property
    def gateway_reports(self) -> GatewayReports:
        """Every gateway process's report: requests in flight, request ages."""
        return GatewayReports.of(self.registry)


def connect_cluster(settings: Settings, celery: Celery | None = None) -> Cluster:
    """The cluster at ``settings.redis_url``; sending with ``celery`` (default: an app
    that only sends, ``app.state.queues.sending_app``)."""
    client = connect(settings.redis_url)
    if celery is None:
        celery = sending_app(settings.redis_url)
    return Cluster(settings, Registry(client), Ledger(client), celery)


def require_worker(cluster: Cluster) -> None:
    if not any(h.up for h in cluster.registry.hosts()):
        raise NoWorkerError(
            "no host worker is alive: start one with `flask sagellm worker` "
            "(or `make up` on a single machine)"
        )


def check_engine_spec(cluster: Cluster, spec: EngineSpec) -> None:
    """Every check ``spec`` must pass at the edge (``app.services.admission.admit``);
    ``ValidationError`` naming the field; called before anything is reserved or queued.
    """
    admit(cluster.settings, spec, cluster.registry)


def launch_engine(cluster: Cluster, rec: EngineRecord) -> EngineRecord:
    """Queue the start of a reserved (PENDING) engine on its host."""
    assert rec.host is not None
    task_id = send_to_host(
        cluster.celery,
        rec.host,
        "sagellm.start_engine",
        (rec.id,),
        expires_s=START_TASK_EXPIRES_S,
    )
    try:
        return cluster.registry.update(rec.id, lambda r: setattr(r, "task_id", task_id))
    except NotFoundError:
        # Redis lost the record (FLUSHALL, a restart without persistence) after the
        # reservation: the queued task finds no record and starts nothing.
        raise StateLostError(
            f"engine {rec.id}: the state store lost its record while it was being started "
            "(Redis was flushed or restarted); nothing was started, retry the request"
        ) from None
