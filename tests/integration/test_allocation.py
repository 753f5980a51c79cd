"""Estimate -> place -> reserve, on a real redis-server with mock hosts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis

from app.core.allocation import Allocation, plan
from app.core.errors import PlacementError, UnknownPolicyError, ValidationError
from app.core.inventory_spec import parse_mock_gpus
from app.core.memory import ModelFacts, facts_from_config
from app.core.models import EngineRecord, HostRecord
from app.core.spec import EngineKind, EngineSpec
from app.services.models import models_on_hosts
from app.state import keys
from app.state.allocation import allocate, placement_hosts
from app.state.ledger import Ledger
from app.state.model_facts import publish_model_facts
from app.state.registry import Registry
from tests.model_fixtures import FIXTURES
from workers.host.gpu_inventory import Inventory, gpu_capacities

pytestmark = pytest.mark.integration
GB = 1024


def _allocate(
    engine_id: str, spec: EngineSpec, reg: Registry, led: Ledger, **kw: object
) -> Allocation:
    """A new engine's allocation: its record and reservation written in one step."""
    alloc, rec = allocate(
        engine_id,
        spec,
        reg,
        led,
        record=EngineRecord(id=engine_id, spec=spec),
        **kw,  # type: ignore[arg-type]
    )
    assert reg.get(engine_id).port == rec.port == alloc.placement.port
    return alloc


def _add_host(reg: Registry, led: Ledger, name: str, mock: str) -> None:
    gpus = parse_mock_gpus(mock, name)
    inv = Inventory(gpus=tuple(gpus), source="mock")
    led.publish_capacity(name, gpu_capacities(inv, name, set()))
    reg.put_host(HostRecord(name, f"127.0.0.{len(name) + 1}", (8100, 8199), gpus=gpus), ttl_s=60)


@pytest.fixture
def cluster(real_redis: redis.Redis) -> tuple[Registry, Ledger]:
    reg, led = Registry(real_redis), Ledger(real_redis)
    _add_host(reg, led, "a", "2x80")
    _add_host(reg, led, "b", '[{"total_gb": 24, "outside_gb": 10}]')
    return reg, led


def test_allocate_reserves_the_estimate_and_derives_vllm_flags(
    cluster: tuple[Registry, Ledger],
) -> None:
    reg, led = cluster
    spec = EngineSpec(model=str(FIXTURES / "Qwen2.5-1.5B-Instruct"), host="a")
    alloc = _allocate("e1", spec, reg, led, policy="binpack", margin_mib=GB)
    assert alloc.estimate is not None
    mib = alloc.estimate.per_gpu_mib
    assert alloc.reservation is not None and alloc.reservation.gpus == (
        (alloc.placement.gpus[0].uuid, mib),
    )
    assert led.capacity("a")[alloc.placement.gpus[0].index].reserved_mib == mib
    util = alloc.launch["gpu_memory_utilization"]
    assert util <= mib / (80 * GB) and util > mib / (80 * GB) - 0.001


def test_plan_reserves_nothing(cluster: tuple[Registry, Ledger]) -> None:
    reg, led = cluster
    hosts = placement_hosts(reg, led)
    p = plan(
        EngineSpec(model="x/Some-7B", required_memory_gb=20), hosts, policy="spread", margin_mib=GB
    )
    assert p.reservation is None and p.placement.host == "a"
    assert led.is_empty()


def test_nothing_fits_explains_each_host_and_reserves_nothing(
    cluster: tuple[Registry, Ledger],
) -> None:
    reg, led = cluster
    with pytest.raises(PlacementError) as err:
        _allocate(
            "e1",
            EngineSpec(model="m", required_memory_gb=90),
            reg,
            led,
            policy="binpack",
            margin_mib=GB,
        )
    assert "host a, GPU 0: 79.0 GB free, 90.0 GB needed" in err.value.reasons
    assert "host b, GPU 0: 13.0 GB free, 90.0 GB needed" in err.value.reasons
    assert led.is_empty()


@pytest.mark.parametrize(
    ("spec", "policy", "error", "field"),
    [
        (EngineSpec(model="m", required_memory_gb=1), "fastest", UnknownPolicyError, "policy"),
        (
            EngineSpec(model="m", required_memory_gb=-2),
            "binpack",
            ValidationError,
            "required_memory_gb",
        ),
        (
            EngineSpec(model="m", required_memory_gb=1, tensor_parallel=4),
            "binpack",
            ValidationError,
            "tensor_parallel",
        ),
        (
            EngineSpec(model="m", required_memory_gb=1, port=9999),
            "binpack",
            ValidationError,
            "port",
        ),
        (
            EngineSpec(model="m; rm -rf ~", required_memory_gb=1),
            "binpack",
            ValidationError,
            "model",
        ),
        (
            EngineSpec(model="unknown/mystery-model"),
            "binpack",
            ValidationError,
            "required_memory_gb",
        ),
    ],
)
def test_bad_input_is_refused_and_reserves_nothing(
    cluster: tuple[Registry, Ledger],
    spec: EngineSpec,
    policy: str,
    error: type[Exception],
    field: str,
) -> None:
    reg, led = cluster
    with pytest.raises(error) as err:
        _allocate("e1", spec, reg, led, policy=policy, margin_mib=GB)
    assert getattr(err.value, "field", None) == field
    assert led.is_empty()


