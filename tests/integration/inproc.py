"""Hosts driven step by step in the test process, for interleaving and fault tests.

Each ``InprocHost`` is a real worker's ``HostContext`` (real redis-server, real engine
processes: the stand-in ``vllm``), except that Celery is replaced by ``TaskQueue``: a
task sent to a host is kept until the test delivers it (once, twice, or never: Redis'
emulated acks redeliver, expiry drops). The test decides the interleaving; the code
under test is the production code (``app.services.engines``, ``workers.agent.lifecycle``,
``workers.agent.supervise``, ``workers.agent.reconcile``, ``workers.beat_scheduler``).

``check_invariants`` states, in one place, what must hold after every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import redis

from app.core.engine_policy import ENGINE_ID_ENV
from app.core.models import EngineState
from app.services.cluster import Cluster
from app.settings import Settings
from app.state import keys
from app.state.ledger import Ledger
from app.state.registry import Registry
from workers.agent import lifecycle, supervise
from workers.agent.context import HostContext, build_context
from workers.host import processes


def _inline(run: Callable[[], None], _name: str) -> None:
    run()


REPO = Path(__file__).resolve().parents[2]
FAKES = REPO / "tests" / "fakes"
S = EngineState
HOST_ENV = "SAGELLM_ENGINE_HOST"


@dataclass
class Sent:
    host: str
    task: str
    args: tuple[Any, ...]


@dataclass
class TaskQueue:
    """Stands in for Celery: records what the code sends, delivered by the test."""

    sent: list[Sent] = field(default_factory=list)

    def send_task(self, name: str, args: tuple[Any, ...] = (), queue: Any = None, **_: Any) -> Any:
        host = str(queue.name).removeprefix("host.") if queue is not None else "control"
        self.sent.append(Sent(host, name, tuple(args)))
        return SimpleNamespace(id=uuid.uuid4().hex)

    def take(self, index: int) -> Sent:
        return self.sent.pop(index)


def deliver(ctx: HostContext, task: Sent) -> None:
    """Run one task on its host as ``workers.tasks`` would."""
    eid = task.args[0] if task.args else None
    if task.task == "sagellm.start_engine":
        lifecycle.spawn_engine(ctx, eid)
    elif task.task == "sagellm.stop_engine":
        lifecycle.stop_engine(ctx, eid)
    elif task.task == "sagellm.restart_engine":
        rec = ctx.registry.find(eid)
        if rec is not None and rec.restart_pending:
            lifecycle.spawn_engine(ctx, eid)
    elif task.task == "sagellm.restart_engine_now":
        supervise.manual_restart(ctx, eid)
    elif task.task == "sagellm.watch_start":
        supervise.check_start(ctx, eid)


def host_settings(
    name: str, address: str, gpus: str, ports: str, data_dir: Path, redis_url: str
) -> Settings:
    env = {
        "SAGELLM_REDIS_URL": redis_url,
        "SAGELLM_HOST_NAME": name,
        "SAGELLM_HOST_ADDRESS": address,
        "SAGELLM_MOCK_GPUS": gpus,
        "SAGELLM_PORT_RANGE": ports,
        "SAGELLM_DATA_DIR": str(data_dir),
        "SAGELLM_GPU_SAFETY_MARGIN_GB": "1",
        "SAGELLM_HEARTBEAT_INTERVAL_S": "1",
        "SAGELLM_HEARTBEAT_TTL_S": "600",  # the test says when a host is down
        "SAGELLM_HEALTH_TIMEOUT_S": "0.5",
        "SAGELLM_RESTART_BACKOFF_S": "0",
        "SAGELLM_RESTART_BACKOFF_MAX_S": "0",
        "SAGELLM_MAX_RESTARTS": "2",
        "SAGELLM_STOP_GRACE_S": "2",
        "SAGELLM_START_TIMEOUT_S": "30",
    }
    return Settings.from_env(env)


@dataclass
class InprocHost:
    settings: Settings
    queue: TaskQueue
    ctx: HostContext = field(init=False)

    def __post_init__(self) -> None:
        self.restart_worker()

    @property
    def name(self) -> str:
        return self.settings.host_name

    def restart_worker(self) -> None:
        """A new worker process for this host: nothing in memory survives (locks,
        child table); engines keep running, as after kill -9 of a real worker."""
        self.ctx = build_context(self.settings, self.queue)  # type: ignore[arg-type]
        # A stop that drains waits in the calling thread here (a worker watches in a
        # thread of its own): the test decides the interleaving, and no thread outlives
        # its step.
        self.ctx.drain_runner = _inline

    def heartbeat(self) -> None:
        from workers.agent.reconcile import heartbeat_or_rediscover

        heartbeat_or_rediscover(self.ctx)

    def down(self) -> None:
        """The host's heartbeat expires (worker gone, network cut)."""
        self.ctx.registry.r.delete(keys.host(self.name))


