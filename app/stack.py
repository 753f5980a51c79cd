"""``flask sagellm up``: the whole stack on one machine, supervised; ``down`` stops it.

Redis (the embedded ``redis-server`` unless ``SAGELLM_REDIS_URL`` is set), one worker
for this host, beat, and the API under gunicorn on 127.0.0.1:8000. Ctrl-C (or
``flask sagellm down``) stops the engines it runs, then the API, beat, worker and Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.redis_server import RedisProcess
from app.settings import Settings

API_BIND = "127.0.0.1:8000"
GUNICORN_TIMEOUT_S = 960  # a preset apply waits up to 900 s for its engines


def _script(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", name]


API_WORKER_CLASS = "app.wsgi_worker.ApiWorker"
# Seconds a keep-alive connection may sit idle between requests; longer than the
# 5 s httpx (and so the openai SDK) keeps idle connections, so clients close first.
API_KEEPALIVE_S = 20


def gunicorn_argv(
    bind: str = API_BIND,
    workers: int = 2,
    connections: int = 1000,
    worker_class: str = API_WORKER_CLASS,
    access_log: bool = False,
) -> list[str]:
    """The API server command (also used in docker-compose).

    The worker class is gevent-based (``app.wsgi_worker``: why, and what was measured).
    Each worker holds ``connections`` concurrent requests and streams; ``gthread``
    (for comparisons in ``bench/gateway.py``) gets that many threads instead.
    """
    argv = [
        *_script("gunicorn"),
        "--bind", bind,
        "--workers", str(workers),
        "--worker-class", worker_class,
        "--timeout", str(GUNICORN_TIMEOUT_S),
        "--graceful-timeout", "30",
        "--keep-alive", str(API_KEEPALIVE_S),
        # gunicorn 23+ opens a control socket in ~/.gunicorn by default; two servers on
        # one machine would share it.
        "--no-control-socket",
    ]  # fmt: skip
    if worker_class == "gthread":
        argv += ["--threads", str(connections)]
    else:
        argv += ["--worker-connections", str(connections)]
    if access_log:  # off by default: it costs CPU on every proxied request
        argv += ["--access-logfile", "-"]
    return [*argv, "app:create_app()"]


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    settings: Settings
    redis_url_given: bool
    api_bind: str = API_BIND
    keep_engines: bool = False
    redis: RedisProcess | None = None
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    @property
    def state_file(self) -> Path:
        return self.settings.data_dir / "stack.json"

    def _say(self, msg: str) -> None:
        print(f"[sagellm up] {msg}", flush=True)

    def _env(self, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SAGELLM_REDIS_URL"] = redis_url
        # gunicorn runs several API processes: /metrics sums them through this folder.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.settings.data_dir / "prometheus")
        env.setdefault("SAGELLM_API_URL", f"http://{self.api_bind}")
        return env

    def start(self) -> None:
        data = self.settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        if self.state_file.exists():
            old = json.loads(self.state_file.read_text())
            if _pid_alive(int(old.get("pid", 0))):
                raise RuntimeError(
                    f"a stack is already up (pid {old['pid']}); run `flask sagellm down` first"
                )
        redis_url = self.settings.redis_url
        if not self.redis_url_given:
            self.redis = RedisProcess(data / "redis", port=_redis_port()).start()
            redis_url = self.redis.url
            self._say(f"Redis {redis_url} (embedded, data in {data / 'redis'})")
        else:
            self._say(f"Redis {redis_url} (SAGELLM_REDIS_URL)")
        self._build_demo_model()
        env = self._env(redis_url)
        import shutil

        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)  # stale counts
        Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True)
        logs = data / "logs"
        self.children = [
            Child("worker", [*_script("sagellm"), "worker"], logs / "worker.log"),
            Child("beat", [*_script("sagellm"), "beat"], logs / "beat.log"),
            Child(
                "api",
                gunicorn_argv(
                    self.api_bind, self.settings.api_workers, self.settings.api_connections
                ),
                logs / "api.log",
            ),
        ]
        for child in self.children:
            child.start(env)
            self._say(
                f"{child.name} started (pid {child.proc.pid if child.proc else '?'}), "
                f"log {child.log}"
            )
        self.state_file.write_text(
            json.dumps(
                {"pid": os.getpid(), "redis_url": redis_url, "api": f"http://{self.api_bind}"}
            )
        )
        self._wait_api()
        self._say(f"API http://{self.api_bind}  docs http://{self.api_bind}/docs")
        cli = Path(sys.executable).parent / "sagellm"
        self._say(f"try: {cli} preset apply -n cpu-demo --yes   (Ctrl-C stops all)")

    def _build_demo_model(self) -> None:
        from app.core.presets import demo_llm_dir

        path = demo_llm_dir()
        try:
            from app.demo_model import ensure_demo_llm
        except ImportError:  # transformers not installed: cpu-demo's LLM is unavailable
            self._say("transformers not installed: the cpu-demo chat model is not built")
            return
        if not (path / "config.json").exists():
            self._say(f"building the tiny cpu-demo chat model in {path}")
        ensure_demo_llm(path)

    def _wait_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.api_bind}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            for child in self.children:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited at start; see {child.log}")
            time.sleep(0.3)
        raise RuntimeError(f"the API did not answer within {timeout:g}s; see its log")

    def supervise(self) -> None:
        """Restart a child that dies (with a short backoff) until asked to stop."""
        while not self.stopping:
            for child in self.children:
                if not self.stopping and not child.alive():
                    code = child.proc.returncode if child.proc else None
                    child.restarts += 1
                    delay = min(30, 2**child.restarts)
                    self._say(f"{child.name} exited ({code}); restarting in {delay}s")
                    time.sleep(delay)
                    if not self.stopping:
                        child.start(self._env(self._redis_url()))
            time.sleep(0.5)

    def _redis_url(self) -> str:
        return self.redis.url if self.redis else self.settings.redis_url

    def stop(self) -> None:
        self.stopping = True
        if not self.keep_engines:
            self._stop_engines()
        for child in reversed(self.children):  # api, beat, then the worker
            child.stop()
            self._say(f"{child.name} stopped")
        if self.redis:
            self.redis.stop()
            self._say("Redis stopped")
        self.state_file.unlink(missing_ok=True)

    def _stop_engines(self) -> None:
        api = f"http://{self.api_bind}/v1/management/engines"
        try:
            engines = httpx.get(api, timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return
        live = [e for e in engines if e["state"] not in ("STOPPED", "FAILED", "STOPPING")]
        for e in live:
            self._say(f"stopping engine {e['id']} ({e['spec']['model']})")
            httpx.delete(f"{api}/{e['id']}", timeout=10)
        deadline = time.monotonic() + self.settings.stop_grace_s + 15
        while live and time.monotonic() < deadline:
            states = {e["id"]: e["state"] for e in httpx.get(api, timeout=10).json()}
            live = [e for e in live if states.get(e["id"]) not in ("STOPPED", "FAILED", None)]
            time.sleep(0.5)


def _pid_alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    import psutil

    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _redis_port() -> int:
    """6379 when it is free (the default URL then works for every tool), else any."""
    from app.core.state.ledger import port_is_bindable
    from app.redis_server import free_port

    return 6379 if port_is_bindable("127.0.0.1", 6379) else free_port()


def api_bind(api_url: str) -> str:
    """host:port for the API server, from ``SAGELLM_API_URL`` (default 127.0.0.1:8000)."""
    from urllib.parse import urlsplit

    parts = urlsplit(api_url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 8000}"


def run_up(keep_engines: bool = False) -> None:
    settings = Settings.from_env()
    stack = Stack(
        settings,
        redis_url_given=bool(os.environ.get("SAGELLM_REDIS_URL")),
        api_bind=api_bind(settings.api_url),
        keep_engines=keep_engines,
    )

    def on_signal(signum: int, _: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        stack.supervise()
    except KeyboardInterrupt:
        print("", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()


def run_down(timeout: float = 120) -> bool:
    """Ask a running ``up`` to stop (it stops engines first); True if one was running."""
    settings = Settings.from_env()
    state = settings.data_dir / "stack.json"
    if not state.exists():
        return False
    pid = int(json.loads(state.read_text()).get("pid", 0))
    if not _pid_alive(pid):
        state.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    return True
