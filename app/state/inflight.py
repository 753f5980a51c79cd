"""Requests in flight per engine: counted per process (``InFlight``: for balancing, no
I/O on the hot path) and published to Redis every second (``InFlightBoard``) so the
management API can show the cluster-wide sum (``GET /v1/management/backends``)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import redis

from app.state import keys

if TYPE_CHECKING:
    from app.state.registry import Registry

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

    def start_publishing(self, board: InFlightBoard) -> None:
        """Publish this process's counts to ``board`` every second (a daemon thread,
        started once)."""
        if self._publisher is not None:
            return
        tick = threading.Event()  # never set: a sleep that cannot be interrupted early

        def loop() -> None:
            while not tick.wait(PUBLISH_EVERY_S):
                with contextlib.suppress(redis.RedisError):
                    board.publish(self.process_id, self.snapshot())

        self._publisher = threading.Thread(target=loop, daemon=True, name="inflight-publisher")
        self._publisher.start()


class InFlightBoard:
    """Every gateway process's published counts, in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    @classmethod
    def of(cls, registry: Registry) -> InFlightBoard:
        """On the Redis that ``registry`` uses."""
        return cls(registry.r)

    def publish(self, process_id: str, counts: dict[str, int]) -> None:
        """One gateway process's counts; they expire unless published again."""
        self._r.set(
            keys.gateway_in_flight(process_id), json.dumps(counts), ex=int(PUBLISH_EVERY_S * 5)
        )

    def total(self, local: InFlight | None = None) -> dict[str, int]:
        """``local``'s live counts plus every other gateway process's published ones."""
        total: Counter[str] = Counter(local.snapshot() if local else {})
        own = keys.gateway_in_flight(local.process_id) if local else None
        for key in self._r.scan_iter(match=keys.gateway_in_flight("*"), count=200):
            if own is not None and key.decode() == own:
                continue
            raw = self._r.get(key)
            if raw:
                total.update(json.loads(raw))
        return dict(total)
