"""Regression tests for the defects of issue 10, one behaviour each.

Every test drives a real worker ``HostContext`` (``tests/integration/inproc.py``): a
real redis-server, real engine processes (the stand-in ``vllm``), the production code
of ``app.services.engines`` and ``workers.*``, and a task queue the test delivers by hand. They
assert what a user can observe: record state, ledger contents, live processes.

They use only paths that exist before and after the fix (``app.services.engines``,
``workers.agent.lifecycle``, ``workers.agent.reconcile.rediscover``, ``Ledger``), so that each
one, run against the code of ca78684, fails on the defect it names. Cases 7 (gateway
retry) and 8 (beat lock) are covered by ``tests/unit/test_transport.py`` and
``tests/unit/test_beat.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from app.core.engine_policy import ENGINE_ID_ENV
from app.core.errors import ReservationConflict, SagellmError
from app.core.gpus import GpuInfo, GpuProcess
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services.cluster import Cluster
from app.services.engines import restart_engine, start_engine, stop_engine
from app.settings import Settings
from app.state.ledger import Ledger
from app.state.registry import Registry
from tests.integration.inproc import (
    HOST_ENV,
    InprocHost,
    Sent,
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
from workers.beat_scheduler import mark_lost_engines
from workers.host import processes
from workers.host.gpu_inventory import Inventory, gpu_capacities
from workers.runtimes.base import LaunchPlan

pytestmark = pytest.mark.integration
S = EngineState
GB = 1024  # MiB
MARGIN_MIB = 1024
# Unique per run: rediscovery adopts or stops every engine tagged with its host's name,
# and other test sessions on this machine run hosts named "a" and "b".
HOST = "i10-" + uuid.uuid4().hex[:8]
ADDRESS = "127.0.10.10"
PORT_RANGE = (18660, 18669)
# Settings added by the fix: left out when the code under test does not know them, so
# that the old code fails on behaviour rather than on construction.
_NEWER_SETTINGS = ("restart_reset_after_s",)


# ------------------------------------------------------------------------- harness


@dataclass
class Env:
    client: redis.Redis
    queue: TaskQueue
    host: InprocHost
    cluster: Cluster
    strays: list[psutil.Process] = field(default_factory=list)  # killed at teardown

    @property
    def ctx(self) -> Any:
        return self.host.ctx

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    @property
    def ledger(self) -> Ledger:
        return self.cluster.ledger


def _settings(redis_url: str, data_dir: Path, gpus: str, **overrides: Any) -> Settings:
    """``inproc.host_settings`` for one host ``HOST`` with mock ``gpus``, and ``overrides``."""
    base = host_settings(
        HOST, ADDRESS, gpus, f"{PORT_RANGE[0]}-{PORT_RANGE[1]}", data_dir, redis_url
    )
    known = {f.name for f in dataclasses.fields(Settings)}
    kept = {k: v for k, v in overrides.items() if k in known or k not in _NEWER_SETTINGS}
    return dataclasses.replace(base, **kept)


def heartbeat(host: InprocHost) -> None:
    """One step of the host's heartbeat thread (before the fix it only published)."""
    try:
        from workers.agent.reconcile import heartbeat_or_rediscover
    except ImportError:  # the code before the fix
        from workers.agent.heartbeat import publish_heartbeat

        publish_heartbeat(host.ctx)
        return
    heartbeat_or_rediscover(host.ctx)


@pytest.fixture
def make_env(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Env]]:
    from app.state.client import connect

    use_fake_engines(monkeypatch, workers=0, rename=False)
    client = connect(redis_server.url)
    client.flushall()
    made: list[Env] = []

    def make(gpus: str = "1x24", **overrides: Any) -> Env:
        data_dir = tmp_path / uuid.uuid4().hex[:8]
        settings = _settings(redis_server.url, data_dir, gpus, **overrides)
        queue = TaskQueue()
        host = InprocHost(settings, queue)
        heartbeat(host)
        env = Env(client, queue, host, cluster_of(client, settings, queue))
        made.append(env)
        return env

    try:
        yield make
    finally:
        kill_all_engines()
        for env in made:
            for proc in env.strays:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        client.flushall()
        client.close()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


def spec(gb: float) -> EngineSpec:
    return EngineSpec(model="org/m", required_memory_gb=gb, host=HOST)


