"""Worker process start-up: the engine watch (readiness and exits, ``workers.agent.
watch``), the heartbeat thread and a first rediscovery; task stats for /metrics."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.signals import task_failure, task_postrun, task_prerun, worker_ready, worker_shutdown

if TYPE_CHECKING:
    from workers.agent.context import HostContext
    from workers.agent.idle import IdleThread
    from workers.agent.watch import EngineWatch

log = logging.getLogger(__name__)
_heartbeat: HeartbeatThread | None = None
_watch: EngineWatch | None = None
_idle: IdleThread | None = None


class HeartbeatThread(threading.Thread):
    """Publishes every ``SAGELLM_HEARTBEAT_INTERVAL_S`` in the worker's main process
    (``workers.agent.reconcile.heartbeat_or_rediscover``), so the heartbeat keeps going
    while tasks run, and has the engine watch catch up with the records (engines that
    rediscovery relinked or adopted); survives Redis outages."""

    def __init__(self, ctx: HostContext) -> None:
        super().__init__(name="sagellm-heartbeat", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        from workers.agent.reconcile import heartbeat_or_rediscover

        while not self.stopped.is_set():
            try:
                heartbeat_or_rediscover(self.ctx)
            except Exception:  # Redis down, NVML hiccup: try again next beat
                log.exception("heartbeat failed")
            if self.ctx.watch is not None:
                try:
                    self.ctx.watch.sync()
                except Exception:
                    log.exception("engine watch sync failed")
            self.stopped.wait(self.ctx.settings.heartbeat_interval_s)

    def stop(self) -> None:
        self.stopped.set()


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    global _heartbeat, _watch, _idle
    from workers.agent.context import host_context
    from workers.agent.idle import IdleThread
    from workers.agent.reconcile import rediscover
    from workers.agent.watch import EngineWatch

    ctx = host_context()
    _watch = EngineWatch(ctx).start()
    ctx.watch = _watch
    _heartbeat = HeartbeatThread(ctx)
    _heartbeat.start()
    _idle = IdleThread(ctx)
    _idle.start()

    def first_rediscovery() -> None:
        try:
            rediscover(ctx)
            _watch.sync()  # the engines found again are watched from now on
        except Exception:
            log.exception("start-up rediscovery failed")

    threading.Thread(target=first_rediscovery, name="sagellm-rediscovery", daemon=True).start()


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if _watch is not None:
        _watch.stop()
    if _idle is not None:
        _idle.stop()


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
        from workers.agent.context import host_context

        host_context().task_stats.record(task.name, time.perf_counter() - began, failed)
    except Exception:  # metrics must never break a task
        log.debug("task stats not recorded", exc_info=True)
