"""One request's walk, traced: ``POST /v1/management/engines?wait=true`` until RUNNING
passes api -> services -> dispatch -> worker task -> agent -> host/runtimes, entering
each layer in that order, and no call goes back up the chain (ARCHITECTURE.md, "One
request's walk").

Everything is real except Celery's transport: the Flask app answers the POST, Redis is
a real ``redis-server``, the task is run by the real ``workers.tasks.start_engine``, the
worker's engine watch sees the stand-in ``vllm`` process become ready. The profiler
records every call between two of our modules, in every thread.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from app import create_app
from app.settings import Settings
from app.state.client import connect
from tests.integration.inproc import (
    InprocHost,
    TaskQueue,
    host_settings,
    kill_all_engines,
    use_fake_engines,
)

pytestmark = pytest.mark.integration

# The chain, top to bottom. ``core``, ``state`` and ``settings`` are the floor every
# layer may stand on; they call nothing above them.
CHAIN = ("api", "services", "dispatch", "task", "agent", "host")
FLOOR = ("core", "state", "settings")


def layer_of(module: str) -> str | None:
    """The layer a module belongs to; None for code that is not ours."""
    if module == "app.state.queues":
        return "dispatch"
    prefixes = (
        ("app.api.", "api"),
        ("app.services.", "services"),
        ("app.core.", "core"),
        ("app.state.", "state"),
        ("app.settings", "settings"),
        ("workers.tasks", "task"),
        ("workers.agent.", "agent"),
        ("workers.host.", "host"),
        ("workers.runtimes.", "host"),
    )
    for prefix, layer in prefixes:
        if module.startswith(prefix):
            return layer
    return None


def _is_callback(frame: FrameType) -> bool:
    """A lambda or nested function handed down as a value (a record mutation given to
    the registry): it runs in its creator's layer, by that layer's choice."""
    code = frame.f_code
    return code.co_name == "<lambda>" or "<locals>" in code.co_qualname


@dataclass
class Trace:
    edges: set[tuple[str, str, str, str]] = field(default_factory=set)  # caller, callee
    entered: list[str] = field(default_factory=list)  # layers in order of first call
    lock: threading.Lock = field(default_factory=threading.Lock)

    def profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        callee = layer_of(module)
        if callee is None:
            return
        with self.lock:
            if callee not in self.entered:
                self.entered.append(callee)
        caller_frame = frame.f_back
        while (
            caller_frame is not None
            and layer_of(caller_frame.f_globals.get("__name__", "")) is None
        ):
            caller_frame = caller_frame.f_back  # through library code (Flask, threading)
        if caller_frame is None or _is_callback(frame):
            return
        caller_module = caller_frame.f_globals.get("__name__", "")
        caller = layer_of(caller_module)
        assert caller is not None
        if caller != callee:
            with self.lock:
                self.edges.add((caller, callee, caller_module, f"{module}.{frame.f_code.co_name}"))

    def upward(self) -> list[tuple[str, str, str, str]]:
        """Calls from a layer into one above it in the chain, or from the floor up."""
        bad = []
        for caller, callee, where, what in sorted(self.edges):
            if callee in FLOOR:
                continue
            if caller in FLOOR or CHAIN.index(callee) < CHAIN.index(caller):
                bad.append((caller, callee, where, what))
        return bad


def test_upward_calls_are_found() -> None:
    trace = Trace()
    trace.edges |= {
        ("services", "state", "app.services.engines", "app.state.registry.create"),
        ("agent", "services", "workers.agent.lifecycle", "app.services.engines.start_engine"),
        ("state", "agent", "app.state.registry", "workers.agent.supervise.check_start"),
    }
    assert [(a, b) for a, b, _, _ in trace.upward()] == [("agent", "services"), ("state", "agent")]


@pytest.fixture
def cluster(redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    use_fake_engines(monkeypatch, workers=0, rename=False)
    client = connect(redis_server.url)
    client.flushall()
    name = f"walk-{uuid.uuid4().hex[:6]}"
    queue = TaskQueue()
    settings = host_settings(name, "127.0.0.1", "1x80", "18640-18659", tmp_path, redis_server.url)
    host = InprocHost(settings, queue)
    host.heartbeat()
    api_settings = Settings.from_env(
        {"SAGELLM_REDIS_URL": redis_server.url, "SAGELLM_HOST_NAME": "api"}
    )
    app = create_app(api_settings, celery=queue)
    app.testing = True
    try:
        yield app.test_client(), host, queue
    finally:
        if host.ctx.watch is not None:
            host.ctx.watch.stop()  # type: ignore[attr-defined]
        kill_all_engines()
        client.flushall()
        client.close()


def test_a_start_walks_down_the_layers_once_and_never_calls_back_up(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import tasks
    from workers.agent import context
    from workers.agent.watch import EngineWatch

    api, host, queue = cluster
    monkeypatch.setattr(context, "_ctx", host.ctx)  # the worker process's context
    trace = Trace()
    answer: dict[str, Any] = {}

    def post() -> None:
        resp = api.post(
            "/v1/management/engines?wait=true&timeout=60",
            json={"model": "org/walk", "required_memory_gb": 4, "host": host.name},
        )
        answer["status"], answer["body"] = resp.status_code, resp.get_json()

    sys.setprofile(trace.profile)
    threading.setprofile(trace.profile)
    try:
        host.ctx.watch = EngineWatch(host.ctx).start()  # the worker's watch, as at boot
        trace.entered.clear()  # the walk starts with the request
        request = threading.Thread(target=post)
        request.start()
        deadline = time.monotonic() + 30
        while not queue.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.sent, answer  # the API queued the start for the host's worker
        sent = queue.take(0)
        assert (sent.host, sent.task) == (host.name, "sagellm.start_engine")
        worker = threading.Thread(target=tasks.start_engine, args=sent.args)  # Celery's pool
        worker.start()
        worker.join(60)
        request.join(90)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)

    assert answer.get("status") in (200, 201), answer
    assert answer["body"]["engine"]["state"] == "RUNNING", answer
    walk = [layer for layer in trace.entered if layer in CHAIN]
    assert walk == list(CHAIN), trace.entered
    assert trace.upward() == [], "calls back up the chain:\n" + "\n".join(
        f"  {caller} -> {callee}: {where} calls {what}"
        for caller, callee, where, what in trace.upward()
    )
