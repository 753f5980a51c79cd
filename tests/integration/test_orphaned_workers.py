"""Workers a dead engine leader left behind are not an engine.

An engine is its leader's session (the process ``spawn`` started, a session leader).
When the leader dies and its tensor-parallel-like workers live on (orphaned, still
tagged), a restart must sweep them and start a fresh leader: adopting a worker as the
engine leaves it STARTING (or RUNNING) with a process that never serves, until the
start timeout or the health policy kills it. Found by the fault test's 30 s stall in
``restart_failed``.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from app.services.engines import restart_engine
from tests.integration import test_issue10_regressions as base
from tests.integration.inproc import deliver, wait_for
from tests.integration.test_issue10_regressions import Env, becomes_running, invariants, take
from workers.agent import lifecycle
from workers.agent.reconcile import rediscover
from workers.host import processes

pytestmark = pytest.mark.integration
make_env = base.make_env
env = base.env


def _running_with_a_worker(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, list[int]]:
    """A RUNNING engine whose leader has one worker: (engine id, leader pid, workers)."""
    monkeypatch.setenv("FAKE_VLLM_WORKERS", "1")  # read by the stand-in when it starts
    rec = base.start_running(env, 4)
    leader = rec.pid
    assert leader is not None
    assert wait_for(lambda: len(psutil.Process(leader).children()) == 1, 10)
    return rec.id, leader, [c.pid for c in psutil.Process(leader).children()]


def _kill_leader_only(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not processes.is_alive(pid, None), 10)


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_restart_of_a_failed_engine_sweeps_its_orphaned_worker_and_starts_a_leader(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, leader, workers = _running_with_a_worker(env, monkeypatch)
    _kill_leader_only(leader)
    orphan = processes.find_tagged_processes()[eid]
    assert orphan.pid in workers and not orphan.session_leader
    lifecycle.fail_final(env.ctx, eid, "failed for the test")  # no sweep on this path

    restart_engine(env.cluster, eid)
    deliver(env.ctx, take(env, "sagellm.restart_engine_now", eid))
    started = time.monotonic()
    assert becomes_running(env, eid), env.registry.get(eid)
    assert time.monotonic() - started < 10  # not the 30 s start timeout
    rec = env.registry.get(eid)
    assert rec.pid is not None and os.getsid(rec.pid) == rec.pid  # a leader, not a worker
    assert rec.pid not in workers
    assert wait_for(lambda: _gone(workers), 10), "the orphaned worker was left running"
    invariants(env)


def test_rediscovery_does_not_relink_an_engine_to_its_dead_leaders_worker(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, leader, workers = _running_with_a_worker(env, monkeypatch)
    env.host.restart_worker()  # the worker is gone while the leader dies
    _kill_leader_only(leader)

    rediscover(env.ctx)

    rec = env.registry.get(eid)
    assert rec.pid not in workers, f"relinked to the orphaned worker {rec.pid}"
    assert wait_for(lambda: _gone(workers), 10), "the orphaned worker was left running"
    invariants(env)
