"""The Celery application: Redis broker and result backend, one queue per host.

Queues: each host's worker consumes ``host.<name>`` (work that must happen on that
host) and ``control`` (cluster-wide work: beat's fan-outs, pruning).

Why the ack and visibility settings are what they are:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies
  mid-way is delivered again rather than lost. Every task is idempotent (it re-reads
  the record and acts on its current state), so a second delivery is harmless.
* The Redis transport only *emulates* acks: an unacked message is re-delivered once
  ``visibility_timeout`` passes, even if its worker is alive and still running it.
  So no task may run that long (ARCHITECTURE invariant 7). Our tasks are short by
  construction: a start spawns and returns, readiness is polled by ``watch_start``
  re-scheduling itself, a stop waits at most ``SAGELLM_STOP_GRACE_S``, every HTTP call
  has a timeout. ``VISIBILITY_TIMEOUT_S`` is far above the longest of them, and
  settings are checked against it at start-up. (The threads pool cannot enforce
  ``task_time_limit``; the bound comes from the code, not a kill.)
* ``worker_prefetch_multiplier = 1``: a worker reserves only what it runs, so an
  unacked backlog never sits in a dead worker's memory.
* Every send carries ``expires`` (see ``app.state.queues``): a task for a host
  whose worker is gone is dropped rather than run much later on stale intent.
"""

from __future__ import annotations

from celery import Celery

from app.core.errors import ConfigError
from app.settings import Settings
from app.state.queues import CONTROL_QUEUE

VISIBILITY_TIMEOUT_S = 900


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``; tasks are in ``workers.tasks``."""
    longest = settings.stop_grace_s + 3 * settings.health_timeout_s + 60
    if longest >= VISIBILITY_TIMEOUT_S:
        raise ConfigError(
            f"SAGELLM_STOP_GRACE_S={settings.stop_grace_s:g}: a stop could outlive the "
            f"broker visibility timeout ({VISIBILITY_TIMEOUT_S}s); use a shorter grace",
            field="SAGELLM_STOP_GRACE_S",
        )
    app = Celery("sagellm", include=["workers.tasks", "workers.agent.boot"])
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        # redis-py 8 defaults to a 5 s socket timeout; BRPOP-style waits need more.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
    }
    beat_every = {
        "health": settings.health_interval_s,
        "rediscovery": settings.rediscovery_interval_s,
        "prune": max(60.0, min(settings.prune_after_s, 3600.0)),
    }
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        broker_transport_options=transport,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=CONTROL_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        result_expires=86400,
        result_extended=True,
        # Flower and `GET /tasks/{id}` read these events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        beat_max_loop_interval=max(1.0, min(beat_every.values()) / 2),
        beat_schedule={
            "health-fanout": {
                "task": "sagellm.tick_health",
                "schedule": beat_every["health"],
                "options": {"queue": CONTROL_QUEUE, "expires": beat_every["health"]},
            },
            "rediscovery-fanout": {
                "task": "sagellm.tick_rediscovery",
                "schedule": beat_every["rediscovery"],
                "options": {"queue": CONTROL_QUEUE, "expires": beat_every["rediscovery"]},
            },
            "prune": {
                "task": "sagellm.prune",
                "schedule": beat_every["prune"],
                "options": {"queue": CONTROL_QUEUE, "expires": beat_every["prune"]},
            },
        },
    )
    return app


settings = Settings.from_env()
celery_app = make_celery(settings)
app = celery_app  # `celery -A workers.celery_app` finds `app`
