"""Fault injection on every Redis write of the engine paths (issue 10).

Each path — start, stop (of a RUNNING and of a PENDING engine), restart (asked for,
of a FAILED engine, and automatic after ``kill -9``), re-adoption after ``FLUSHALL``,
prune — runs from a clean Redis and no engine processes on an in-process host
(``inproc``: real redis-server, real engine processes, the test's task queue). A
dry run counts the path's Redis writes (``WRITES`` lists them; ``test_write_count``
checks the list is still right); then the path runs once per write position ``k``
with a connection error at exactly that write (``faults.FaultInjector``), either
before it is sent (the write is lost) or after it executed (the reply is lost). The
error may escape the step (the task or API call fails); the test catches it and goes
on as the cluster would (queued tasks are still delivered, the health loop still
ticks). Then, with faults off, the next rediscovery cycle runs (rediscover, health
check, pending tasks, rediscover), and:

* ``inproc.check_invariants(..., settled=True)`` holds;
* nothing is leaked: every reservation (and every GPU / port entry) belongs to a
  record that is not over; every engine process belongs to a live record that names
  it; no manifest is left for a record that is gone or over.

Then time passes (the health loop's late start of a PENDING engine whose start task
was lost, starts finishing) and each engine must end where its path, or the refused
API call, leaves it (``Scenario.settles``): nothing stuck half-way.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services.cluster import Cluster
from app.services.engines import restart_engine, start_engine, stop_engine
from app.state import keys
from app.state.client import as_text, connect
from app.state.ledger import Ledger
from app.state.prune import prune_records
from app.state.registry import Registry
from tests.integration.faults import FaultInjector, InjectedFault, Mode
from tests.integration.inproc import (
    InprocHost,
    TaskQueue,
    check_invariants,
    cluster_of,
    deliver,
    host_settings,
    kill_all_engines,
    tagged_processes,
    use_fake_engines,
    wait_for,
)
from workers.agent import lifecycle, supervise
from workers.agent.reconcile import rediscover

pytestmark = pytest.mark.integration
S = EngineState
MARGIN_MIB = 1024
ADDRESS, GPUS, PORTS = "127.0.0.9", "2x24", "18900-18909"
MAX_POSITIONS = 8  # write positions tried per path (evenly spread when there are more)
START_WAIT_S = 60.0  # a deadline, not a target: the engines start in ~1 s on a quiet machine


@dataclass
class FaultEnv:
    client: redis.Redis  # plain: the test's own reads and setup writes
    injector: FaultInjector
    host: InprocHost
    cluster: Cluster
    queue: TaskQueue
    errors: list[str] = field(default_factory=list)  # steps that failed (injected)

    @property
    def hosts(self) -> dict[str, InprocHost]:
        return {self.host.name: self.host}

    @property
    def ctx(self) -> Any:
        return self.host.ctx

    def writes(self) -> list[str]:
        """The writes since the injector was armed, the host's name spelt ``{host}``."""
        return [w.replace(self.host.name, "{host}") for w in self.injector.writes]

    def spec(self, gb: float = 4) -> EngineSpec:
        return EngineSpec(model="org/m", required_memory_gb=gb, host=self.host.name)

    def record(self, eid: str) -> EngineRecord | None:
        return Registry(self.client).find(eid)

    def engines(self) -> list[EngineRecord]:
        return Registry(self.client).engines()


# ----------------------------------------------------------------------------- steps


def step(env: FaultEnv, name: str, fn: Callable[[], Any]) -> Any:
    """Run one step of the path; the injected error may escape it (the task or API
    call failed): noted, and the path goes on. Any other error fails the test."""
    try:
        return fn()
    except InjectedFault as exc:
        env.errors.append(f"{name}: {exc}")
        return None


def deliver_all(env: FaultEnv) -> None:
    """Deliver every queued task once (readiness watches: the health loop does that)."""
    while env.queue.sent:
        task = env.queue.take(0)
        if task.task != "sagellm.watch_start":
            step(env, task.task, lambda t=task: deliver(env.ctx, t))  # type: ignore[misc]


