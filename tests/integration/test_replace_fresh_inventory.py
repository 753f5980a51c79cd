"""A start that failed for lack of free GPU memory is re-placed on the memory its host
has now, not on what its last heartbeat said: the host's worker measures its GPUs
again and publishes their capacity before the re-placement.

A real worker ``HostContext`` driven step by step (``tests/integration/inproc.py``):
real redis-server, the stand-in ``vllm`` as the engine process, mock GPUs whose
memory held by other programs ("outside") changes between heartbeats, as NVML's
would when someone else starts a job."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.core.inventory_spec import mock_uuid
from app.core.models import EngineState
from app.core.spec import EngineSpec
from app.dev.redis_server import RedisProcess
from app.services.engines import start_engine
from app.state.client import connect
from tests.integration.inproc import (
    InprocHost,
    Sent,
    TaskQueue,
    cluster_of,
    deliver,
    host_settings,
    kill_all_engines,
    use_fake_engines,
    wait_for,
)
from workers.agent import supervise

pytestmark = pytest.mark.integration
S = EngineState
HOST = "rf-" + uuid.uuid4().hex[:8]  # rediscovery of other sessions' hosts "a" leaves it be
ADDRESS = "127.0.30.2"
PORTS = "18470-18479"


def gpus(*outside_gb: float) -> str:
    """A mock inventory of 80 GB GPUs, each with this much held by other programs."""
    return json.dumps([{"total_gb": 80, "outside_gb": gb} for gb in outside_gb])


@pytest.fixture
def client(redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """Redis, and the stand-in ``vllm`` as this test's engines (killed after it: before
    ``monkeypatch`` takes back the run tag they are found by)."""
    use_fake_engines(monkeypatch, workers=0, rename=False)
    r = connect(redis_server.url)
    r.flushall()
    yield r
    kill_all_engines()
    r.flushall()
    r.close()


def _take(queue: TaskQueue, task: str, engine_id: str) -> Sent:
    for i, sent in enumerate(queue.sent):
        if sent.task == task and sent.args[:1] == (engine_id,):
            return queue.take(i)
    raise AssertionError(f"no {task} queued for {engine_id}: {queue.sent}")


def _checked_until_not_waiting(host: InprocHost, engine_id: str) -> str:
    """The readiness check, repeated until it is not ``waiting``: its answer."""
    seen: list[str] = []

    def checked() -> bool:
        seen.append(supervise.check_start(host.ctx, engine_id))
        return seen[-1] != "waiting"

    assert wait_for(checked, 20), "neither ready nor dead"
    return seen[-1]


def _run_until_settled(host: InprocHost, queue: TaskQueue, engine_id: str) -> str:
    """Deliver the engine's start, then each relaunch remediation queues, until it is
    RUNNING or failed for good."""
    deliver(host.ctx, _take(queue, "sagellm.start_engine", engine_id))
    for _ in range(5):
        outcome = _checked_until_not_waiting(host, engine_id)
        if outcome != "failed":
            return outcome
        if not [s for s in queue.sent if s.task == "sagellm.restart_engine"]:
            return "failed"
        deliver(host.ctx, _take(queue, "sagellm.restart_engine", engine_id))
    raise AssertionError("more relaunches than remediation allows")


def test_re_placement_sees_the_memory_the_failed_start_just_ran_into(
    client: redis.Redis, redis_server: RedisProcess, tmp_path: Path, monkeypatch: Any
) -> None:
    calls = tmp_path / "vllm-calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(calls))
    # Someone else's job takes GPUs 0 and 1 after the last heartbeat: the stand-in
    # fails on them as vLLM does (free memory below what it needs).
    monkeypatch.setenv("FAKE_VLLM_BUSY_GPUS", f"{mock_uuid(HOST, 0)},{mock_uuid(HOST, 1)}")
    settings = host_settings(
        HOST, ADDRESS, gpus(0, 0, 0), PORTS, tmp_path / "data", redis_server.url
    )
    queue = TaskQueue()
    host = InprocHost(settings, queue)
    host.heartbeat()  # all three GPUs free
    cluster = cluster_of(client, settings, queue)
    rec = start_engine(cluster, EngineSpec(model="org/m", required_memory_gb=8, host=HOST))
    assert [g.index for g in rec.gpus] == [0]  # binpack: the first of equals

    # The other job starts: NVML would now show 76 GB held on GPUs 0 and 1. No
    # heartbeat has run since.
    host.ctx.settings = dataclasses.replace(settings, mock_gpus=gpus(76, 76, 0))

    assert _run_until_settled(host, queue, rec.id) == "running"
    rec = cluster.registry.get(rec.id)
    assert rec.state is S.RUNNING
    # Straight to GPU 2: GPU 1 was seen full before the re-placement, not tried.
    assert [g.index for g in rec.gpus] == [2]
    assert rec.remediations == 1
    lines = calls.read_text().splitlines()
    tried = [json.loads(line)["env"]["CUDA_VISIBLE_DEVICES"] for line in lines]
    assert tried == [mock_uuid(HOST, 0), mock_uuid(HOST, 2)]
    # What placement saw is what the host has now (published at once).
    outside = {g.index: g.outside_mib for g in cluster.ledger.capacity(HOST)}
    assert outside[1] == 76 * 1024 and outside[2] == 0


def test_the_other_gpus_of_the_host_are_measured_before_they_are_chosen(
    client: redis.Redis, redis_server: RedisProcess, tmp_path: Path, monkeypatch: Any
) -> None:
    # Memory freed since the last heartbeat counts too: the only GPU with room is one
    # the last heartbeat saw full.
    monkeypatch.setenv("FAKE_VLLM_BUSY_GPUS", mock_uuid(HOST, 0))
    settings = host_settings(HOST, ADDRESS, gpus(0, 76), PORTS, tmp_path / "data", redis_server.url)
    queue = TaskQueue()
    host = InprocHost(settings, queue)
    host.heartbeat()
    cluster = cluster_of(client, settings, queue)
    rec = start_engine(cluster, EngineSpec(model="org/m", required_memory_gb=8, host=HOST))
    assert [g.index for g in rec.gpus] == [0]
    host.ctx.settings = dataclasses.replace(settings, mock_gpus=gpus(76, 0))

    assert _run_until_settled(host, queue, rec.id) == "running"
    rec = cluster.registry.get(rec.id)
    assert [g.index for g in rec.gpus] == [1] and rec.remediations == 1
