"""The throw-away stack a benchmark runs against, and the process handling they share.

``local_stack`` makes a temp dir (``logs/``, ``prometheus/``, ``data/`` in it), starts a
redis-server there and gives a ``LocalStack`` that starts the rest: the API under
gunicorn as production starts it (``app.dev.stack.gunicorn_argv``), ``sagellm worker``
and ``sagellm beat``, and any other process (a fake backend). On leaving, everything
it started is stopped, last started first, then the engines its workers left running
(engines outlive their worker by design), then Redis; the temp dir is removed unless
``keep_logs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.dev.redis_server import RedisProcess

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 15) -> None:
    """SIGTERM ``proc`` (if it still runs), SIGKILL after ``grace_s``, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(fn: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """``fn()``'s first true value, polled every ``interval_s``; RuntimeError naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s:g}s waiting for {what}")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> bytes:
    """The body of ``url``'s first 200 answer, polled every 0.1 s; RuntimeError after
    ``timeout_s``, or as soon as ``proc`` (the server being waited for) exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} (waiting for {url})")
        try:
            resp = httpx.get(url, timeout=2, trust_env=False)
            if resp.status_code == 200:
                return resp.content
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g}s (last: {last})")


def progress(message: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def print_report(report: str, result: dict[str, Any], json_path: Path | None) -> None:
    """``report`` on stdout, then the run's total time (``result["elapsed_s"]``); with
    ``json_path``, ``result`` written there as JSON."""
    print(report)
    print(f"\n(total {result['elapsed_s']:.0f} s)")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


def cpu_model(default: str) -> str:
    """The CPU's model name from /proc/cpuinfo, else ``default``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


@dataclass(frozen=True)
class ApiServer:
    """The API's gunicorn as ``LocalStack.start_api`` started it."""

    port: int
    proc: subprocess.Popen[bytes]
    argv: list[str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class LocalStack:
    """What one benchmark run started; stopped by ``local_stack`` on leaving."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.redis: RedisProcess | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._workers_started = False

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def env(self, host_name: str, **more: str) -> dict[str, str]:
        """This process's environment without its SAGELLM_* settings, pointed at this
        stack (its Redis, data dir and Prometheus multiprocess dir, as ``sagellm up``
        and docker-compose set it), then ``more``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGELLM_")}
        env.update(
            SAGELLM_REDIS_URL=self.redis_url,
            SAGELLM_DATA_DIR=str(self.tmp / "data"),
            SAGELLM_HOST_NAME=host_name,
            PROMETHEUS_MULTIPROC_DIR=str(self.tmp / "prometheus"),
        )
        env.update(more)
        return env

    def start(
        self, argv: list[str], env: dict[str, str] | None = None, log: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the repository root; its output goes to ``logs/<log>``, or
        (without ``log``) stdout is dropped and stderr is this process's."""
        if log is None:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        else:
            with (self.logs / log).open("ab") as out:
                proc = subprocess.Popen(
                    argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
                )
        self.procs.append(proc)
        return proc

    def start_api(
        self,
        env: dict[str, str],
        workers: int = 2,
        connections: int = 1000,
        worker_class: str | None = None,
        access_log: bool = False,
    ) -> ApiServer:
        """The API under gunicorn as production starts it, on a free port (not waited
        for); the knobs are ``gunicorn_argv``'s."""
        from app.dev.redis_server import free_port
        from app.dev.stack import API_WORKER_CLASS, gunicorn_argv

        port = free_port(HOST)
        argv = gunicorn_argv(
            f"{HOST}:{port}", workers, connections, worker_class or API_WORKER_CLASS, access_log
        )
        proc = self.start(argv, env, "api.log")
        return ApiServer(port, proc, argv, self.logs / "api.log")

    def start_cluster(self, env: dict[str, str], beat: bool = False) -> ApiServer:
        """The API, one ``sagellm worker`` for host ``SAGELLM_HOST_NAME`` and, with
        ``beat``, ``sagellm beat``; back once the worker's heartbeat is in Redis and
        the API answers."""
        from app.state.client import connect
        from app.state.registry import Registry

        sagellm = str(Path(sys.executable).parent / "sagellm")
        api = self.start_api(env)
        self._workers_started = True
        self.start([sagellm, "worker", "--loglevel", "info"], env, "worker.log")
        if beat:
            self.start([sagellm, "beat", "--loglevel", "info"], env, "beat.log")
        registry = Registry(connect(self.redis_url))
        host = env["SAGELLM_HOST_NAME"]
        wait_until(
            lambda: any(h.name == host and h.up for h in registry.hosts()),
            60,
            "the worker's heartbeat",
        )
        wait_http(f"{api.url}/health", 60, api.proc)
        return api

    def stop(self) -> None:
        """Stop what was started, last first; then its workers' engines, then Redis."""
        for proc in reversed(self.procs):
            stop_process(proc)
        if self._workers_started:
            self._kill_leftover_engines()
        if self.redis is not None:
            self.redis.stop()

    def _kill_leftover_engines(self) -> None:
        """Engines outlive their worker by design: kill those this stack's workers
        started (tagged with an owner under its data dir)."""
        import psutil

        owner = str(self.tmp / "data")
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
            except (psutil.Error, OSError):
                continue
            if env.get("SAGELLM_ENGINE_ID") and env.get("SAGELLM_ENGINE_OWNER", "").startswith(
                owner
            ):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


@contextlib.contextmanager
def local_stack(prefix: str, keep_logs: bool) -> Iterator[LocalStack]:
    """A ``LocalStack`` with its Redis started, in a new temp dir named ``prefix...``;
    all of it stopped on leaving, and the temp dir removed unless ``keep_logs``."""
    from app.dev.redis_server import RedisProcess

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    stack = LocalStack(tmp)
    stack.logs.mkdir()
    (tmp / "prometheus").mkdir()
    try:
        stack.redis = RedisProcess(tmp / "redis", persist=False).start()
        yield stack
    finally:
        stack.stop()
        if keep_logs:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