def health_until_started(env: FaultEnv, timeout_s: float = START_WAIT_S) -> None:
    """Health ticks until no engine of the host is STARTING (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        step(env, "check_host", lambda: supervise.check_host(env.ctx))
        if not any(r.state is S.STARTING for r in env.engines()):
            return
        time.sleep(0.05)


def start_running(env: FaultEnv) -> EngineRecord:
    """Setup (no faults): one RUNNING engine."""
    rec = start_engine(env.cluster, env.spec())
    deliver_all(env)
    health_until_started(env)
    now = env.record(rec.id)
    assert now is not None and now.state is S.RUNNING, now
    return now


def kill9(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).kill()
    assert wait_for(lambda: not _running(pid), 5)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def next_cycle(env: FaultEnv) -> None:
    """The next rediscovery cycle, faults off: rediscover, health check, the tasks
    these send, rediscover again."""
    env.injector.disarm()
    rediscover(env.ctx)
    supervise.check_host(env.ctx)
    while env.queue.sent:
        task = env.queue.take(0)
        if task.task != "sagellm.watch_start":
            deliver(env.ctx, task)
    rediscover(env.ctx)


def later(env: FaultEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Time passes (faults off): the health loop starts engines whose start task was
    lost (``PENDING_GRACE_S``, here at once), starts finish, rediscovery runs."""
    monkeypatch.setattr(supervise, "PENDING_GRACE_S", 0.0)
    supervise.check_host(env.ctx)
    while env.queue.sent:
        task = env.queue.take(0)
        if task.task != "sagellm.watch_start":
            deliver(env.ctx, task)
    deadline = time.monotonic() + START_WAIT_S
    while any(r.state is S.STARTING for r in env.engines()) and time.monotonic() < deadline:
        supervise.check_host(env.ctx)
        time.sleep(0.05)
    rediscover(env.ctx)


# ----------------------------------------------------------------------------- paths
# Each path: setup (no faults) returns a state for run; run is the path under faults;
# expect checks the dry run's outcome (the path does what it says).


@dataclass(frozen=True)
class Scenario:
    setup: Callable[[FaultEnv], Any]
    run: Callable[[FaultEnv, Any], None]
    expect: Callable[[FaultEnv, Any], None]  # after the dry run
    settles: Callable[[FaultEnv, Any], None]  # after a fault, once the cluster settled


def _start_run(env: FaultEnv, _: Any) -> None:
    step(env, "api start_engine", lambda: start_engine(env.cluster, env.spec()))
    deliver_all(env)
    health_until_started(env)


def _start_expect(env: FaultEnv, _: Any) -> None:
    assert [r.state for r in env.engines()] == [S.RUNNING]


def _stop_run(env: FaultEnv, rec: EngineRecord) -> None:
    step(env, "api stop_engine", lambda: stop_engine(env.cluster, rec.id))
    deliver_all(env)


def _stop_expect(env: FaultEnv, rec: EngineRecord) -> None:
    now = env.record(rec.id)
    assert now is not None and now.state is S.STOPPED, now


def _stop_settles(env: FaultEnv, rec: EngineRecord) -> None:
    """STOPPED, unless the API's only write was lost (the caller saw the error)."""
    refused = any(e.startswith("api stop_engine: injected: connection lost") for e in env.errors)
    now = env.record(rec.id)
    assert now is not None and now.state is (S.RUNNING if refused else S.STOPPED), now


def _start_settles(env: FaultEnv, _: Any) -> None:
    """RUNNING, or no engine at all when the API's create was lost."""
    assert [r.state for r in env.engines()] in ([], [S.RUNNING]), env.engines()


def _running_settles(env: FaultEnv, rec: EngineRecord) -> None:
    now = env.record(rec.id)
    assert now is not None and now.state is S.RUNNING, now
    assert Ledger(env.client).reservation(rec.id) is not None


def _restart_run(env: FaultEnv, rec: EngineRecord) -> None:
    step(env, "api restart_engine", lambda: restart_engine(env.cluster, rec.id))
    deliver_all(env)
    health_until_started(env)


def _restarted_expect(env: FaultEnv, rec: EngineRecord) -> None:
    now = env.record(rec.id)
    assert now is not None and now.state is S.RUNNING and now.pid not in (None, rec.pid), now


def _crash_setup(env: FaultEnv) -> EngineRecord:
    rec = start_running(env)
    assert rec.pid is not None
    kill9(rec.pid)
    return rec


def _crash_run(env: FaultEnv, rec: EngineRecord) -> None:
    step(env, "check_host", lambda: supervise.check_host(env.ctx))  # sees it dead
    deliver_all(env)  # the scheduled restart
    health_until_started(env)


