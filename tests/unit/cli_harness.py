"""Shared by the CLI's tests: the real API served over HTTP on a real redis-server,
hosts written as a worker's heartbeat would, and a fake worker that moves engines
through their states (no process runs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from werkzeug.serving import make_server

from app import create_app
from app.cli import sagellm
from app.core.inventory_spec import parse_mock_gpus
from app.core.models import EngineState, HostRecord
from app.dev.redis_server import RedisProcess
from app.settings import Settings
from app.state.ledger import Ledger
from app.state.registry import Registry
from workers.host.gpu_inventory import Inventory, gpu_capacities


def add_host(r: redis.Redis, name: str, mock: str, ttl: float = 60) -> None:
    gpus = parse_mock_gpus(mock, name)
    Ledger(r).publish_capacity(name, gpu_capacities(Inventory(tuple(gpus), "mock"), name, set()))
    Registry(r).put_host(HostRecord(name, "127.0.0.1", (8100, 8199), gpus=gpus), ttl_s=ttl)


@pytest.fixture
def api_url(
    redis_server: RedisProcess,
    real_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[str]:
    """The API served over HTTP; SAGELLM_API_URL points at it."""
    settings = Settings.from_env(
        {
            "SAGELLM_REDIS_URL": redis_server.url,
            "SAGELLM_HOST_NAME": "api",
            # cpu-demo's model paths are under the API's data dir (not the CLI's)
            "SAGELLM_DATA_DIR": str(tmp_path / "api-data"),
        }
    )
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("SAGELLM_API_URL", url)
    monkeypatch.delenv("SAGELLM_ADMIN_TOKEN", raising=False)
    # the CLI's own data dir: presets must not take the API's paths from it
    monkeypatch.setenv("SAGELLM_DATA_DIR", str(tmp_path / "data"))
    yield url
    server.shutdown()
    thread.join(5)


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(sagellm, list(args), input=input, catch_exceptions=False)


class FakeWorker(threading.Thread):
    """Moves engines as a worker would: PENDING -> STARTING (pid 4242) -> ``outcome``,
    DRAINING -> STOPPING (nothing in flight) and STOPPING -> STOPPED (exit code 0),
    ``step_s`` apart. Only the registry changes;
    no process runs."""

    def __init__(
        self, r: redis.Redis, outcome: EngineState = EngineState.RUNNING, error: str = ""
    ) -> None:
        super().__init__(daemon=True)
        self.registry = Registry(r)
        self.outcome = outcome
        self.error = error or None
        self.step_s = 0.6
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            for rec in self.registry.engines():
                # Each state lasts a while, so every poll of the CLI can see it.
                if time.time() - rec.state_changed_at < self.step_s:
                    continue
                if rec.state is EngineState.PENDING:
                    self.registry.transition(rec.id, EngineState.STARTING, pid=4242)
                elif rec.state is EngineState.STARTING:
                    self.registry.transition(rec.id, self.outcome, error=self.error)
                elif rec.state is EngineState.DRAINING:
                    self.registry.transition(rec.id, EngineState.STOPPING)
                elif rec.state is EngineState.STOPPING:
                    self.registry.transition(rec.id, EngineState.STOPPED, exit_code=0)

    def __enter__(self) -> FakeWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(5)


def only_engine_id(r: redis.Redis) -> str:
    engines = Registry(r).engines()
    assert len(engines) == 1
    return engines[0].id