def test_cpu_embedding_gets_a_port_and_no_gpu(cluster: tuple[Registry, Ledger]) -> None:
    reg, led = cluster
    alloc = _allocate(
        "e1",
        EngineSpec(model="m", kind=EngineKind.EMBEDDING),
        reg,
        led,
        policy="binpack",
        margin_mib=GB,
    )
    assert alloc.placement.gpus == () and alloc.reservation is not None
    assert led.ports(alloc.placement.host) == {alloc.placement.port: "e1"}


def test_concurrent_allocations_never_overcommit(cluster: tuple[Registry, Ledger]) -> None:
    """40 threads place + reserve 30 GB each: exactly as many fit as the room allows."""
    reg, led = cluster
    ok: list[str] = []
    refused: list[str] = []

    def go(i: int) -> None:
        mine = Ledger(led.r)
        try:
            _allocate(
                f"e{i}",
                EngineSpec(model="m", required_memory_gb=30),
                reg,
                mine,
                policy="spread",
                margin_mib=GB,
            )
            ok.append(f"e{i}")
        except PlacementError as exc:
            refused.append(exc.message)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # host a: 2 GPUs x (80 - 1 margin) = 79 GB each -> 2 engines of 30 GB per GPU = 4
    # host b: 24 - 10 outside - 1 margin = 13 GB -> none
    assert len(ok) == 4 and len(refused) == 36
    caps = led.capacity("a")
    assert all(g.reserved_mib == 60 * GB for g in caps)
    assert all("GB free, 30.0 GB needed" in r for r in refused)


def test_ports_other_programs_listen_on_are_not_handed_out(real_redis: redis.Redis) -> None:
    reg, led = Registry(real_redis), Ledger(real_redis)
    gpus = parse_mock_gpus("1x80", "a")
    led.publish_capacity("a", gpu_capacities(Inventory(tuple(gpus), "mock"), "a", set()))
    reg.put_host(
        HostRecord("a", "127.0.0.1", (8100, 8103), gpus=gpus, busy_ports=[8100, 8101]), ttl_s=60
    )
    alloc = _allocate(
        "e1", EngineSpec(model="m", required_memory_gb=1), reg, led, policy="binpack", margin_mib=0
    )
    assert alloc.placement.port == 8102


def test_allocate_uses_the_facts_the_hosts_published(cluster: tuple[Registry, Ledger]) -> None:
    """Qwen2.5-1.5B's config on host b only: estimated from b's facts (5717 MiB, see
    tests/unit/test_memory.py) and reserved there, though binpack alone would choose
    either; a's facts vanish from placement once a is down."""
    reg, led = cluster
    model = str(FIXTURES / "Qwen2.5-1.5B-Instruct")
    facts = facts_from_config(json.loads((Path(model) / "config.json").read_text()), model, model)
    publish_model_facts(reg.r, "b", {model: facts})
    assert placement_hosts(reg, led)[1].models == {model: facts}
    alloc = _allocate("e1", EngineSpec(model=model), reg, led, policy="spread", margin_mib=GB)
    assert alloc.placement.host == "b"  # spread alone would pick a's empty 80 GB GPUs
    assert alloc.estimate is not None and alloc.estimate.per_gpu_mib == 5717
    assert alloc.estimate.source == "config"
    listed = models_on_hosts(reg, default_max_model_len=32768)
    assert [(h["host"], [m["model"] for m in h["models"]]) for h in listed] == [
        ("a", []),
        ("b", [model]),
    ]
    assert listed[1]["models"][0]["estimate"].per_gpu_mib == 5717


def test_the_facts_of_a_down_host_are_not_read_for_placement(
    cluster: tuple[Registry, Ledger],
) -> None:
    reg, led = cluster
    publish_model_facts(reg.r, "b", {"org/x": ModelFacts("org/x", "/hub/x")})
    reg.r.delete(keys.host("b"))  # b's heartbeat expired: DOWN
    by_name = {h.name: h for h in placement_hosts(reg, led)}
    assert not by_name["b"].up and by_name["b"].models == {}