def _readopt_setup(env: FaultEnv) -> EngineRecord:
    rec = start_running(env)
    env.client.flushall()
    env.queue.sent.clear()  # Celery's queues live in the same Redis
    return rec


def _readopt_run(env: FaultEnv, rec: EngineRecord) -> None:
    step(env, "heartbeat_or_rediscover", env.host.heartbeat)
    step(env, "rediscover", lambda: rediscover(env.ctx))


def _readopt_expect(env: FaultEnv, rec: EngineRecord) -> None:
    now = env.record(rec.id)
    assert now is not None and now.state is S.RUNNING and now.pid == rec.pid, now
    assert Ledger(env.client).reservation(rec.id) is not None


def _failed_setup(env: FaultEnv) -> EngineRecord:
    """An engine that failed for good (its room released)."""
    rec = start_running(env)
    assert rec.pid is not None
    kill9(rec.pid)
    lifecycle.fail_final(env.ctx, rec.id, "failed for the test")
    now = env.record(rec.id)
    assert now is not None and now.owns_nothing and now.state is S.FAILED, now
    return now


def _restart_failed_settles(env: FaultEnv, rec: EngineRecord) -> None:
    """RUNNING; still FAILED (holding nothing) when the API's re-placement was lost."""
    if any(e.startswith("api restart_engine: injected: connection lost") for e in env.errors):
        now = env.record(rec.id)
        if now is not None and now.owns_nothing:
            assert Ledger(env.client).reservation(rec.id) is None
            return
    _running_settles(env, rec)


def _pending_setup(env: FaultEnv) -> EngineRecord:
    """A PENDING engine whose start task is still queued."""
    rec = start_engine(env.cluster, env.spec())
    assert [t.task for t in env.queue.sent] == ["sagellm.start_engine"]
    return rec


def _stop_pending_run(env: FaultEnv, rec: EngineRecord) -> None:
    step(env, "api stop_engine", lambda: stop_engine(env.cluster, rec.id))
    deliver_all(env)  # the start (refused: STOPPING), then the stop
    health_until_started(env)


def _stop_pending_settles(env: FaultEnv, rec: EngineRecord) -> None:
    """STOPPED; RUNNING when the API's only write was lost (the caller saw the error,
    and the queued start ran)."""
    _stop_settles(env, rec)


def _prune_setup(env: FaultEnv) -> list[str]:
    """A stopped engine that ran, one stopped before it started, and a reservation no
    record owns (left by a crash of an older version)."""
    ran = start_running(env)
    stop_engine(env.cluster, ran.id)
    never = start_engine(env.cluster, env.spec())
    stop_engine(env.cluster, never.id)
    deliver_all(env)  # start (refused: STOPPING), stop, stop
    assert [r.state for r in env.engines()] == [S.STOPPED, S.STOPPED], env.engines()
    led = Ledger(env.client)
    gpu = led.capacity(env.host.name)[0]
    led.reserve(
        "eng-leaked000000",
        env.host.name,
        [(gpu.uuid, 1024)],
        port_range=env.host.settings.port_range,
        margin_mib=MARGIN_MIB,
    )
    return [ran.id, never.id]


def _prune_run(env: FaultEnv, _: Any) -> None:
    step(
        env,
        "prune_records",
        lambda: prune_records(env.cluster.registry, env.cluster.ledger, 0),
    )


def _prune_expect(env: FaultEnv, _: Any) -> None:
    assert env.engines() == []
    assert Ledger(env.client).is_empty()


def _prune_settles(env: FaultEnv, _: Any) -> None:
    """What was not pruned is still STOPPED (the next prune takes it); nothing held."""
    assert all(r.state is S.STOPPED for r in env.engines()), env.engines()
    assert Ledger(env.client).is_empty()


PATHS: dict[str, Scenario] = {
    "start": Scenario(lambda env: None, _start_run, _start_expect, _start_settles),
    "stop": Scenario(start_running, _stop_run, _stop_expect, _stop_settles),
    "restart": Scenario(start_running, _restart_run, _restarted_expect, _running_settles),
    "restart_failed": Scenario(
        _failed_setup, _restart_run, _running_settles, _restart_failed_settles
    ),
    "stop_pending": Scenario(
        _pending_setup, _stop_pending_run, _stop_expect, _stop_pending_settles
    ),
    "crash_restart": Scenario(_crash_setup, _crash_run, _restarted_expect, _running_settles),
    "readopt": Scenario(_readopt_setup, _readopt_run, _readopt_expect, _readopt_expect),
    "prune": Scenario(_prune_setup, _prune_run, _prune_expect, _prune_settles),
}

