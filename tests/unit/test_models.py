"""Engine specs, records and the state machine."""

from __future__ import annotations

import pytest

from app.core.errors import IllegalTransition, ValidationError
from app.core.gpus import GpuInfo, GpuProcess
from app.core.models import (
    ALLOWED_TRANSITIONS,
    EngineRecord,
    EngineState,
    GpuAssignment,
    check_transition,
)
from app.core.spec import EngineKind, EngineSpec, load_spec

S = EngineState


def test_documented_lifecycle_is_allowed() -> None:
    for a, b in [
        (S.PENDING, S.STARTING),
        (S.STARTING, S.RUNNING),
        (S.RUNNING, S.UNHEALTHY),
        (S.UNHEALTHY, S.RUNNING),
        (S.RUNNING, S.STOPPING),
        (S.STOPPING, S.STOPPED),
        (S.STARTING, S.FAILED),
        (S.PENDING, S.FAILED),
        (S.UNHEALTHY, S.STARTING),
        (S.FAILED, S.STARTING),
        (S.RUNNING, S.LOST),
        (S.LOST, S.RUNNING),
    ]:
        check_transition(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (S.STOPPED, S.RUNNING),
        (S.PENDING, S.RUNNING),
        (S.RUNNING, S.STARTING),
        (S.STOPPING, S.RUNNING),
        (S.FAILED, S.RUNNING),
        (S.RUNNING, S.RUNNING),
    ],
)
def test_illegal_transitions_raise(a: EngineState, b: EngineState) -> None:
    with pytest.raises(IllegalTransition, match=f"{a.value} -> {b.value}"):
        check_transition(a, b)


def test_stopped_is_terminal_and_every_state_has_rules() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(EngineState)
    assert ALLOWED_TRANSITIONS[S.STOPPED] == frozenset()
    # the only way into RUNNING is from STARTING, UNHEALTHY or LOST (a health check)
    into_running = {a for a, bs in ALLOWED_TRANSITIONS.items() if S.RUNNING in bs}
    assert into_running == {S.STARTING, S.UNHEALTHY, S.LOST}


def test_record_transition_refuses_and_keeps_state() -> None:
    rec = EngineRecord(id="e1", spec=EngineSpec(model="m"))
    with pytest.raises(IllegalTransition):
        rec.transition(S.RUNNING)
    assert rec.state is S.PENDING
    rec.transition(S.STARTING)
    rec.transition(S.FAILED, error="exit 1")
    assert (rec.state, rec.last_error) == (S.FAILED, "exit 1")


def test_record_round_trips_through_dict() -> None:
    rec = EngineRecord(
        id="e1",
        spec=EngineSpec(
            model="Qwen/Qwen2.5-1.5B-Instruct",
            tensor_parallel=2,
            gpu_ids=(0, 1),
            extra_args=("--enforce-eager",),
            env={"OMP_NUM_THREADS": "1"},
        ),
        host="a",
        address="10.0.0.1",
        port=8100,
        gpus=[GpuAssignment(0, "GPU-x", 1000), GpuAssignment(1, "GPU-y", 1000)],
    )
    back = EngineRecord.from_dict(rec.to_dict())
    assert back == rec
    assert rec.to_dict()["base_url"] == "http://10.0.0.1:8100"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": ""}, "model"),
        ({"model": "Qwen/Qwen2.5; rm -rf /"}, "model"),
        ({"model": "$(reboot)"}, "model"),
        ({"model": "m", "tensor_parallel": 0}, "tensor_parallel"),
        ({"model": "m", "pipeline_parallel": -1}, "pipeline_parallel"),
        ({"model": "m", "tensor_parallel": "2"}, "tensor_parallel"),
        ({"model": "m", "required_memory_gb": -3}, "required_memory_gb"),
        ({"model": "m", "port": 70000}, "port"),
        ({"model": "m", "kind": "vision"}, "kind"),
        ({"model": "m", "kind": "embedding", "runtime": "vllm"}, "runtime"),
        ({"model": "m", "gpu_ids": [0, 0], "tensor_parallel": 2}, "gpu_ids"),
        ({"model": "m", "gpu_ids": [0, 1]}, "gpu_ids"),
        ({"model": "m", "extra_args": "--x 1"}, "extra_args"),
        ({"model": "m", "env": {"CUDA_VISIBLE_DEVICES": "0"}}, "env"),
        ({"model": "m", "env": {"SAGELLM_ENGINE_ID": "x"}}, "env"),
        ({"model": "m", "env": {"LD_PRELOAD": "/tmp/x.so"}}, "env"),
        ({"model": "m", "env": {"PYTHONPATH": "/tmp"}}, "env"),
        ({"model": "m", "env": {"VLLM_PLUGINS": "evil"}}, "env"),
        ({"model": "m", "env": {"HF_HUB_OFFLINE": "1\nLD_PRELOAD=x"}}, "env"),
        ({"model": "m", "bogus": 1}, "bogus"),
        ({"model": "m", "label": "has space"}, "label"),
    ],
)
def test_bad_spec_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        load_spec(data)
    assert err.value.field == field
    assert err.value.message.startswith(field)


def test_gpu_use_defaults_by_kind() -> None:
    assert EngineSpec(model="m").gpu_count == 1
    assert EngineSpec(model="m", tensor_parallel=2, pipeline_parallel=2).gpu_count == 4
    assert EngineSpec(model="m", kind=EngineKind.EMBEDDING).gpu_count == 0
    assert EngineSpec(model="m", kind=EngineKind.EMBEDDING, use_gpu=True).gpu_count == 1
    assert EngineSpec(model="m", use_gpu=False).gpu_count == 0
    assert EngineSpec(model="m").effective_runtime == "vllm"
    assert EngineSpec(model="m", kind=EngineKind.EMBEDDING).effective_runtime == "embedding"


def test_outside_memory_excludes_our_processes() -> None:
    gpu = GpuInfo(
        0,
        "GPU-x",
        "H100",
        total_mib=80000,
        free_mib=50000,
        processes=(GpuProcess(10, 20000), GpuProcess(11, 8000), GpuProcess(12, None)),
    )
    assert gpu.outside_mib(set()) == 30000
    assert gpu.outside_mib({10}) == 10000
    assert gpu.outside_mib({10, 12}) == 10000  # unattributed memory stays outside


def test_model_ids_and_paths_are_accepted() -> None:
    for model in [
        "Qwen/Qwen2.5-7B-Instruct",
        "/models/llama-3.1-8b",
        "~/m/bge-m3",
        "BAAI/bge-small-zh-v1.5",
        "org/name@main",
    ]:
        EngineSpec(model=model).validate()
