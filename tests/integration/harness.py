"""Real processes for integration tests: workers and beat as `sagellm` subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from app.core.models import EngineRecord
from app.dev.redis_server import RedisProcess
from app.dev.stack import gunicorn_argv
from app.services.cluster import Cluster, connect_cluster
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
FAKES = REPO / "tests" / "fakes"
BIN = Path(sys.executable).parent
T = TypeVar("T")

# Fast loops so faults are seen in seconds, not minutes.
FAST = {
    "SAGELLM_HEARTBEAT_INTERVAL_S": "0.5",
    "SAGELLM_HEARTBEAT_TTL_S": "3",
    "SAGELLM_HEALTH_INTERVAL_S": "1",
    "SAGELLM_HEALTH_TIMEOUT_S": "2",
    "SAGELLM_REDISCOVERY_INTERVAL_S": "2",
    "SAGELLM_RESTART_BACKOFF_S": "0.5",
    "SAGELLM_RESTART_BACKOFF_MAX_S": "2",
    "SAGELLM_MAX_RESTARTS": "2",
    "SAGELLM_STOP_GRACE_S": "3",
    "SAGELLM_START_TIMEOUT_S": "180",
    "SAGELLM_WORKER_CONCURRENCY": "4",
}


def model_roots_for_tests(data_dir: Path) -> str:
    """SAGELLM_MODEL_ROOTS of test clusters: where tests keep models (the fixtures, the
    MiniLM wheel, the demo model under the data dir, and pytest's temp root, where
    ``tiny_llm_path`` is built: ``data_dir`` is ``<temp root>/<test dir>/data``)."""
    from app.settings import minilm_dir

    roots = [REPO / "tests" / "fixtures" / "models", data_dir / "models", data_dir.parents[1]]
    minilm = minilm_dir()
    return ",".join(str(r) for r in [*roots, *([minilm] if minilm else [])])


# Engines do not inherit SAGELLM_* (workers.host.processes.inherited_env): this marks the
# engines of one test cluster for kill_engines.
CLUSTER_MARK = "TEST_SAGELLM_DATA_DIR"


def base_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGELLM_")}
    env.update(FAST)
    env.update(
        {
            "SAGELLM_REDIS_URL": redis_url,
            "SAGELLM_DATA_DIR": str(data_dir),
            "SAGELLM_MODEL_ROOTS": model_roots_for_tests(data_dir),
            CLUSTER_MARK: str(data_dir),
            "PATH": f"{FAKES}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class Proc:
    """A `sagellm <command>` subprocess with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM, without waiting for it to exit (``stop`` waits)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15, *, terminated: bool = False) -> None:
        """SIGTERM (unless ``terminated``: already sent), SIGKILL after ``timeout``."""
        if self.alive():
            assert self.proc is not None
            if not terminated:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def worker(host: str, address: str, env: dict[str, str], log_dir: Path, **extra: str) -> Proc:
    e = dict(env, SAGELLM_HOST_NAME=host, SAGELLM_HOST_ADDRESS=address, **extra)
    return Proc(
        f"worker-{host}", [str(BIN / "sagellm"), "worker", "--loglevel", "info"], e, log_dir
    )


def beat(env: dict[str, str], log_dir: Path) -> Proc:
    return Proc("beat", [str(BIN / "sagellm"), "beat", "--loglevel", "info"], env, log_dir)


def wait_until(
    fn: Callable[[], T | None], timeout: float, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}; last={last!r}")


@contextlib.contextmanager
def gunicorn_api(
    env: dict[str, str],
    log_path: Path,
    address: str,
    port: int,
    *,
    workers: int,
    ready_path: str = "/health",
) -> Iterator[str]:
    """The API as ``sagellm up`` runs it (gunicorn, ``workers`` gateway processes) at
    ``address:port``: its URL once ``ready_path`` answers 200. Stopped afterwards; its
    log (``log_path``) must hold no traceback."""
    url = f"http://{address}:{port}"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        gunicorn_argv(f"{address}:{port}", workers=workers),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def answers() -> bool:
        try:
            return httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, 60, what=f"gunicorn (see {log_path})")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    output = log_path.read_text()
    assert "Traceback" not in output, output[-3000:]


def kill_engines(data_dir: Path) -> int:
    """Kill every engine process started by workers using ``data_dir`` (test cleanup)."""
    import psutil

    killed = 0
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SAGELLM_ENGINE_ID") and env.get(CLUSTER_MARK) == str(data_dir):
            try:
                proc.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


@dataclass
class ClusterEnv:
    redis: RedisProcess
    env: dict[str, str]
    tmp: Path
    cluster: Cluster
    procs: dict[str, Proc] = field(default_factory=dict)

    def start_worker(self, host: str = "a", address: str = "127.0.0.1", **extra: str) -> Proc:
        p = worker(host, address, self.env, self.tmp / "logs", **extra).start()
        self.procs[f"worker-{host}"] = p
        wait_until(
            lambda: any(h.name == host and h.up for h in self.cluster.registry.hosts()),
            30,
            what=f"heartbeat of {host}",
        )
        return p

    def start_beat(self) -> Proc:
        p = beat(self.env, self.tmp / "logs").start()
        self.procs["beat"] = p
        return p

    def get(self, engine_id: str) -> EngineRecord:
        return self.cluster.registry.get(engine_id)

    @classmethod
    def create(cls, tmp: Path, **extra: str) -> ClusterEnv:
        server = RedisProcess(tmp / "redis", persist=False).start()
        e = base_env(
            server.url,
            tmp / "data",
            **{
                "SAGELLM_MOCK_GPUS": "2x80",
                "SAGELLM_PORT_RANGE": "18100-18149",
                # the stand-in vllm's record of its starts; in the worker's environment,
                # which engines inherit (a spec's env may not name it)
                "FAKE_VLLM_RECORD": str(tmp / "vllm-calls.jsonl"),
                **extra,
            },
        )
        settings = Settings.from_env({k: v for k, v in e.items() if k.startswith("SAGELLM_")})
        return cls(server, e, tmp, connect_cluster(settings))

    def close(self) -> None:
        # All asked at once: their shutdowns (a second or so each) overlap.
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.stop(5, terminated=True)
        kill_engines(self.tmp / "data")
        for name, p in self.procs.items():
            if "Traceback" in p.output():
                print(f"--- {name} log ---\n{p.output()[-4000:]}")
        self.redis.stop()


class AppServer:
    """A Flask app served over real HTTP (threaded werkzeug) in this process."""

    def __init__(self, app: object) -> None:
        import threading

        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)  # type: ignore[arg-type]
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