def use_fake_engines(monkeypatch: Any, *, workers: int = 1, rename: bool = True) -> None:
    """Engines of this test are the stand-in ``vllm`` (first on PATH), run by our
    python (it has setproctitle, which its renamed workers need), with ``workers``
    tensor-parallel-like children that wipe their tag when ``rename``; tagged with a
    run id so ``tagged_processes`` sees only this test's engines."""
    path = os.pathsep.join([str(FAKES), os.path.dirname(sys.executable), os.environ["PATH"]])
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("FAKE_VLLM_WORKERS", str(workers))
    if rename:
        monkeypatch.setenv("FAKE_VLLM_RENAME", "1")
    else:
        monkeypatch.delenv("FAKE_VLLM_RENAME", raising=False)
    monkeypatch.setenv("FAKE_VLLM_TEST_RUN", uuid.uuid4().hex)


def cluster_of(client: redis.Redis, settings: Settings, queue: TaskQueue) -> Cluster:
    return Cluster(settings, Registry(client), Ledger(client), queue)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- processes


def tagged_processes() -> dict[int, tuple[str, str | None]]:
    """pid -> (engine id, host) of every live process carrying our tag."""
    out: dict[int, tuple[str, str | None]] = {}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        eid = env.get(ENGINE_ID_ENV)
        if eid and env.get("FAKE_VLLM_TEST_RUN") == os.environ.get("FAKE_VLLM_TEST_RUN"):
            out[proc.pid] = (eid, env.get(HOST_ENV))
    return out


# Leader (pid, create time) -> engine id of every engine session seen in this run: a
# renamed worker (setproctitle wiped its tag) is still known by the session its leader
# opened. The create time tells a reused pid (a new session of another program) apart.
SESSIONS: dict[int, tuple[float, str]] = {}


def engine_sessions() -> dict[str, dict[int, list[int]]]:
    """engine id -> {session id: live pids}: tagged processes and every live member of
    a session an engine's leader opened, even after the leader died."""
    for pid, (eid, _host) in tagged_processes().items():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(pid) == pid:
                SESSIONS[pid] = (psutil.Process(pid).create_time(), eid)
    out: dict[str, dict[int, list[int]]] = {}
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            sid = os.getsid(proc.pid)
        except OSError:
            continue
        known = SESSIONS.get(sid)
        if known is None or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        born, eid = known
        if proc.info["create_time"] < born - 0.01 or (
            proc.pid == sid and abs(proc.info["create_time"] - born) > 0.01
        ):
            continue  # the pid was handed out again: another program's session
        out.setdefault(eid, {}).setdefault(sid, []).append(proc.pid)
    return out


def kill_all_engines() -> None:
    """SIGKILL every engine process of this test run (and its group and session)."""
    victims = set(tagged_processes())
    for sessions in engine_sessions().values():
        for members in sessions.values():
            victims.update(members)
    for pid in victims:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    processes.reap_children()


# ------------------------------------------------------------------------- invariants


def ledger_snapshot(client: redis.Redis) -> dict[str, Any]:
    """Every ledger key, read in one MULTI (an atomic snapshot)."""
    names = sorted(k.decode() for k in client.scan_iter(match=keys.PREFIX + "ledger:*", count=1000))
    pipe = client.pipeline(transaction=True)
    for name in names:
        pipe.type(name)
    types = pipe.execute()
    pipe = client.pipeline(transaction=True)
    for name, t in zip(names, types, strict=True):
        if t == b"hash":
            pipe.hgetall(name)
        elif t == b"set":
            pipe.smembers(name)
        else:
            pipe.get(name)
    return dict(zip(names, pipe.execute(), strict=True))


