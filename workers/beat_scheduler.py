"""Beat's scheduler, which also marks the engines of DOWN hosts LOST.

That marking cannot be a task: when the only worker dies, nobody consumes the
``control`` queue, yet its engines must become LOST. Beat is exactly one per cluster
and needs no worker, so it does this itself on every health interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.beat import PersistentScheduler

from app.core.errors import SagellmError
from app.core.models import LIVE_STATES, EngineState
from app.core.state.client import connect
from app.core.state.registry import Registry

log = logging.getLogger(__name__)
S = EngineState


def mark_lost_engines(registry: Registry) -> list[str]:
    """Engines in a live state on a DOWN host become LOST; returns their ids."""
    lost = []
    for host in registry.hosts():
        if host.up:
            continue
        for rec in registry.engines(host=host.name, state=LIVE_STATES - {S.PENDING}):
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
        from workers.celery_app import settings

        self._registry = Registry(connect(settings.redis_url))
        self._every = settings.health_interval_s
        self._last = 0.0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            try:
                mark_lost_engines(self._registry)
            except Exception:  # Redis down: next tick
                log.exception("marking LOST engines failed")
        delay = float(super().tick(*args, **kwargs))
        return min(delay, self._every)