def take(env: Env, task: str, engine_id: str) -> Sent:
    """Remove and return the queued ``task`` for ``engine_id``."""
    for i, sent in enumerate(env.queue.sent):
        if sent.task == task and sent.args[:1] == (engine_id,):
            return env.queue.take(i)
    raise AssertionError(f"no {task} queued for {engine_id}: {env.queue.sent}")


def becomes_running(env: Env, engine_id: str) -> bool:
    return wait_for(lambda: supervise.check_start(env.ctx, engine_id) == "running", 15)


def start_running(env: Env, gb: float) -> EngineRecord:
    """An engine started through the API and the host's worker, RUNNING."""
    rec = start_engine(env.cluster, spec(gb))
    deliver(env.ctx, take(env, "sagellm.start_engine", rec.id))
    assert becomes_running(env, rec.id), env.registry.get(rec.id)
    return env.registry.get(rec.id)


def trees(engine_id: str) -> set[int]:
    """Sessions (one per process tree spawn made) of the live tagged processes of an engine."""
    out = set()
    for pid, (eid, _host) in tagged_processes().items():
        if eid == engine_id:
            with contextlib.suppress(OSError):
                out.add(os.getsid(pid))
    return out


def gone(pid: int | None, create_time: float | None = None) -> bool:
    return pid is None or not processes.is_alive(pid, create_time)


def crash(rec: EngineRecord) -> None:
    """kill -9 of the engine's leader process."""
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    assert wait_for(lambda: gone(rec.pid, rec.process_create_time), 5)


def invariants(env: Env, *, settled: bool = True) -> None:
    check_invariants(env.client, {HOST: env.host}, MARGIN_MIB, settled=settled)


def fail_write_once(
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    when: Callable[[EngineRecord, EngineRecord], bool],
) -> list[str]:
    """The next record update for which ``when(before, after)`` holds raises
    ``redis.ConnectionError`` before reaching Redis (a connection lost, a worker
    killed at that line); later writes go through. Returns the engines it failed."""
    fired: list[str] = []

    def wrap(name: str) -> None:
        original = getattr(registry, name)

        def write(
            engine_id: str, mutate: Callable[[EngineRecord], None], *a: Any, **kw: Any
        ) -> Any:
            before = None if fired else registry.find(engine_id)
            if before is not None:
                after = copy.deepcopy(before)
                try:
                    mutate(after)
                except Exception:
                    pass  # the real write raises it too
                else:
                    if when(before, after):
                        fired.append(engine_id)
                        raise redis.ConnectionError(f"injected: write of {engine_id} lost")
            return original(engine_id, mutate, *a, **kw)

        monkeypatch.setattr(registry, name, write)

    for name in ("update", "commit"):  # commit: the fixed code's one write
        if hasattr(registry, name):
            wrap(name)
    return fired


def fail_write_holding_room_once(
    registry: Registry, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, *, reply_lost: bool
) -> list[str]:
    """The next record write that takes a reservation (``reserve=``) or is made while
    the engine holds one raises ``redis.ConnectionError``: before reaching Redis, or
    (``reply_lost``) after Redis applied it. Returns the engines it failed."""
    fired: list[str] = []

    def wrap(name: str) -> None:
        original = getattr(registry, name)

        def write(first: Any, *a: Any, **kw: Any) -> Any:
            eid = first.id if isinstance(first, EngineRecord) else str(first)
            if fired or (kw.get("reserve") is None and ledger.reservation(eid) is None):
                return original(first, *a, **kw)
            fired.append(eid)
            if reply_lost:
                original(first, *a, **kw)
            raise redis.ConnectionError(f"injected: write of {eid} lost")

        monkeypatch.setattr(registry, name, write)

    for name in ("create", "update", "commit"):
        if hasattr(registry, name):
            wrap(name)
    return fired


# ------------------------------------------------------------------------- case 1


