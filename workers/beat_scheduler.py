"""Beat's scheduler, which also marks the engines of DOWN hosts LOST.

That marking cannot be a task: when the only worker dies, nobody consumes the
``control`` queue, yet its engines must become LOST. Beat is exactly one per cluster
and needs no worker, so it does this itself on every health interval.

"Exactly one" is held by ``app.state.locks.BeatLock``, which the ``sagellm beat``
command takes and hands over with ``hold``. A beat that loses it stops at once (the
scheduler refuses to tick, the process is signalled and exits non-zero): another beat
may already be running, and two beats would schedule everything twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.beat import PersistentScheduler

from app.core.errors import SagellmError
from app.core.models import LIVE_STATES, EngineState
from app.state.client import connect
from app.state.locks import BEAT_LOCK_RENEW_S, BEAT_LOCK_TTL_S, BeatLock
from app.state.registry import Registry

__all__ = ["BEAT_LOCK_RENEW_S", "BEAT_LOCK_TTL_S", "BeatLock", "SagellmScheduler", "hold"]
log = logging.getLogger(__name__)
S = EngineState

# The lock the `sagellm beat` command took for this process; the scheduler Celery
# builds reads it on every tick.
_held_lock: BeatLock | None = None


def hold(lock: BeatLock) -> None:
    global _held_lock
    _held_lock = lock


def _stop_if_lost() -> None:
    lock = _held_lock
    if lock is not None and lock.lost.is_set():
        log.error("%s", lock.reason)
        raise SystemExit(1)


def mark_lost_engines(registry: Registry) -> list[str]:
    """Engines in a live state on a DOWN host become LOST; returns their ids.

    PENDING engines are left to their start task. STOPPING ones stay STOPPING: the stop
    was asked for and must not be forgotten (LOST would let a returning host's worker
    re-adopt the engine as RUNNING); the worker finishes it when the host is back.
    """
    lost = []
    for host in registry.hosts():
        if host.up:
            continue
        for rec in registry.engines(host=host.name, state=LIVE_STATES - {S.PENDING, S.STOPPING}):
            try:
                registry.transition(rec.id, S.LOST, error=f"host {host.name} is down")
                lost.append(rec.id)
            except SagellmError:
                pass  # changed concurrently
    if lost:
        log.warning("engines LOST with their hosts: %s", lost)
    return lost


class SagellmScheduler(PersistentScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from workers.celery_app import process_settings

        settings = process_settings()
        self._registry = Registry(connect(settings.redis_url))
        self._every = settings.health_interval_s
        self._last = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        _stop_if_lost()  # before anything: a beat without the lock schedules nothing
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            try:
                mark_lost_engines(self._registry)
            except Exception:  # Redis down: next tick
                log.exception("marking LOST engines failed")
        _stop_if_lost()
        delay = float(super().tick(*args, **kwargs))
        return min(delay, self._every)
