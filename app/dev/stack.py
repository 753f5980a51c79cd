"""``flask sagellm up``: the whole stack on one machine, supervised; ``down`` stops it.

Redis (the embedded ``redis-server`` unless ``SAGELLM_REDIS_URL`` is set), one worker
for this host, beat, and the API under gunicorn on 127.0.0.1:8000. Ctrl-C (or
``flask sagellm down``) stops the engines it runs, then the API, beat, worker and Redis.

Every child runs in a session of its own: Ctrl-C in the terminal (SIGINT to its
foreground process group) reaches ``up`` alone, which then stops things in order;
otherwise Redis would die first and the engines could no longer be stopped. Without
``SAGELLM_ADMIN_TOKEN``, ``up`` generates one (``app.api.auth.ensure_admin_token``), gives
it to the API, and uses it itself. What could not be stopped is reported, by ``up`` and
by ``down``, never hidden behind "stopped".
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

from app.dev.redis_server import RedisProcess
from app.settings import SETTINGS_DOC, Settings

API_BIND = "127.0.0.1:8000"
GUNICORN_TIMEOUT_S = 960  # a preset apply waits up to 900 s for its engines


def _script(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", name]


API_WORKER_CLASS = "app.gateway.server.ApiWorker"
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

    The worker class is gevent-based (``app.gateway.server``: why, and what was measured).
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
    terminated: bool = False  # SIGTERM sent to this run of it

    def start(self, env: dict[str, str]) -> None:
        self.terminated = False
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # Its own session (and process group, pgid == pid): see the module docstring.
            self.proc = subprocess.Popen(
                self.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to its process group (gunicorn's workers too), once: a second one
        could cut its clean exit short (beat releasing its lock). ``stop`` waits."""
        if self.proc is not None and self.alive() and not self.terminated:
            self.terminated = True
            _killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30) -> str | None:
        """``terminate``, then SIGKILL after ``timeout``; None when all of it is gone,
        else why not."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.alive():
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    return f"{self.name} (pid {pgid}) did not exit after SIGKILL"
        # Members of its group that outlived it (a gunicorn worker): the group id stays
        # taken while any member lives, so it still names only ours.
        _killpg(pgid, signal.SIGKILL)
        return None


def _killpg(pgid: int, sig: int) -> None:
    try:
        if pgid != os.getpgrp():
            os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Stack:
    settings: Settings
    redis_url_given: bool
    api_bind: str = API_BIND
    keep_engines: bool = False
    admin_token: str = ""
    redis: RedisProcess | None = None
    children: list[Child] = field(default_factory=list)
    demo_build: subprocess.Popen[bytes] | None = None
    stopping: bool = False

    @property
    def state_file(self) -> Path:
        return self.settings.data_dir / "stack.json"

    def _say(self, msg: str) -> None:
        print(f"[sagellm up] {msg}", flush=True)

    @property
    def metrics_dir(self) -> Path:
        return self.settings.data_dir / "prometheus"

    def child_env(self, name: str, redis_url: str) -> dict[str, str]:
        """The environment of one child. Only the API gets the admin token and the
        metrics folder: the worker hands its environment on to engines (vLLM's own
        metrics would land in the API's /metrics), and neither it nor beat needs them."""
        env = dict(os.environ)
        for var in ("PROMETHEUS_MULTIPROC_DIR", "SAGELLM_ADMIN_TOKEN", "SAGELLM_API_KEYS"):
            env.pop(var, None)
        env["SAGELLM_REDIS_URL"] = redis_url
        env.setdefault("SAGELLM_API_URL", f"http://{self.api_bind}")
        if name == "api":
            # gunicorn runs several API processes: /metrics sums them through this folder.
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
            env["SAGELLM_ADMIN_TOKEN"] = self.admin_token
            if os.environ.get("SAGELLM_API_KEYS"):
                env["SAGELLM_API_KEYS"] = os.environ["SAGELLM_API_KEYS"]
        return env

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def _ensure_admin_token(self) -> None:
        """Use SAGELLM_ADMIN_TOKEN, else the one kept for this machine (made once)."""
        if self.admin_token:
            return
        from app.api.auth import admin_token_path, ensure_admin_token

        self.admin_token, created = ensure_admin_token(self.settings.data_dir)
        path = admin_token_path(self.settings.data_dir)
        if created:
            self._say(
                f"generated an admin token (kept in {path}, mode 0600; the CLI on this "
                f"machine reads it): {self.admin_token}"
            )
        else:
            self._say(f"admin token: {path}")

    def start(self) -> None:
        data = self.settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        if self.state_file.exists():
            old = json.loads(self.state_file.read_text())
            if _pid_alive(int(old.get("pid", 0))):
                raise RuntimeError(
                    f"a stack is already up (pid {old['pid']}); run `flask sagellm down` first"
                )
        self._ensure_admin_token()
        redis_url = self.settings.redis_url
        if not self.redis_url_given:
            self.redis = RedisProcess(data / "redis", port=_redis_port(), own_session=True)
            self.redis.start()
            redis_url = self.redis.url
            self._say(f"Redis {redis_url} (embedded, data in {data / 'redis'})")
        else:
            self._say(f"Redis {redis_url} (SAGELLM_REDIS_URL)")
        self._start_demo_model_build()
        import shutil

        shutil.rmtree(self.metrics_dir, ignore_errors=True)  # stale counts
        self.metrics_dir.mkdir(parents=True)
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
            if child.name == "api":
                # The worker and beat boot while the model builds; the API answers once
                # the cpu-demo preset can run.
                self._finish_demo_model_build()
            child.start(self.child_env(child.name, redis_url))
            self._say(
                f"{child.name} started (pid {child.proc.pid if child.proc else '?'}), "
                f"log {child.log}"
            )
        self._write_state({"redis_url": redis_url, "api": f"http://{self.api_bind}"})
        self._wait_api()
        self._say(f"API http://{self.api_bind}  docs http://{self.api_bind}/docs")
        cli = Path(sys.executable).parent / "sagellm"
        self._say(f"try: {cli} preset apply -n cpu-demo --yes   (Ctrl-C stops all)")

    def _start_demo_model_build(self) -> None:
        """Build the tiny cpu-demo chat model, unless it is built, in a process of its
        own: torch and transformers take seconds to import and to unload at exit, and
        ``up``, which lives as long as the stack, has no other use for them."""
        import importlib.util

        from app.dev.demo_model import demo_llm_is_built
        from app.services.preset_files import demo_llm_dir

        path = demo_llm_dir(self.settings.data_dir)
        if demo_llm_is_built(path):
            return
        if importlib.util.find_spec("transformers") is None:
            self._say("transformers not installed: the cpu-demo chat model is not built")
            return
        self._say(f"building the tiny cpu-demo chat model in {path}")
        # A session of its own, as the children's: Ctrl-C reaches `up`, which stops it.
        self.demo_build = subprocess.Popen(
            [sys.executable, "-m", "app.dev.demo_model", str(path)], start_new_session=True
        )

    def _finish_demo_model_build(self) -> None:
        if self.demo_build is None:
            return
        code = self.demo_build.wait()
        self.demo_build = None
        if code != 0:  # as without transformers: the stack runs, cpu-demo's LLM does not
            self._say(f"ERROR: building the cpu-demo chat model failed (exit {code}); see above")

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
                        child.start(self.child_env(child.name, self._redis_url()))
            time.sleep(0.5)

    def _redis_url(self) -> str:
        return self.redis.url if self.redis else self.settings.redis_url

    def _write_state(self, extra: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps({"pid": os.getpid(), **extra}))

    def stop(self) -> list[str]:
        """Engines (unless ``keep_engines``), then the API and beat, the worker, Redis.
        Returns what went wrong (also printed, and left in the state file for `down`)."""
        self.stopping = True
        self._say("stopping")
        errors: list[str] = []
        if self.demo_build is not None:  # stopped while it built: a rebuild starts over
            self.demo_build.kill()
            self.demo_build.wait()
        # Engines are stopped through the API. Stopped before it started (while the
        # model built), `up` started none, and leaves any as the last `up` left them.
        api_started = any(c.name == "api" and c.proc is not None for c in self.children)
        if not self.keep_engines and api_started:
            errors += self._stop_engines()
        # The API and beat, which send the worker tasks, together; then the worker.
        senders = [c for c in reversed(self.children) if c.name != "worker"]
        for child in senders:
            child.terminate()
        for child in [*senders, *(c for c in self.children if c not in senders)]:
            if child.proc is None:  # stopped before it started (while the model built)
                continue
            error = child.stop()
            if error:
                errors.append(error)
            self._say(error if error else f"{child.name} stopped")
        if self.redis:
            self.redis.stop()
            self._say("Redis stopped")
        for error in errors:
            self._say(f"ERROR: {error}")
        if errors:
            self._write_state({"stopped": True, "errors": errors})
        else:
            self.state_file.unlink(missing_ok=True)
        return errors

    def _stop_engines(self) -> list[str]:
        """Stop every engine through the API (so their records say STOPPED and the next
        `up` does not start them again); what cannot be stopped so is stopped directly."""
        try:
            return self._stop_engines_through_api()
        except (httpx.HTTPError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            reason = f"could not stop the engines through the API ({exc})"
            self._say(f"{reason}; stopping their processes directly")
            left = self._stop_engine_processes()
            if left:
                return [f"{reason}; still running: {', '.join(left)}"]
            return [
                f"{reason}; their processes were stopped directly, but their records still "
                "say they run: the next `up` starts them again unless you "
                "`sagellm engine stop` them"
            ]

    def _api_json(self, method: str, path: str) -> Any:
        url = f"http://{self.api_bind}/v1/management{path}"
        resp = httpx.request(method, url, headers=self._auth(), timeout=30)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()

    def _stop_engines_through_api(self) -> list[str]:
        engines = self._api_json("GET", "/engines")
        if not isinstance(engines, list):
            raise RuntimeError(f"GET /engines: unexpected answer {str(engines)[:200]}")
        # Ours: the engines of this host (a shared Redis may hold other hosts' engines).
        mine = [e for e in engines if e.get("host") == self.settings.host_name]
        live = [e for e in mine if e["state"] not in ("STOPPED", "FAILED")]
        for e in live:
            if e["state"] != "STOPPING":
                self._say(f"stopping engine {e['id']} ({e['spec']['model']})")
                self._api_json("DELETE", f"/engines/{e['id']}")
        deadline = time.monotonic() + self.settings.stop_grace_s + 15
        while live and time.monotonic() < deadline:
            time.sleep(0.5)
            states = {e["id"]: e["state"] for e in self._api_json("GET", "/engines")}
            live = [e for e in live if states.get(e["id"]) not in ("STOPPED", "FAILED", None)]
        if live:
            return [
                f"engine {e['id']} did not stop within {self.settings.stop_grace_s + 15:g}s"
                for e in live
            ]
        return []

    def _stop_engine_processes(self) -> list[str]:
        """Engines whose processes carry this stack's data folder, stopped by the one
        module that signals engines (``workers.host.processes``: ours only)."""
        import psutil

        from app.core.engine_policy import ENGINE_HOST_ENV
        from workers.host import processes

        left = []
        for engine_id, found in processes.find_tagged_processes().items():
            try:
                env = psutil.Process(found.pid).environ()
            except (psutil.Error, OSError):
                continue
            data_dir = env.get("SAGELLM_DATA_DIR") or SETTINGS_DOC["SAGELLM_DATA_DIR"][0]
            host = env.get(ENGINE_HOST_ENV, self.settings.host_name)
            if Path(data_dir).expanduser() != self.settings.data_dir:
                continue
            if host != self.settings.host_name:
                continue
            self._say(f"stopping engine {engine_id} (pid {found.pid}) directly")
            try:
                result = processes.stop(
                    found.pid, found.create_time, self.settings.stop_grace_s, engine_id=engine_id
                )
            except processes.NotOurProcess as exc:
                left.append(f"{engine_id} ({exc.message})")
                continue
            if not result.exited:
                left.append(f"{engine_id} (pid {found.pid})")
        return left


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
    from app.dev.redis_server import free_port
    from app.state.ledger import port_is_bindable

    return 6379 if port_is_bindable("127.0.0.1", 6379) else free_port()


def api_listen_host(api_url: str) -> str:
    """The address the API listens on: the host of ``SAGELLM_API_URL``."""
    from urllib.parse import urlsplit

    return urlsplit(api_url).hostname or "127.0.0.1"


def api_bind(api_url: str) -> str:
    """host:port for the API server, from ``SAGELLM_API_URL`` (default 127.0.0.1:8000)."""
    from urllib.parse import urlsplit

    host = api_listen_host(api_url)
    port = urlsplit(api_url).port or 8000
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_up(keep_engines: bool = False) -> list[str]:
    """Run the stack until Ctrl-C or `down`; returns what could not be stopped."""
    settings = Settings.from_env()
    stack = Stack(
        settings,
        redis_url_given=bool(os.environ.get("SAGELLM_REDIS_URL")),
        api_bind=api_bind(settings.api_url),
        keep_engines=keep_engines,
        admin_token=settings.admin_token,
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
        errors = stack.stop()
    return errors


class StackNotStopped(RuntimeError):
    """`down` asked, but something `up` started is still running."""


def run_down(timeout: float = 120) -> bool:
    """Ask a running ``up`` to stop (it stops engines first) and wait for it; True if
    one was running. Raises ``StackNotStopped`` with what `up` reported it could not
    stop, or when it did not exit within ``timeout``."""
    settings = Settings.from_env()
    state = settings.data_dir / "stack.json"
    if not state.exists():
        return False
    pid = int(json.loads(state.read_text()).get("pid", 0))
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.3)
        if _pid_alive(pid):
            raise StackNotStopped(f"`sagellm up` (pid {pid}) did not exit within {timeout:g}s")
        was_running = True
    else:
        was_running = False
    try:
        last = json.loads(state.read_text()) if state.exists() else {}
    except ValueError:
        last = {}
    errors = last.get("errors") or []
    state.unlink(missing_ok=True)
    if errors:
        # Reported once, by the `down` after the `up` that could not stop them.
        raise StackNotStopped("the stack stopped with errors:\n  " + "\n  ".join(errors))
    return was_running
