"""Worker process start-up: heartbeat thread and a first rediscovery."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger(__name__)
_heartbeat: Any = None


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    global _heartbeat
    from workers.context import host_context
    from workers.heartbeat import HeartbeatThread
    from workers.rediscovery import rediscover

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