# The Redis writes of each path, in order (the dry run checks this list).
_HEARTBEAT = "MULTI[SET sagellm:host:{host}, SET sagellm:host-last:{host}, SADD sagellm:hosts]"
WRITES: dict[str, list[str]] = {
    "start": [
        "commit:create PENDING +reserve",  # reserve_engine
        "commit:update PENDING",  # launch_engine: the start task's id
        "commit:update STARTING",  # spawn_engine: the process is recorded
        "commit:update RUNNING",  # check_start: ready
    ],
    "stop": [
        "commit:update DRAINING",  # stop_engine (+ its "draining" event)
        "commit:update STOPPING",  # lifecycle.stop_engine, once drained
        "commit:update STOPPED +release",  # finalize_stop
    ],
    "restart": [
        "commit:update RUNNING",  # restart_engine: the task's id
        "commit:update UNHEALTHY",  # manual_restart: killed, restart pending
        "commit:update STARTING",  # spawn_engine
        "commit:update RUNNING",  # check_start: ready
    ],
    "crash_restart": [
        "commit:update UNHEALTHY",  # handle_dead: restart pending
        "commit:update STARTING",  # spawn_engine (the restart task)
        "commit:update RUNNING",  # check_start: ready
    ],
    "readopt": [
        "commit:create RUNNING +reserve",  # rediscovery adopts from the manifest
        "publish_capacity",
        "MULTI[DEL sagellm:models:{host}, HSET sagellm:models:{host}]",  # the model facts
        _HEARTBEAT,
        "commit:update RUNNING +reserve",  # the next rediscovery: ensure_reserved
        "publish_capacity",
        _HEARTBEAT,
    ],
    "restart_failed": [
        "commit:update FAILED +reserve",  # restart_engine: placed again
        "commit:update FAILED",  # restart_engine: the task's id
        "commit:update FAILED",  # manual_restart: restart due now
        "commit:update STARTING",  # spawn_engine
        "commit:update RUNNING",  # check_start: ready
    ],
    "stop_pending": [
        "commit:update STOPPING",  # stop_engine (nothing serves: no drain)
        "commit:update STOPPING",  # lifecycle.stop_engine (already STOPPING)
        "commit:update STOPPED +release",  # finalize_stop: no process to kill
    ],
    "prune": [
        "commit:delete +release",  # the engine that ran
        "commit:delete +release",  # the engine stopped before it started
        "commit:none +release",  # the reservation no record owns
    ],
}

# (path, k, mode) -> why it fails: real bugs, reported, not hidden.
KNOWN_BUGS: dict[tuple[str, int, str], str] = {}


def positions(n: int) -> list[int]:
    if n <= MAX_POSITIONS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_POSITIONS - 1)) for i in range(MAX_POSITIONS)})


def _cases() -> Iterator[Any]:
    for path, writes in WRITES.items():
        for k in positions(len(writes)):
            for mode in ("before", "after"):
                bug = KNOWN_BUGS.get((path, k, mode))
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                yield pytest.param(path, k, mode, id=f"{path}-{k}-{mode}", marks=marks)


# ----------------------------------------------------------------------------- checks


