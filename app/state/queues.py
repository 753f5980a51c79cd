"""Task queues (Redis lists read by Celery workers): their names, the broker settings
both sides use (``celery_config``), the API's sending app, and the one place that sends
to them, picking queue and expiry. Tasks are named by string; nothing here imports the
workers (whose app, ``workers.celery_app.make_celery``, adds the tasks and beat).

Why the ack and visibility settings are what they are:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies
  mid-way is delivered again rather than lost. Every task is idempotent (it re-reads
  the record and acts on its current state), so a second delivery is harmless.
* The Redis transport only *emulates* acks: an unacked message is re-delivered once
  ``visibility_timeout`` passes, even if its worker is alive and still running it.
  So no task may run that long (ARCHITECTURE invariant 7). Our tasks are short by
  construction: a start spawns and returns, readiness is polled by ``watch_start``
  re-scheduling itself, a stop waits at most ``SAGELLM_STOP_GRACE_S``, every HTTP call
  has a timeout. ``VISIBILITY_TIMEOUT_S`` is far above the longest of them, and the
  worker checks its settings against it at start-up. (The threads pool cannot enforce
  ``task_time_limit``; the bound comes from the code, not a kill.)
* ``worker_prefetch_multiplier = 1``: a worker reserves only what it runs, so an
  unacked backlog never sits in a dead worker's memory.
* Every send carries ``expires`` (``send_to_host``, ``send_to_control``): a task for a
  host whose worker is gone is dropped rather than run much later on stale intent.

Messages are published through the broker's default (nameless) exchange with the
queue name as routing key. Kombu's Redis transport then writes straight to the
queue's list, without consulting the exchange bindings it keeps in Redis, so routing
still works after those keys are lost (a Redis restart without persistence, or a
``FLUSHALL``) and before the target worker has declared its queue.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

CONTROL_QUEUE = "control"
VISIBILITY_TIMEOUT_S = 900
APP_NAME = "sagellm"


def celery_config(redis_url: str) -> dict[str, Any]:
    """Broker, result backend, serialisation and ack settings: the same for the apps
    that send (API) and the apps that run tasks (workers, beat)."""
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        # redis-py 8 defaults to a 5 s socket timeout; BRPOP-style waits need more.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
    }
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": CONTROL_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_prefetch_multiplier": 1,
        "result_expires": 86400,
        "result_extended": True,
        # Flower and `GET /tasks/{id}` read these events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


def sending_app(redis_url: str) -> Celery:
    """A Celery app that only sends tasks (by name) and reads their results: the API's."""
    app = Celery(APP_NAME)
    app.conf.update(celery_config(redis_url))
    return app


def host_queue_name(host: str) -> str:
    """The queue a host's worker consumes: ``host.<name>``."""
    return f"host.{host}"


_DEFAULT_EXCHANGE = Exchange("", type="direct")


def _queue(name: str) -> Queue:
    return Queue(name, _DEFAULT_EXCHANGE, routing_key=name)


def send_to_host(
    app: Celery,
    host: str,
    task: str,
    args: tuple[Any, ...] = (),
    *,
    expires_s: float,
    countdown_s: float | None = None,
) -> str:
    """Queue ``task`` for ``host``'s worker; returns the task id."""
    result = app.send_task(
        task,
        args=args,
        queue=_queue(host_queue_name(host)),
        expires=expires_s + (countdown_s or 0),
        countdown=countdown_s,
    )
    return str(result.id)


def send_to_control(app: Celery, task: str, args: tuple[Any, ...] = (), *, expires_s: float) -> str:
    """Queue cluster-wide work; any worker runs it."""
    result = app.send_task(task, args=args, queue=_queue(CONTROL_QUEUE), expires=expires_s)
    return str(result.id)