def check_invariants(
    client: redis.Redis, hosts: dict[str, InprocHost], margin_mib: int, *, settled: bool = False
) -> None:
    """What must hold after every step (issue 10). ``settled``: after rediscovery and a
    health pass on every live host, also every process has a record that owns it."""
    snap = ledger_snapshot(client)
    reg = Registry(client)
    records = {r.id: r for r in reg.engines()}
    # 1. For every GPU: reservations + outside + margin <= total.
    for name in hosts:
        caps = snap.get(keys.gpu_capacity(name)) or {}
        for uuid_b, raw in caps.items():
            cap = json.loads(raw)
            held = snap.get(keys.gpu_reservations(name, uuid_b.decode())) or {}
            reserved = sum(int(v) for v in held.values())
            assert reserved + cap["outside_mib"] + margin_mib <= cap["total_mib"], (
                f"over-commit on {name} GPU {cap['index']}: {held} + outside "
                f"{cap['outside_mib']} + margin {margin_mib} > {cap['total_mib']}"
            )
    # 2. One port, one engine (per host), and it is the holder's reservation's port.
    for name in hosts:
        ports = snap.get(keys.port_reservations(name)) or {}
        holders = [v.decode() for v in ports.values()]
        assert len(holders) == len(set(holders)), f"an engine holds two ports on {name}: {ports}"
    # 3. Every reservation belongs to a record that is not over, on that host.
    led = Ledger(client)
    for eid in led.reserved_engines() | {
        k.removeprefix(keys.engine_reservation(""))
        for k in snap
        if k.startswith(keys.engine_reservation(""))
    }:
        res = led.reservation(eid)
        if res is None:
            continue
        rec = records.get(eid)
        assert rec is not None, f"reservation of {eid} on {res.host} has no record"
        assert not rec.owns_nothing, f"{eid} is {rec.state.value} but holds {res}"
        assert rec.host == res.host and rec.port == res.port, (
            f"{eid}: record {rec.host}:{rec.port} vs {res}"
        )
    # 4. Live processes (tagged, or members of a session an engine's leader opened, as
    #    renamed workers are): no engine has two trees; an ended engine has none; a live
    #    record with a live process holds exactly its reservation.
    for eid, sessions in engine_sessions().items():
        sids = set(sessions)
        assert len(sids) == 1, f"engine {eid} has {len(sids)} process trees: {sessions}"
        rec = records.get(eid)
        if rec is not None and rec.owns_nothing:
            raise AssertionError(
                f"engine {eid} is {rec.state.value} but its processes {sessions} live"
            )
        if rec is not None and rec.pid is not None and rec.pid not in sids:
            raise AssertionError(f"engine {eid} runs as {rec.pid}, yet {sessions} live")
        if rec is not None and rec.evicted_for is not None:
            # It handed its room to another engine (eviction) and is on its way out:
            # it holds none, and that engine has no process while this one lives.
            assert led.reservation(eid) is None, f"evicted {eid} still holds room"
            heir = records.get(rec.evicted_for)
            heir_live = engine_sessions().get(rec.evicted_for)
            assert not (heir is not None and heir_live and eid in heir.waits_for), (
                f"{rec.evicted_for} runs while {eid}, which it evicted, still lives"
            )
        elif rec is not None and rec.state is not S.STOPPING and not rec.reservation_error:
            res = led.reservation(eid)
            assert res is not None, f"engine {eid} ({rec.state.value}) runs with no reservation"
            assert res.gpus == tuple((g.uuid, g.memory_mib) for g in rec.gpus), (eid, res, rec.gpus)
        if settled:
            assert rec is not None, f"engine processes {sessions} of {eid} run with no record"
            assert rec.pid in sids, f"engine {eid}: record pid {rec.pid}, processes {sessions}"


def wait_for(pred: Callable[[], bool], timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