def assert_nothing_leaked(env: FaultEnv) -> None:
    client, host = env.client, env.host.name
    reg, led = Registry(client), Ledger(client)
    records = {r.id: r for r in reg.engines()}

    def live(eid: str) -> EngineRecord:
        rec = records.get(eid)
        assert rec is not None, f"{eid} holds room but has no record"
        assert not rec.owns_nothing, f"{eid} is {rec.state.value} but holds room"
        return rec

    # Reservations: the set, each engine's reservation, each GPU's and port's entries.
    holders = led.reserved_engines() | {
        as_text(k).removeprefix(keys.engine_reservation(""))
        for k in client.scan_iter(match=keys.engine_reservation("*"))
    }
    for eid in holders:
        live(eid)
        assert led.reservation(eid) is not None, f"{eid} is in the reserved set, holds nothing"
        assert eid in led.reserved_engines(), f"{eid} holds a reservation not in the set"
    for prefix in (keys.GPU_RESERVATIONS_PREFIX, keys.PORT_RESERVATIONS_PREFIX):
        for key in client.scan_iter(match=prefix + "*"):
            entries: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
            for field_, value in entries.items():
                eid = as_text(field_ if prefix == keys.GPU_RESERVATIONS_PREFIX else value)
                assert eid in holders, f"{as_text(key)}: {field_!r}={value!r}, no reservation"
    # Processes: each belongs to a live record that names it (its session leader).
    for pid, (eid, tag_host) in tagged_processes().items():
        if tag_host != host:
            continue
        rec = records.get(eid)
        assert rec is not None and not rec.owns_nothing, f"process {pid} of ended engine {eid}"
        with contextlib.suppress(OSError):
            assert rec.pid == os.getsid(pid), f"process {pid} of {eid}: record says {rec.pid}"
    # Manifests: only for records that live on this host.
    for path in sorted(env.ctx.manifests.dir.glob("*.json")):
        rec = records.get(path.stem)
        assert rec is not None, f"manifest {path.name} left for a record that is gone"
        assert not rec.owns_nothing, f"manifest {path.name} left for a {rec.state.value} engine"
        assert rec.host == host, f"manifest {path.name} on {host} for an engine of {rec.host}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def fault_env(
    redis_server: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultEnv]:
    use_fake_engines(monkeypatch)
    url: str = redis_server.url  # type: ignore[attr-defined]
    client = connect(url)
    client.flushall()
    injector = FaultInjector()
    queue = TaskQueue()
    # A host name of its own: rediscovery adopts or stops only this host's processes.
    name = f"flt-{uuid.uuid4().hex[:6]}"
    host = InprocHost(host_settings(name, ADDRESS, GPUS, PORTS, tmp_path, url), queue)
    injector.wrap_context(host.ctx)
    host.heartbeat()
    cluster = cluster_of(injector.wrap(connect(url)), host.settings, queue)
    env = FaultEnv(client, injector, host, cluster, queue)
    try:
        yield env
    finally:
        injector.disarm()
        kill_all_engines()
        client.flushall()
        client.close()


def run_path(env: FaultEnv, path: str, fail_at: int | None, mode: Mode) -> Any:
    scenario = PATHS[path]
    state = scenario.setup(env)
    env.injector.arm(fail_at, mode)
    try:
        scenario.run(env, state)
    finally:
        env.injector.disarm()
    return state


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", sorted(PATHS))
def test_write_count(fault_env: FaultEnv, path: str) -> None:
    """Dry run: the path works, and its writes are the ones ``WRITES`` lists."""
    state = run_path(fault_env, path, None, "before")
    writes = fault_env.writes()
    PATHS[path].expect(fault_env, state)
    next_cycle(fault_env)
    check_invariants(fault_env.client, fault_env.hosts, MARGIN_MIB, settled=True)
    assert_nothing_leaked(fault_env)
    print(f"\n{path}: {len(writes)} writes: {writes}")
    assert writes == WRITES[path], f"the writes of {path} changed: {writes}"


@pytest.mark.parametrize(("path", "k", "mode"), list(_cases()))
def test_write_fault(
    fault_env: FaultEnv, monkeypatch: pytest.MonkeyPatch, path: str, k: int, mode: Mode
) -> None:
    """A connection error at the path's k-th write; after the next rediscovery cycle
    the invariants hold and nothing is leaked; later, the engine ends where the path
    (or the refused API call) leaves it, nothing stuck half-way."""
    state = run_path(fault_env, path, k, mode)
    assert fault_env.injector.fired is not None, (
        f"write #{k} of {path} never happened: {fault_env.writes()} vs {WRITES[path]}"
    )
    fired = fault_env.writes()[k]
    assert fired == WRITES[path][k], (fired, WRITES[path])
    next_cycle(fault_env)
    check_invariants(fault_env.client, fault_env.hosts, MARGIN_MIB, settled=True)
    assert_nothing_leaked(fault_env)
    states = {r.id: r.state.value for r in fault_env.engines()}
    print(f"\n{path} #{k} {mode} ({fired}): errors {fault_env.errors}; after the cycle {states}")
    later(fault_env, monkeypatch)
    PATHS[path].settles(fault_env, state)
    check_invariants(fault_env.client, fault_env.hosts, MARGIN_MIB, settled=True)
    assert_nothing_leaked(fault_env)
