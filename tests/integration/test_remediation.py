"""Crash classification and automatic remediation on real processes: real
redis-server, real `sagellm worker` and `beat`, the stand-in `vllm` (tests/fakes) made
to fail with vLLM's own messages (its FAKE_VLLM_* failure modes, set in the worker's
environment, which engines inherit)."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from app.api import metrics
from app.core.errors import ValidationError
from app.core.inventory_spec import mock_uuid
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineSpec
from app.services.admission import admit
from app.services.engines import start_engine
from app.state.model_facts import host_model_facts
from tests.integration.harness import ClusterEnv as Env
from tests.integration.harness import wait_until
from tests.model_fixtures import FIXTURES, LLAMA_8B, QWEN_1_5B

pytestmark = pytest.mark.integration
S = EngineState
QWEN = str(QWEN_1_5B)
LLAMA = str(LLAMA_8B)  # 131072 tokens: launched at the default cap


def _calls(env: Env) -> list[dict[str, Any]]:
    path = env.tmp / "vllm-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _flags(call: dict[str, Any]) -> dict[str, str]:
    return dict(itertools.pairwise(call["argv"]))


def _events(env: Env, eid: str) -> list[dict[str, Any]]:
    return env.cluster.registry.events.list(eid)


def _settled(env: Env, eid: str, timeout: float = 60) -> EngineRecord:
    """RUNNING, or FAILED with no restart pending."""

    def settled() -> EngineRecord | None:
        r = env.get(eid)
        done = r.state is S.RUNNING or (r.state is S.FAILED and r.next_restart_at is None)
        return r if done else None

    rec: EngineRecord = wait_until(settled, timeout, what="RUNNING or final FAILED")
    return rec


def test_kv_cache_too_small_is_relaunched_with_the_length_vllm_said_fits(env: Env) -> None:
    env.start_worker("a", FAKE_VLLM_KV_LIMIT="20000")
    env.start_beat()
    rec = start_engine(env.cluster, EngineSpec(model=LLAMA, served_model_name="llama"))
    asked = rec.launch["max_model_len"]
    assert asked > 20000  # the estimate asks for more than the stand-in's KV cache holds

    rec = _settled(env, rec.id)
    assert rec.state is S.RUNNING, rec.last_error
    assert rec.launch["max_model_len"] == 20000 <= asked
    calls = _calls(env)
    assert [int(_flags(c)["--max-model-len"]) for c in calls] == [asked, 20000]
    assert rec.remediations == 1
    assert rec.failure is not None and rec.failure["reason"] == "kv_cache_too_small"
    assert rec.failure["details"] == {"max_model_len": asked, "kv_cache_tokens": 20000}
    assert rec.failure_counts == {"kv_cache_too_small": 1}
    assert rec.gpus and env.cluster.ledger.reservation(rec.id) is not None  # room kept

    events = _events(env, rec.id)
    kinds = [e["kind"] for e in events]
    crashed = next(e for e in events if e["kind"] == "crashed")
    assert crashed["reason"] == "kv_cache_too_small"
    remediated = next(e for e in events if e["kind"] == "remediated")
    assert remediated["max_model_len"] == 20000 and remediated["previous"] == asked
    assert kinds.index("crashed") < kinds.index("remediated")


def test_a_gpu_without_free_memory_is_left_for_another(env: Env) -> None:
    busy = mock_uuid("a", 0)
    env.start_worker("a", FAKE_VLLM_BUSY_GPUS=busy)
    env.start_beat()
    rec = start_engine(env.cluster, EngineSpec(model=QWEN, served_model_name="qwen"))
    assert [g.uuid for g in rec.gpus] == [busy]  # binpack takes GPU 0 first

    rec = _settled(env, rec.id)
    assert rec.state is S.RUNNING, rec.last_error
    assert [g.index for g in rec.gpus] == [1]
    calls = _calls(env)
    assert [c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls] == [busy, mock_uuid("a", 1)]
    assert rec.failure is not None and rec.failure["reason"] == "insufficient_free_memory"
    # The reservation moved: GPU 1 holds it, GPU 0 holds nothing.
    reservation = env.cluster.ledger.reservation(rec.id)
    assert reservation is not None and [u for u, _ in reservation.gpus] == [mock_uuid("a", 1)]
    held = env.cluster.ledger.gpu_reservations("a", [busy, mock_uuid("a", 1)])
    assert held[busy] == {} and rec.id in held[mock_uuid("a", 1)]
    remediated = [e for e in _events(env, rec.id) if e["kind"] == "remediated"]
    assert len(remediated) == 1 and remediated[0]["action"] == "replaced"
    assert remediated[0]["excluded"] == [busy] and remediated[0]["gpus"] == [1]


def test_no_gpu_with_free_memory_ends_failed_after_the_bounded_attempts(env: Env) -> None:
    # Four GPUs, none with free memory: the start and two re-placements (each leaving
    # the GPUs that failed), then FAILED with GPU 3 never tried.
    env.start_worker("a", FAKE_VLLM_BUSY_GPUS="*", SAGELLM_MOCK_GPUS="4x80")
    env.start_beat()
    rec = start_engine(env.cluster, EngineSpec(model=QWEN, served_model_name="qwen"))

    rec = _settled(env, rec.id)
    assert rec.state is S.FAILED
    assert rec.failure is not None and rec.failure["reason"] == "insufficient_free_memory"
    assert rec.remediations == 2  # SAGELLM_REMEDIATION_ATTEMPTS' default
    assert "gave up after 2 remediation(s)" in (rec.last_error or "")
    calls = _calls(env)
    assert [c["env"]["CUDA_VISIBLE_DEVICES"] for c in calls] == [
        mock_uuid("a", i) for i in range(3)
    ]
    assert rec.failure_counts == {"insufficient_free_memory": 3}
    assert env.cluster.ledger.reservation(rec.id) is None
    assert env.cluster.ledger.is_empty()
    kinds = [e["kind"] for e in _events(env, rec.id)]
    assert kinds.count("crashed") == 3 and kinds.count("remediated") == 2
    scrape = metrics.render(env.cluster).decode()
    assert 'sagellm_engine_failures_total{reason="insufficient_free_memory"} 3.0' in scrape


def test_re_placement_moves_to_another_host_when_this_one_has_no_free_gpu(env: Env) -> None:
    # Host b's GPUs are larger, so binpack (least left over) tries host a first.
    env.start_worker("a", FAKE_VLLM_BUSY_GPUS="*")
    env.start_worker("b", SAGELLM_MOCK_GPUS="2x96")
    env.start_beat()
    rec = start_engine(env.cluster, EngineSpec(model=QWEN, served_model_name="qwen"))
    assert rec.host == "a"

    rec = _settled(env, rec.id)
    assert rec.state is S.RUNNING, rec.last_error
    assert rec.host == "b" and rec.remediations == 2
    hosts = [e["host"] for e in _events(env, rec.id) if e["kind"] == "remediated"]
    assert hosts == ["a", "b"]  # a's other GPU first, then host b
    reservation = env.cluster.ledger.reservation(rec.id)
    assert reservation is not None and reservation.host == "b"
    assert env.cluster.ledger.gpu_reservations("a", [mock_uuid("a", i) for i in range(2)]) == {
        mock_uuid("a", 0): {},
        mock_uuid("a", 1): {},
    }


def test_a_pinned_request_is_not_changed_behind_the_users_back(env: Env) -> None:
    busy = mock_uuid("a", 0)
    env.start_worker("a", FAKE_VLLM_BUSY_GPUS=busy, FAKE_VLLM_KV_LIMIT="20000")
    env.start_beat()
    on_gpu0 = start_engine(
        env.cluster, EngineSpec(model=QWEN, served_model_name="pinned-gpu", gpu_ids=(0,))
    )
    rec = _settled(env, on_gpu0.id)
    assert rec.state is S.FAILED and [g.index for g in rec.gpus] == [0]
    assert rec.failure is not None and rec.failure["reason"] == "insufficient_free_memory"
    assert "pinned gpu_ids [0]" in (rec.last_error or "")
    assert rec.remediations == 0

    # max_model_len pinned at 30000 (over the stand-in's 20000) on the free GPU 1
    long = start_engine(
        env.cluster,
        EngineSpec(model=LLAMA, served_model_name="pinned-len", max_model_len=30000, gpu_ids=(1,)),
    )
    rec = _settled(env, long.id)
    assert rec.state is S.FAILED and rec.launch["max_model_len"] == 30000
    assert rec.failure is not None and rec.failure["reason"] == "kv_cache_too_small"
    assert "pinned max_model_len (30000)" in (rec.last_error or "")
    assert "max_model_len 20000 or less" in rec.failure["advice"]
    assert len(_calls(env)) == 2  # one start each, no relaunch
    assert env.cluster.ledger.is_empty()


def test_a_model_that_does_not_exist_is_not_restarted(env: Env) -> None:
    # A repo id passes admission (a host downloads it at start); the hub says no.
    env.start_worker("a", FAKE_VLLM_CHECK_MODEL="1")
    env.start_beat()
    t0 = time.monotonic()
    rec = start_engine(
        env.cluster,
        EngineSpec(
            model="Qwen/Qwen2.5-7B-Instrcut", served_model_name="typo", required_memory_gb=20
        ),
    )
    rec = _settled(env, rec.id)
    took = time.monotonic() - t0
    assert rec.state is S.FAILED
    assert rec.failure is not None and rec.failure["reason"] == "model_not_found"
    assert "not restarted" in (rec.last_error or "")
    assert rec.restart_count == 0 and len(_calls(env)) == 1
    assert env.cluster.ledger.is_empty()
    assert took < 10, took  # not three restarts with backoff


def test_a_local_path_that_no_host_has_is_refused_at_admission(env: Env) -> None:
    env.start_worker("a")
    registry = env.cluster.registry
    settings = env.cluster.settings
    wait_until(lambda: QWEN in host_model_facts(registry.r, "a"), 30, what="host a's model facts")
    admit(settings, EngineSpec(model=QWEN), registry)  # on host a: fine
    typo = str(FIXTURES / "Qwen2.5-1.5B-Instrcut")
    with pytest.raises(ValidationError) as info:
        admit(settings, EngineSpec(model=typo), registry)
    assert info.value.field == "model" and "is on no host" in info.value.message
    admit(settings, EngineSpec(model="Qwen/Qwen2.5-7B-Instrcut"), registry)  # a repo id
    admit(settings, EngineSpec(model=typo))  # without the registry: as before
