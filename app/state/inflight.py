"""Requests in flight per engine: counted per process (for balancing, no I/O on the
hot path) and published to Redis every second so the management API can show the
cluster-wide sum (``GET /v1/management/backends``)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections import Counter

import redis

from app.state import keys

PUBLISH_EVERY_S = 1.0


class InFlight:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._publisher: threading.Thread | None = None

    def inc(self, engine_id: str) -> None:
        with self._lock:
            self._counts[engine_id] += 1

    def dec(self, engine_id: str) -> None:
        with self._lock:
            self._counts[engine_id] -= 1
            if self._counts[engine_id] <= 0:
                del self._counts[engine_id]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def start_publishing(self, client: redis.Redis) -> None:
        """Publish this process's counts periodically (daemon thread, started once)."""
        if self._publisher is not None:
            return
        stop = threading.Event()

        def loop() -> None:
            key = keys.gateway_in_flight(self.process_id)
            while not stop.wait(PUBLISH_EVERY_S):
                with contextlib.suppress(redis.RedisError):
                    client.set(key, json.dumps(self.snapshot()), ex=int(PUBLISH_EVERY_S * 5))

        self._publisher = threading.Thread(target=loop, daemon=True, name="inflight-publisher")
        self._publisher.start()


def cluster_in_flight(client: redis.Redis, local: InFlight | None = None) -> dict[str, int]:
    """This process's live counts plus every other gateway process's published ones."""
    total: Counter[str] = Counter(local.snapshot() if local else {})
    own = keys.gateway_in_flight(local.process_id) if local else None
    for key in client.scan_iter(match=keys.gateway_in_flight("*"), count=200):
        if own is not None and key.decode() == own:
            continue
        raw = client.get(key)
        if raw:
            total.update(json.loads(raw))
    return dict(total)
