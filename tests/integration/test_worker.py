"""Host worker end to end: real redis-server, real `sagellm worker`/`beat` processes,
real engine processes (the stand-in `vllm` from tests/fakes), real HTTP."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services.engines import start_engine, stop_engine, wait_for_state
from app.state.ledger import port_is_bindable
from tests.integration.harness import ClusterEnv as Env
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration
S = EngineState
FIXTURES = Path(__file__).parents[1] / "fixtures" / "models"
QWEN = str(FIXTURES / "Qwen2.5-1.5B-Instruct")
LLAMA = str(FIXTURES / "Llama-3.1-8B-Instruct")


def _fake_vllm_spec(tmp: Path, model: str = QWEN) -> EngineSpec:
    # The fake's FAKE_VLLM_* settings come from the worker's environment (the harness
    # sets FAKE_VLLM_RECORD to tmp/vllm-calls.jsonl): a spec's env may not name them.
    return EngineSpec(model=model, served_model_name="qwen-mini")


def _running(env: Env, engine_id: str, timeout_s: float = 60) -> EngineRecord:
    """The engine once RUNNING; a start that fails instead (a port another test's engine
    holds, the fake's exit) fails the test at once, with the reason and the worker's log."""
    rec = wait_for_state(env.cluster, engine_id, [S.RUNNING, S.FAILED], timeout_s)
    if rec.state is not S.RUNNING:
        logs = "\n".join(f"--- {n} ---\n{p.output()[-3000:]}" for n, p in env.procs.items())
        raise AssertionError(f"{engine_id} is {rec.state.value}: {rec.last_error}\n{logs}")
    return rec


def _calls(tmp: Path) -> list[dict[str, object]]:
    path = tmp / "vllm-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_vllm_engine_starts_with_flags_from_its_reservation_and_stops_cleanly(env: Env) -> None:
    env.start_worker("a")
    rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp, model=LLAMA))
    assert rec.state is S.PENDING and rec.host == "a" and len(rec.gpus) == 1
    rec = wait_for_state(env.cluster, rec.id, [S.RUNNING, S.FAILED], 60)
    assert rec.state is S.RUNNING, rec.last_error
    assert rec.pid is not None

    call = _calls(env.tmp)[-1]
    argv = call["argv"]
    assert isinstance(argv, list)
    flags = dict(itertools.pairwise(argv))
    assert argv[:2] == ["serve", LLAMA] or argv[1:3] == ["serve", LLAMA]
    reserved = rec.memory_per_gpu_mib
    util = float(flags["--gpu-memory-utilization"])
    assert util <= reserved / (80 * 1024) < util + 0.001  # reservation / GPU total, rounded down
    assert flags["--tensor-parallel-size"] == "1"
    assert flags["--served-model-name"] == "qwen-mini"
    assert flags["--port"] == str(rec.port)
    # Llama-3.1's own 131072 tokens do not fit the reservation: capped at the default
    assert int(flags["--max-model-len"]) == 32768
    call_env = call["env"]
    assert isinstance(call_env, dict)
    assert call_env["CUDA_VISIBLE_DEVICES"] == rec.gpus[0].uuid
    assert call_env["SAGELLM_ENGINE_ID"] == rec.id

    models = httpx.get(f"{rec.base_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["qwen-mini"]
    assert env.cluster.ledger.reservation(rec.id) is not None

    stop_engine(env.cluster, rec.id)
    rec = wait_for_state(env.cluster, rec.id, [S.STOPPED], 30)
    assert rec.state is S.STOPPED
    assert not psutil.pid_exists(rec.pid or -1) or rec.pid is None
    assert env.cluster.ledger.is_empty()
    assert port_is_bindable("127.0.0.1", int(flags["--port"]))


def test_killed_engine_is_detected_and_restarted(env: Env) -> None:
    env.start_worker("a")
    env.start_beat()
    rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp))
    rec = _running(env, rec.id)
    old_pid = rec.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    # detected within two health intervals (1 s each) -> UNHEALTHY, restart pending
    wait_until(
        lambda: env.get(rec.id).restart_count == 1 or env.get(rec.id).next_restart_at,
        4,
        interval=0.1,
        what="crash detection",
    )
    back = wait_until(
        lambda: (r := env.get(rec.id)).state is S.RUNNING and r.pid != old_pid and r,
        30,
        what="restart",
    )
    assert back.restart_count == 1
    assert "exit code -9" in (back.last_error or "") or "exited" in (back.last_error or "")
    assert env.cluster.ledger.reservation(rec.id) is not None
    assert len(_calls(env.tmp)) == 2


def test_engine_that_crashes_at_once_ends_failed_with_nothing_reserved(env: Env) -> None:
    env.start_worker("a", FAKE_VLLM_EXIT_AT_START="3")
    env.start_beat()
    rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp))
    rec = wait_until(
        lambda: (r := env.get(rec.id)).state is S.FAILED and r.next_restart_at is None and r,
        60,
        what="final FAILED",
    )
    assert rec.restart_count == 2  # SAGELLM_MAX_RESTARTS in the harness
    assert "exit code 3" in (rec.last_error or "")
    assert "gave up after 2 restart(s)" in (rec.last_error or "")
    assert "last log lines" in (rec.last_error or "")
    assert len(_calls(env.tmp)) == 3  # first start + 2 restarts
    assert env.cluster.ledger.is_empty()


def test_killed_worker_leaves_engines_running_and_a_new_worker_readopts_them(env: Env) -> None:
    w = env.start_worker("a")
    rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp))
    rec = _running(env, rec.id)
    before = env.cluster.ledger.reservation(rec.id)
    w.kill9()
    assert rec.pid is not None and psutil.pid_exists(rec.pid)
    assert httpx.get(f"{rec.base_url}/health").status_code == 200

    env.start_worker("a")
    env.start_beat()
    # a few rediscovery and health cycles later: same engine, same process, same ledger
    wait_until(
        lambda: (
            env.get(rec.id).last_health_at
            and env.get(rec.id).last_health_at > rec.last_health_at + 2
        ),  # type: ignore[operator]
        20,
        what="health checks by the new worker",
    )
    after = env.get(rec.id)
    assert (after.state, after.pid, after.restart_count) == (S.RUNNING, rec.pid, 0)
    assert [r.id for r in env.cluster.registry.engines()] == [rec.id]
    assert env.cluster.ledger.reservation(rec.id) == before
    assert env.cluster.ledger.reserved_engines() == {rec.id}
    assert len(_calls(env.tmp)) == 1  # never spawned twice


def test_flushall_is_repaired_within_one_rediscovery_cycle(env: Env) -> None:
    env.start_worker("a")
    env.start_beat()
    rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp))
    rec = _running(env, rec.id)
    before = env.cluster.ledger.reservation(rec.id)
    env.cluster.registry.r.flushall()
    assert env.cluster.registry.find(rec.id) is None
    # rediscovery every 2 s; allow one cycle plus a heartbeat
    back = wait_until(
        lambda: env.cluster.registry.find(rec.id), 5, interval=0.1, what="record rebuilt"
    )
    assert back.state is S.RUNNING and back.pid == rec.pid and back.port == rec.port
    assert back.spec == rec.spec and back.gpus == rec.gpus
    assert env.cluster.ledger.reservation(rec.id) == before
    assert len(_calls(env.tmp)) == 1
    # and the repaired cluster still works: stop frees everything
    stop_engine(env.cluster, rec.id)
    assert wait_for_state(env.cluster, rec.id, [S.STOPPED], 30).state is S.STOPPED
    assert env.cluster.ledger.is_empty()


def test_down_host_engines_become_lost_and_are_reconciled_when_it_returns(env: Env) -> None:
    w = env.start_worker("a")
    env.start_beat()
    rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp))
    rec = _running(env, rec.id)
    w.kill9()
    lost = wait_for_state(env.cluster, rec.id, [S.LOST], 10)  # TTL 3 s + a health tick
    assert lost.state is S.LOST and "host a is down" in (lost.last_error or "")
    env.start_worker("a")
    back = wait_for_state(env.cluster, rec.id, [S.RUNNING], 15)
    assert back.state is S.RUNNING and back.pid == rec.pid
    assert len(env.cluster.registry.engines()) == 1
    assert env.cluster.ledger.reserved_engines() == {rec.id}


def test_untagged_process_on_an_engine_port_is_never_touched(env: Env) -> None:
    env.start_worker("a")
    env.start_beat()
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = start_engine(env.cluster, _fake_vllm_spec(env.tmp))
        _running(env, rec.id)
        env.cluster.registry.r.flushall()
        wait_until(lambda: env.cluster.registry.find(rec.id), 6, what="rebuilt")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
