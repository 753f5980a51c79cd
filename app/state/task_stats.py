"""Celery task durations and failures, summed in Redis by every worker (for /metrics)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import redis

from app.state import keys
from app.state.client import as_text

if TYPE_CHECKING:
    from app.state.registry import Registry


class TaskStats:
    """Counts, seconds and failures per task name, in one Redis hash."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    @classmethod
    def of(cls, registry: Registry) -> TaskStats:
        """On the Redis that ``registry`` uses."""
        return cls(registry.r)

    def record(self, task: str, seconds: float, failed: bool) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.hincrby(keys.TASK_STATS, f"{task}|count", 1)
        pipe.hincrbyfloat(keys.TASK_STATS, f"{task}|seconds", seconds)
        if failed:
            pipe.hincrby(keys.TASK_STATS, f"{task}|failures", 1)
        pipe.execute()

    def read(self) -> dict[str, dict[str, float]]:
        """{task: {"count", "seconds", "failures"}}."""
        out: dict[str, dict[str, float]] = defaultdict(
            lambda: {"count": 0.0, "seconds": 0.0, "failures": 0.0}
        )
        raw: dict[bytes, bytes] = self._r.hgetall(keys.TASK_STATS)  # type: ignore[assignment]
        for field, value in raw.items():
            task, _, what = as_text(field).rpartition("|")
            out[task][what] = float(value)
        return dict(out)
