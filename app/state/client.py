"""Redis clients for the state store."""

from __future__ import annotations

import redis


def connect(url: str, *, socket_timeout: float = 10.0) -> redis.Redis:
    """A client for ``url``. redis-py 8 defaults to a 5 s socket timeout; we set ours
    explicitly, and long enough for scripts under load."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def as_text(value: object) -> str:
    """Redis replies are bytes (we do not set decode_responses); make them str."""
    return value.decode() if isinstance(value, bytes) else str(value)
