"""Task queues (Redis lists read by Celery workers): their names, and the one place
that sends to them, picking queue and expiry. Tasks are named by string; nothing here
imports the workers.

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
