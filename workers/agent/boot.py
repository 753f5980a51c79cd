"""Worker process start-up: heartbeat thread and a first rediscovery."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import task_failure, task_postrun, task_prerun, worker_ready, worker_shutdown

log = logging.getLogger(__name__)
_heartbeat: Any = None


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    global _heartbeat
    from workers.agent.context import host_context
    from workers.agent.heartbeat import HeartbeatThread
    from workers.agent.reconcile import rediscover

    ctx = host_context()
    _heartbeat = HeartbeatThread(ctx)
    _heartbeat.start()

    def first_rediscovery() -> None:
        try:
            rediscover(ctx)
        except Exception:
            log.exception("start-up rediscovery failed")

    threading.Thread(target=first_rediscovery, name="sagellm-rediscovery", daemon=True).start()


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


_started: dict[str, float] = {}
_failed: set[str] = set()


@task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@task_failure.connect
def _task_failed(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _failed.add(task_id)


@task_postrun.connect
def _task_done(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Task duration and failure into Redis, for the API's /metrics."""
    if not task_id:
        return
    began = _started.pop(task_id, None)
    failed = task_id in _failed
    _failed.discard(task_id)
    if began is None or task is None:
        return
    try:
        from app.state.task_stats import record_task
        from workers.agent.context import host_context

        record_task(host_context().registry.r, task.name, time.perf_counter() - began, failed)
    except Exception:  # metrics must never break a task
        log.debug("task stats not recorded", exc_info=True)
