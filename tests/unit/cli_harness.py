"""Shared by the CLI's tests: the real API served over HTTP on a real redis-server,
hosts written as a worker's heartbeat would, and a fake worker that moves engines
through their states (no process runs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from flask import Flask
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


def api_app(redis_server: RedisProcess, tmp_path: Path) -> Flask:
    """The API on ``redis_server``, with its own data dir under ``tmp_path``."""
    settings = Settings.from_env(
        {
            "SAGELLM_REDIS_URL": redis_server.url,
            "SAGELLM_HOST_NAME": "api",
            # cpu-demo's model paths are under the API's data dir (not the CLI's)
            "SAGELLM_DATA_DIR": str(tmp_path / "api-data"),
        }
    )
    return create_app(settings)


@contextmanager
def served_to_cli(
    app: Flask, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str = "127.0.0.1"
) -> Iterator[str]:
    """``app`` served over HTTP on ``host`` (its URL) and the CLI pointed at it: no
    admin token, and a data dir of its own."""
    server = make_server(host, 0, app, threaded=True)
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://{host}:{server.server_port}"
    monkeypatch.setenv("SAGELLM_API_URL", url)
    monkeypatch.delenv("SAGELLM_ADMIN_TOKEN", raising=False)
    # the CLI's own data dir: presets must not take the API's paths from it
    monkeypatch.setenv("SAGELLM_DATA_DIR", str(tmp_path / "data"))
    try:
        yield url
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture
def api_url(
    redis_server: RedisProcess,
    real_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[str]:
    """The API served over HTTP; SAGELLM_API_URL points at it."""
    with served_to_cli(api_app(redis_server, tmp_path), monkeypatch, tmp_path) as url:
        yield url


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


# What ``sagellm engine start`` prints, one line per state after its first line (less
# the elapsed time), as it follows an engine on host a that a ``FakeWorker`` starts.
STEPS_TO_RUNNING = [
    "PENDING on host a, GPUs 0, port 8100",
    "STARTING (pid 4242)",
    "RUNNING at http://127.0.0.1:8100",
]


def followed_steps(output: str) -> list[str]:
    """The state lines of a followed start (``STEPS_TO_RUNNING``'s form)."""
    return [line.split(maxsplit=1)[1] for line in output.splitlines()[1:4]]


def start_with_worker(r: redis.Redis, worker: FakeWorker) -> tuple[Result, str]:
    """``sagellm engine start m`` (1 GB) on a new host a with 2 GPUs, followed while
    ``worker`` moves the engine: the CLI's result, which exited 0, and the engine's id."""
    add_host(r, "a", "2x80")
    with worker:
        res = run("engine", "start", "m", "--memory-gb", "1", "--timeout", "30")
    assert res.exit_code == 0, res.output
    return res, only_engine_id(r)