def test_stop_of_failed_engine_with_pending_restart_releases_once_and_never_restarts(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(restart_backoff_s=30.0, restart_backoff_max_s=30.0)
    rec = start_engine(env.cluster, spec(20))
    deliver(env.ctx, take(env, "sagellm.start_engine", rec.id))
    rec = env.registry.get(rec.id)
    assert rec.state is S.STARTING
    crash(rec)
    supervise.check_host(env.ctx)  # handle_dead: FAILED, restart in 30 s
    failed = env.registry.get(rec.id)
    assert failed.state is S.FAILED and failed.pid is None
    assert failed.next_restart_at is not None, failed.last_error
    assert env.ledger.reservation(rec.id) is not None  # a pending restart keeps its room
    restart_task = take(env, "sagellm.restart_engine", rec.id)

    stop_engine(env.cluster, rec.id)

    stopped = env.registry.get(rec.id)
    assert stopped.state is S.STOPPED
    assert stopped.next_restart_at is None
    assert env.ledger.reservation(rec.id) is None
    assert rec.id not in env.ledger.ports(HOST).values()
    assert not env.ledger.release(rec.id)  # released exactly once, by the stop itself
    # The room is free again: another engine takes all of it.
    second = start_engine(env.cluster, spec(20))
    # The stale restart (its queued task, a due restart in the health loop) starts nothing.
    deliver(env.ctx, restart_task)
    lifecycle.spawn_engine(env.ctx, rec.id)
    supervise.check_host(env.ctx)
    assert env.registry.get(rec.id).state is S.STOPPED
    assert not trees(rec.id), "a stopped engine was restarted"
    deliver(env.ctx, take(env, "sagellm.start_engine", second.id))
    assert becomes_running(env, second.id)
    assert not trees(rec.id)
    assert len(trees(second.id)) == 1
    uuid_ = env.ledger.capacity(HOST)[0].uuid
    assert env.ledger.gpu_reservations(HOST, [uuid_])[uuid_] == {second.id: 20 * GB}
    invariants(env)


# ------------------------------------------------------------------------- case 2


def test_engine_memory_beyond_its_reservation_counts_as_outside(real_redis: redis.Redis) -> None:
    # An 80 GB GPU: our engine reserved 10 GB and uses 40; a stranger uses 5.
    gpu = GpuInfo(
        index=0,
        uuid="GPU-80",
        name="H100",
        total_mib=80 * GB,
        free_mib=(80 - 45) * GB,
        processes=(GpuProcess(pid=100, used_mib=40 * GB), GpuProcess(pid=200, used_mib=5 * GB)),
    )
    ours = {100: "eng-big", 101: "eng-big"}
    reserved = {"GPU-80": {"eng-big": 10 * GB}}
    assert gpu.outside_mib(ours, reserved["GPU-80"]) == (30 + 5) * GB
    caps = gpu_capacities(
        Inventory(gpus=(gpu,), source="mock"),
        "h",
        ours,
        reserved,
    )
    assert [c.outside_mib for c in caps] == [35 * GB]

    ledger = Ledger(real_redis)
    ledger.publish_capacity("h", caps)
    ledger.reserve("eng-big", "h", [("GPU-80", 10 * GB)], port_range=(1, 9), margin_mib=MARGIN_MIB)
    with pytest.raises(ReservationConflict):  # 80 - 35 - 1 - 10 = 34 GB free
        ledger.reserve("eng-60", "h", [("GPU-80", 60 * GB)], port_range=(1, 9), margin_mib=GB)
    assert ledger.reservation("eng-60") is None
    ledger.reserve("eng-33", "h", [("GPU-80", 33 * GB)], port_range=(1, 9), margin_mib=GB)


def test_heartbeat_counts_a_running_engines_use_beyond_its_reservation_as_outside(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.agent.heartbeat

    env = make_env(gpus="1x80")
    rec = start_running(env, 10)
    measured = workers.agent.heartbeat.read_inventory

    def nvml_says(settings: Settings) -> Inventory:
        """The engine uses 40 GB (it reserved 10), a stranger 5 GB."""
        inv = measured(settings)
        procs = (GpuProcess(pid=rec.pid or 0, used_mib=40 * GB), GpuProcess(2**22, 5 * GB))
        gpus = tuple(
            dataclasses.replace(g, free_mib=g.total_mib - 45 * GB, processes=procs)
            for g in inv.gpus
        )
        return dataclasses.replace(inv, gpus=gpus)

    monkeypatch.setattr(workers.agent.heartbeat, "read_inventory", nvml_says)
    heartbeat(env.host)

    [cap] = env.ledger.capacity(HOST)
    assert cap.outside_mib == (30 + 5) * GB
    with pytest.raises(ReservationConflict):  # 80 - 35 - 1 - 10 = 34 GB free
        env.ledger.reserve(
            "eng-60", HOST, [(cap.uuid, 60 * GB)], port_range=PORT_RANGE, margin_mib=GB
        )
    invariants(env)


def test_heartbeat_after_flushall_retakes_running_engines_room_before_offering_capacity(
    env: Env,
) -> None:
    rec = start_running(env, 20)
    held = env.ledger.reservation(rec.id)
    assert held is not None
    env.client.flushall()  # Redis lost; the engine runs on

    heartbeat(env.host)

    again = env.ledger.reservation(rec.id)
    assert again is not None, "capacity offered while the running engine holds nothing"
    assert (again.host, again.port, again.gpus) == (held.host, held.port, held.gpus)
    with pytest.raises(ReservationConflict):  # 24 - 1 - 20 = 3 GB left
        env.ledger.reserve(
            "eng-intruder", HOST, [(held.gpus[0][0], 10 * GB)], port_range=PORT_RANGE, margin_mib=GB
        )
    back = env.registry.get(rec.id)
    assert back.state is S.RUNNING and back.pid == rec.pid
    invariants(env)


# ------------------------------------------------------------------------- case 3


def test_stop_requested_while_host_is_down_finishes_when_the_host_returns(env: Env) -> None:
    rec = start_running(env, 8)
    env.host.down()
    assert rec.id in mark_lost_engines(env.registry)

    stop_engine(env.cluster, rec.id)
    mark_lost_engines(env.registry)  # beat keeps ticking while the host is down
    env.queue.sent.clear()  # the stop task expired: nobody consumed the host's queue

    env.host.restart_worker()
    heartbeat(env.host)
    supervise.check_host(env.ctx)

    final = env.registry.get(rec.id)
    assert final.state is S.STOPPED, (final.state, final.last_error)
    assert gone(rec.pid, rec.process_create_time) and not trees(rec.id)
    assert env.ledger.reservation(rec.id) is None
    assert env.ledger.ports(HOST) == {}
    invariants(env)


def test_engine_stopped_while_its_host_was_down_and_whose_leader_died_leaves_no_worker(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the race test's soak: the stop is finished by rediscovery (the leader
    # is gone), which must sweep the renamed TP worker the leader left in its session.
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "1")
    monkeypatch.setenv("FAKE_VLLM_RENAME", "1")
    rec = start_running(env, 8)
    assert rec.pid is not None
    [child] = psutil.Process(rec.pid).children()
    env.strays.append(child)
    assert wait_for(lambda: ENGINE_ID_ENV not in child.environ(), 5)
    env.host.down()
    mark_lost_engines(env.registry)
    stop_engine(env.cluster, rec.id)
    env.queue.sent.clear()
    crash(rec)

    env.host.restart_worker()
    rediscover(env.ctx)

    assert env.registry.get(rec.id).state is S.STOPPED
    assert wait_for(lambda: gone(child.pid, child.create_time()), 1), "orphaned TP worker"
    invariants(env)


# ------------------------------------------------------------------------- case 4


def test_process_whose_starting_write_fails_is_killed_and_a_retry_starts_exactly_one(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = start_engine(env.cluster, spec(8))
    task = take(env, "sagellm.start_engine", rec.id)
    fired = fail_write_once(
        env.ctx.registry,
        monkeypatch,
        lambda before, after: before.state is S.PENDING and after.state is S.STARTING,
    )

    with pytest.raises(redis.ConnectionError):
        deliver(env.ctx, task)

    assert fired == [rec.id]
    assert wait_for(lambda: not trees(rec.id), 2), "the spawned process lives on unrecorded"
    pending = env.registry.get(rec.id)
    assert pending.state is S.PENDING and pending.pid is None
    assert env.ledger.reservation(rec.id) is not None
    deliver(env.ctx, task)  # Celery redelivers the task (late ack)
    started = env.registry.get(rec.id)
    assert started.state is S.STARTING
    assert trees(rec.id) == {started.pid}
    assert becomes_running(env, rec.id)
    invariants(env)


def _spawn_unrecorded(env: Env, rec: EngineRecord) -> processes.SpawnedProcess:
    """What a worker killed between spawn and record leaves: the engine's process, with
    its tags, and a record that does not name it."""
    from workers.runtimes import get_runtime

    plan = get_runtime(rec.spec.effective_runtime).build(rec)
    plan = LaunchPlan(plan.argv, {**plan.env, HOST_ENV: env.host.name}, plan.cwd)
    return processes.spawn(plan, env.ctx.log_path(rec.id))


def test_engine_spawned_by_a_worker_that_died_before_recording_it_is_relinked_never_doubled(
    env: Env,
) -> None:
    first = start_engine(env.cluster, spec(4))
    second = start_engine(env.cluster, spec(4))
    orphans = {r.id: _spawn_unrecorded(env, r) for r in (first, second)}
    assert wait_for(lambda: all(trees(eid) for eid in orphans), 5)
    env.host.restart_worker()  # the worker died; a new one starts

    # first: the new worker's start-up rediscovery finds it, then the task is redelivered
    rediscover(env.ctx)
    relinked = env.registry.get(first.id)
    assert relinked.state is S.STARTING, relinked.state
    assert relinked.pid == orphans[first.id].pid
    deliver(env.ctx, take(env, "sagellm.start_engine", first.id))
    # second: its start task is redelivered before any rediscovery runs
    deliver(env.ctx, take(env, "sagellm.start_engine", second.id))
    supervise.check_host(env.ctx)

    for eid, orphan in orphans.items():
        assert trees(eid) == {orphan.pid}, f"{eid}: a second process was started"
        rec = env.registry.get(eid)
        assert rec.state in (S.STARTING, S.RUNNING), rec.state
        assert rec.pid == orphan.pid
        assert becomes_running(env, eid)
    invariants(env)


# ------------------------------------------------------------------------- case 5


def _no_trace(env: Env) -> None:
    assert env.registry.engines() == []
    assert env.ledger.reserved_engines() == set()
    assert env.ledger.ports(HOST) == {}
    assert all(c.reserved_mib == 0 for c in env.ledger.capacity(HOST))


def _reservation_matches_record(env: Env, engine_id: str) -> None:
    rec = env.registry.get(engine_id)
    res = env.ledger.reservation(engine_id)
    assert res is not None and rec.host is not None, (rec, res)
    assert (res.host, res.port) == (rec.host, rec.port)
    assert res.gpus == tuple((g.uuid, g.memory_mib) for g in rec.gpus)


def test_start_whose_record_write_fails_leaves_neither_record_nor_reservation(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    fired = fail_write_holding_room_once(env.registry, env.ledger, monkeypatch, reply_lost=False)
    with pytest.raises(redis.ConnectionError):
        start_engine(env.cluster, spec(8))
    assert fired
    _no_trace(env)
    assert env.queue.sent == []

    # The write applied but its reply lost: record and reservation exist together.
    fired = fail_write_holding_room_once(env.registry, env.ledger, monkeypatch, reply_lost=True)
    with pytest.raises(redis.ConnectionError):
        start_engine(env.cluster, spec(8))
    [rec] = env.registry.engines()
    _reservation_matches_record(env, rec.id)
    invariants(env)


def test_restart_of_failed_engine_takes_its_room_in_the_same_write_as_its_placement(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(max_restarts=0)
    rec = start_engine(env.cluster, spec(8))
    deliver(env.ctx, take(env, "sagellm.start_engine", rec.id))
    crash(env.registry.get(rec.id))
    supervise.check_host(env.ctx)  # no restart left: FAILED for good, room released
    failed = env.registry.get(rec.id)
    assert failed.state is S.FAILED and failed.next_restart_at is None
    assert env.ledger.reservation(rec.id) is None

    fired = fail_write_holding_room_once(env.registry, env.ledger, monkeypatch, reply_lost=False)
    with pytest.raises(redis.ConnectionError):
        restart_engine(env.cluster, rec.id)

    assert fired == [rec.id]
    assert env.ledger.reservation(rec.id) is None, "a reservation no record owns"
    assert env.ledger.ports(HOST) == {}
    after = env.registry.get(rec.id)
    assert after.state is S.FAILED and after.next_restart_at is None
    # A retry restarts it: placement and reservation agree.
    restart_engine(env.cluster, rec.id)
    _reservation_matches_record(env, rec.id)
    deliver(env.ctx, take(env, "sagellm.restart_engine_now", rec.id))
    assert becomes_running(env, rec.id)
    invariants(env)


# ------------------------------------------------------------------------- case 6


def test_crash_of_engine_leader_takes_its_renamed_tensor_parallel_worker_with_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "1")
    monkeypatch.setenv("FAKE_VLLM_RENAME", "1")
    rec = start_running(env, 8)
    assert rec.pid is not None
    [child] = psutil.Process(rec.pid).children()
    env.strays.append(child)

    def renamed() -> bool:
        with contextlib.suppress(psutil.Error):
            title = child.cmdline()
            return bool(title) and title[0].startswith("VLLM::Worker")
        return False

    assert wait_for(renamed, 5), child.cmdline()
    assert ENGINE_ID_ENV not in child.environ()  # setproctitle wiped its tag
    assert not gone(child.pid, child.create_time())
    crash(rec)

    supervise.check_host(env.ctx)

    assert wait_for(lambda: gone(child.pid, child.create_time()), 1), "orphaned TP worker"
    after = env.registry.get(rec.id)
    assert after.pid is None and after.next_restart_at is not None  # restart pending
    invariants(env, settled=False)


def test_renamed_worker_of_a_leader_that_crashed_just_before_redis_was_lost_is_swept(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the race test: crash, then FLUSHALL before any health tick. No record,
    # no tagged process is left; only the manifest knows the leader's pid, and the
    # renamed worker would hold its GPU memory forever.
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "1")
    monkeypatch.setenv("FAKE_VLLM_RENAME", "1")
    rec = start_running(env, 8)
    assert rec.pid is not None
    [child] = psutil.Process(rec.pid).children()
    env.strays.append(child)
    assert wait_for(lambda: ENGINE_ID_ENV not in child.environ(), 5)
    crash(rec)
    env.registry.r.flushall()

    rediscover(env.ctx)

    assert wait_for(lambda: gone(child.pid, child.create_time()), 1), "orphaned TP worker"
    assert env.registry.find(rec.id) is None and env.ledger.is_empty()
    invariants(env, settled=True)


def test_stop_whose_kill_is_refused_keeps_the_reservation_and_says_why(env: Env) -> None:
    rec = start_engine(env.cluster, spec(8))
    take(env, "sagellm.start_engine", rec.id)
    foreign = psutil.Popen(["sleep", "60"], start_new_session=True)  # carries no tag
    env.strays.append(foreign)

    def points_at_foreign(r: EngineRecord) -> None:
        r.transition(S.STARTING)
        r.pid, r.process_create_time = foreign.pid, None

    env.registry.update(rec.id, points_at_foreign)

    stop_engine(env.cluster, rec.id)
    deliver(env.ctx, take(env, "sagellm.stop_engine", rec.id))

    assert foreign.poll() is None, "a process that is not the engine's was killed"
    after = env.registry.get(rec.id)
    assert after.state is S.STOPPING, after.state
    assert after.last_error and "refused" in after.last_error, after.last_error
    assert str(foreign.pid) in after.last_error
    _reservation_matches_record(env, rec.id)
    invariants(env, settled=False)


# ------------------------------------------------------------------------- case 9


def test_rediscovery_stops_tagged_engine_without_record_or_manifest_and_adopts_one_with_manifest(
    env: Env,
) -> None:
    kept = start_running(env, 8)
    held = env.ledger.reservation(kept.id)
    stray_id = "eng-" + uuid.uuid4().hex[:12]
    port = str(PORT_RANGE[1])
    stray = processes.spawn(
        LaunchPlan(
            ["vllm", "serve", "org/stray", "--host", ADDRESS, "--port", port],
            {ENGINE_ID_ENV: stray_id, HOST_ENV: HOST},
        ),
        env.ctx.log_path(stray_id),
    )
    assert wait_for(lambda: bool(trees(stray_id)), 5)
    env.client.flushall()  # Redis lost: kept has a manifest, the stray has nothing

    rediscover(env.ctx)

    assert wait_for(lambda: gone(stray.pid, stray.create_time), 3), "untracked engine left running"
    log = env.ctx.log_path(stray_id).read_text()
    assert f"stopping process {stray.pid}" in log, log
    adopted = env.registry.get(kept.id)
    assert adopted.state is S.RUNNING and adopted.pid == kept.pid
    assert env.ledger.reservation(kept.id) == held
    assert env.registry.find(stray_id) is None and env.ledger.reservation(stray_id) is None
    invariants(env)


def test_rediscovery_leaves_alone_an_engine_of_another_cluster_with_the_same_host_name(
    env: Env,
) -> None:
    # Two users' stacks on one machine, both with the default host name: each worker
    # adopts or stops only engines its own directory started.
    other_id = "eng-" + uuid.uuid4().hex[:12]
    port = str(PORT_RANGE[1])
    other = processes.spawn(
        LaunchPlan(
            ["vllm", "serve", "org/other", "--host", ADDRESS, "--port", port],
            {ENGINE_ID_ENV: other_id, HOST_ENV: HOST, "SAGELLM_ENGINE_OWNER": "/elsewhere"},
        ),
        env.ctx.log_path(other_id),
    )
    env.strays.append(psutil.Process(other.pid))
    assert wait_for(lambda: bool(trees(other_id)), 5)

    rediscover(env.ctx)

    assert not gone(other.pid, other.create_time), "another cluster's engine was stopped"
    assert env.registry.find(other_id) is None


# ------------------------------------------------------------------------- case 10


def test_restart_budget_is_given_back_after_a_stable_run(make_env: Callable[..., Env]) -> None:
    env = make_env(restart_reset_after_s=1.0)  # max_restarts is 2
    rec = start_running(env, 8)
    env.registry.update(rec.id, lambda r: setattr(r, "restart_count", 2))  # budget spent
    time.sleep(1.2)  # RUNNING for longer than SAGELLM_RESTART_RESET_AFTER_S
    crash(rec)

    supervise.check_host(env.ctx)

    pending = env.registry.get(rec.id)
    assert pending.next_restart_at is not None, (pending.state, pending.last_error)
    assert pending.state is S.UNHEALTHY
    assert pending.restart_count == 0
    assert env.ledger.reservation(rec.id) is not None
    deliver(env.ctx, take(env, "sagellm.restart_engine", rec.id))
    restarted = env.registry.get(rec.id)
    assert restarted.state is S.STARTING and restarted.restart_count == 1
    assert restarted.pid != rec.pid and trees(rec.id) == {restarted.pid}
    assert becomes_running(env, rec.id)
    invariants(env)


def test_a_drain_whose_stop_task_was_lost_is_finished_by_the_health_loop(env: Env) -> None:
    # Found when the drain came in (issue 13): a DRAINING engine whose stop task was
    # lost (or whose worker restarted) stayed DRAINING, holding its room, for good.
    rec = start_running(env, 8)
    drained = stop_engine(env.cluster, rec.id, drain_timeout_s=30)
    assert drained.state is S.DRAINING
    env.queue.sent.clear()  # the stop task is lost

    supervise.check_host(env.ctx)

    final = env.registry.get(rec.id)
    assert final.state is S.STOPPED, (final.state, final.last_error)
    assert gone(rec.pid, rec.process_create_time) and not trees(rec.id)
    assert env.ledger.reservation(rec.id) is None
    invariants(env)


def test_start_whose_record_is_flushed_before_its_task_id_is_written_answers_503_and_starts_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI (storm): Redis got FLUSHALL between the reservation and the task-id write, and
    POST /engines answered 404 "engine 'eng-…' not found" about the engine it had just
    created. The start must say that the state store lost the record, as a 503 a client
    can retry, and the queued task must start nothing."""
    sent = env.queue.send_task

    def flush_then_send(*args: Any, **kwargs: Any) -> Any:
        env.client.flushall()
        return sent(*args, **kwargs)

    monkeypatch.setattr(env.queue, "send_task", flush_then_send)
    with pytest.raises(SagellmError) as caught:
        start_engine(env.cluster, spec(8))
    assert caught.value.status_code == 503
    message = caught.value.message
    assert "lost" in message and "retry" in message, message
    [task] = env.queue.sent
    deliver(env.ctx, task)
    assert env.registry.engines() == []
    assert [eid for eid, _ in tagged_processes().values() if eid] == []
