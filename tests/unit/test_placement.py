"""Placement: filters, policies, reasons. Pure, no Redis."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from app.core.allocation import Allocation, plan
from app.core.errors import PlacementError, UnknownPolicyError, ValidationError
from app.core.gpus import GpuCapacity
from app.core.memory import ModelFacts, model_facts
from app.core.placement import (
    POLICIES,
    PlacementHost,
    PlacementRequest,
    apply_placement,
    explain,
    make_policy,
    place,
)
from app.core.spec import EngineSpec

GB = 1024


def host(
    name: str,
    free_gb: list[float],
    *,
    outside_gb: float = 0,
    total_gb: float = 80,
    ports: frozenset[int] = frozenset(),
    up: bool = True,
    engines: int = 0,
) -> PlacementHost:
    gpus = tuple(
        GpuCapacity(
            name,
            i,
            f"GPU-{name}{i}",
            int(total_gb * GB),
            int(outside_gb * GB),
            int((total_gb - outside_gb - f) * GB),
        )
        for i, f in enumerate(free_gb)
    )
    return PlacementHost(name, f"10.0.0.{ord(name[0])}", gpus, (8100, 8104), ports, engines, up)


def req(n: int = 1, gb: float = 10, **kw: object) -> PlacementRequest:
    return PlacementRequest(gpu_count=n, memory_mib_per_gpu=int(gb * GB), **kw)  # type: ignore[arg-type]


def test_binpack_picks_the_tightest_gpu_that_fits() -> None:
    hosts = [host("a", [70, 20]), host("b", [15, 60])]
    p = place(req(gb=12), hosts, "binpack", margin_mib=0)
    assert (p.host, [g.index for g in p.gpus]) == ("b", [0])  # 15 GB free: tightest fit


def test_spread_picks_the_emptiest_gpu() -> None:
    hosts = [host("a", [70, 20]), host("b", [15, 60])]
    p = place(req(gb=12), hosts, "spread", margin_mib=0)
    assert (p.host, [g.index for g in p.gpus]) == ("a", [0])


def test_margin_is_subtracted_from_free_memory() -> None:
    hosts = [host("a", [10.5])]
    assert place(req(gb=10), hosts, "binpack", margin_mib=0).host == "a"
    with pytest.raises(PlacementError, match=r"host a, GPU 0: 9\.5 GB free, 10\.0 GB needed"):
        place(req(gb=10), hosts, "binpack", margin_mib=GB)


def test_outside_memory_counts_against_free() -> None:
    h = host("a", [30], outside_gb=50)  # 80 total, 50 held by others, nothing reserved
    assert h.gpus[0].available_mib(0) == 30 * GB
    with pytest.raises(PlacementError, match=r"30\.0 GB free, 33\.0 GB needed"):
        place(req(gb=33), [h], "binpack", margin_mib=0)


def test_nothing_fits_explains_every_host_and_gpu() -> None:
    hosts = [host("a", [21.9, 5]), host("b", [30])]
    with pytest.raises(PlacementError) as err:
        place(req(gb=33), hosts, "binpack", margin_mib=0)
    assert err.value.reasons == [
        "host a, GPU 0: 21.9 GB free, 33.0 GB needed",
        "host a, GPU 1: 5.0 GB free, 33.0 GB needed",
        "host b, GPU 0: 30.0 GB free, 33.0 GB needed",
    ]
    assert "no room for engine" in err.value.message


def test_tensor_parallel_uses_gpus_of_one_host_only() -> None:
    # 2 GPUs fit on a (one each) and 1 on b: TP 2 may not span a0 + b0.
    hosts = [host("a", [40, 5]), host("b", [40])]
    with pytest.raises(PlacementError) as err:
        place(req(n=2, gb=30), hosts, "binpack", margin_mib=0)
    assert "host b: 1 GPU(s), 2 needed" in err.value.message
    p = place(req(n=2, gb=4), hosts, "binpack", margin_mib=0)
    assert p.host == "a" and sorted(g.index for g in p.gpus) == [0, 1]


def test_tensor_parallel_above_every_host_is_bad_input() -> None:
    with pytest.raises(ValidationError, match=r"tensor_parallel: 4 GPUs needed .* has 2"):
        place(req(n=4), [host("a", [80, 80]), host("b", [80])], "binpack", margin_mib=0)


def test_host_whose_capacity_is_not_republished_yet_is_full_not_bad_input() -> None:
    # After a lost Redis a host re-takes its engines' room before it offers capacity
    # again: for that moment its GPUs are unknown to the ledger, not absent.
    from dataclasses import replace

    rebuilding = replace(host("a", []), inventory_gpus=2)
    with pytest.raises(PlacementError):
        place(req(n=1), [rebuilding], "binpack", margin_mib=0)


def test_pinned_host_is_honoured_or_refused_with_reason() -> None:
    hosts = [host("a", [70]), host("b", [15])]
    assert place(req(gb=10, host="b"), hosts, "spread", margin_mib=0).host == "b"
    with pytest.raises(PlacementError, match=r"host b, GPU 0: 15\.0 GB free, 20\.0 GB needed"):
        place(req(gb=20, host="b"), hosts, "binpack", margin_mib=0)
    with pytest.raises(PlacementError, match="host 'zz' is not known"):
        place(req(host="zz"), hosts, "binpack", margin_mib=0)


def test_pinned_gpu_ids_are_honoured_or_refused() -> None:
    hosts = [host("a", [70, 20, 50])]
    p = place(req(n=2, gb=15, gpu_ids=(1, 2)), hosts, "spread", margin_mib=0)
    assert sorted(g.index for g in p.gpus) == [1, 2]
    with pytest.raises(PlacementError, match=r"host a, GPU 1: 20\.0 GB free, 25\.0 GB needed"):
        place(req(n=1, gb=25, gpu_ids=(1,)), hosts, "binpack", margin_mib=0)
    with pytest.raises(PlacementError, match=r"host a: no GPU 7"):
        place(req(n=1, gpu_ids=(7,)), hosts, "binpack", margin_mib=0)


def test_down_host_is_never_chosen() -> None:
    hosts = [host("a", [80], up=False), host("b", [20])]
    assert place(req(gb=10), hosts, "spread", margin_mib=0).host == "b"
    with pytest.raises(PlacementError, match="host a: down"):
        place(req(gb=10, host="a"), hosts, "spread", margin_mib=0)


def test_cpu_engine_needs_no_gpu_and_gets_a_port() -> None:
    hosts = [host("a", []), host("b", [80])]
    p = place(req(n=0, gb=0), hosts, "binpack", margin_mib=0)
    assert p.gpus == () and p.port == 8100


def test_port_pinned_taken_or_outside_range() -> None:
    hosts = [host("a", [80], ports=frozenset({8100, 8101}))]
    assert place(req(), hosts, "binpack", margin_mib=0).port == 8102
    assert place(req(port=8104), hosts, "binpack", margin_mib=0).port == 8104
    with pytest.raises(PlacementError, match="port 8101 is already reserved"):
        place(req(port=8101), hosts, "binpack", margin_mib=0)
    with pytest.raises(ValidationError, match=r"port: 9000 is outside .*8100-8104"):
        place(req(port=9000), hosts, "binpack", margin_mib=0)
    full = [host("a", [80], ports=frozenset(range(8100, 8105)))]
    with pytest.raises(PlacementError, match="every port in 8100-8104 is reserved"):
        place(req(), full, "binpack", margin_mib=0)


def test_unknown_policy_is_an_error_not_a_fallback() -> None:
    assert set(POLICIES) == {"binpack", "spread"}
    with pytest.raises(UnknownPolicyError, match="unknown placement policy 'best'"):
        make_policy("best")
    with pytest.raises(UnknownPolicyError):
        place(req(), [host("a", [80])], "best", margin_mib=0)


def test_negative_memory_is_bad_input() -> None:
    with pytest.raises(ValidationError, match="required_memory_gb"):
        PlacementRequest(gpu_count=1, memory_mib_per_gpu=-1)


def test_no_hosts_says_to_start_a_worker() -> None:
    with pytest.raises(PlacementError, match="start a worker"):
        place(req(), [], "binpack", margin_mib=0)


def test_apply_placement_lets_a_plan_place_several_engines() -> None:
    hosts = [host("a", [40])]
    first = place(req(gb=30), hosts, "binpack", margin_mib=0)
    after = apply_placement(hosts, first)
    assert after[0].gpus[0].available_mib(0) == 10 * GB
    assert first.port in after[0].ports_taken
    with pytest.raises(PlacementError, match=r"10\.0 GB free, 30\.0 GB needed"):
        place(req(gb=30), after, "binpack", margin_mib=0)


def test_explain_lists_candidates_then_rejections() -> None:
    lines = explain(req(gb=30), [host("a", [40]), host("b", [10])], "binpack", margin_mib=0)
    assert lines[0].startswith("candidate 1: host a, GPUs 0, port 8100")
    assert lines[1] == "rejected: host b, GPU 0: 10.0 GB free, 30.0 GB needed"


# ----------------------------------------------------------------------------- model files
#
# The estimate is made from the facts of the hosts that have the model's files, and
# where the files are decides where it may run (app.core.allocation.place_requirement).
# A tiny decoder: 2 layers, hidden 64, 4 heads (head_dim 16), 2 KV heads, vocab 1000,
# max 4096 tokens; its safetensors hold 3 GiB of weights (host "b" measured them).
# Estimate on one GPU: weights 3072 MiB; KV 2 * 2 layers * 2 heads * 16 * 2 B = 256 B/token
# * 4096 = 1 MiB; overhead 1536 + ceil(3072 * 0.05 = 153.6) = 1690; headroom 192
# -> 3072 + 1 + 1690 + 192 = 4955 MiB.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
}
TINY_MIB = 4955


def tiny_facts(key: str) -> ModelFacts:
    return model_facts(key, key, TINY_CONFIG, weights_bytes=3 * 1024 * GB * 1024)


def with_models(h: PlacementHost, *keys: str) -> PlacementHost:
    return replace(h, models={k: tiny_facts(k) for k in keys})


def plan_of(model: str, hosts: list[PlacementHost], **spec: Any) -> Allocation:
    return plan(EngineSpec(model=model, **spec), hosts, policy="binpack", margin_mib=0)


def test_a_local_model_on_one_host_is_estimated_from_its_facts_and_placed_there() -> None:
    # binpack would pick a's tighter GPU; only b has the files.
    hosts = [host("a", [10]), with_models(host("b", [70]), "/models/tiny")]
    alloc = plan_of("/models/tiny/", hosts)  # spelt with a trailing slash
    assert alloc.placement.host == "b"
    assert alloc.estimate is not None and alloc.estimate.source == "safetensors"
    assert alloc.placement.memory_mib_per_gpu == alloc.estimate.per_gpu_mib == TINY_MIB
    assert alloc.estimate.explain().endswith("(size from safetensors; measured on host b)")


def test_a_local_model_pinned_to_a_host_without_its_files_is_refused_with_the_reason() -> None:
    hosts = [host("a", [70]), with_models(host("b", [70]), "/models/tiny")]
    with pytest.raises(PlacementError) as err:
        plan_of("/models/tiny", hosts, host="a")
    assert err.value.reasons == [
        "host a: does not have /models/tiny's model files (host b has them)"
    ]


def test_a_hub_model_prefers_the_hosts_that_have_it_and_else_goes_anywhere() -> None:
    hosts = [host("a", [10]), with_models(host("b", [70]), "org/tiny")]
    assert plan_of("org/tiny", hosts).placement.host == "b"
    full = [host("a", [10]), with_models(host("b", [2]), "org/tiny")]
    alloc = plan_of("org/tiny", full)  # b has it but no room: a downloads it
    assert alloc.placement.host == "a" and alloc.placement.memory_mib_per_gpu == TINY_MIB


def test_the_facts_of_a_down_host_are_not_used() -> None:
    hosts = [host("a", [70]), with_models(host("b", [70], up=False), "/models/tiny-7B")]
    alloc = plan_of("/models/tiny-7B", hosts)
    assert alloc.placement.host == "a"
    assert alloc.estimate is not None and alloc.estimate.source == "name"


def test_a_model_on_no_host_is_sized_from_its_name_and_says_so() -> None:
    alloc = plan_of("org/Nowhere-7B", [host("a", [70])])
    assert alloc.estimate is not None and alloc.estimate.source == "name"
    assert alloc.estimate.explain().endswith("(size from name; no host has its files on disk)")


def test_hosts_with_different_snapshots_reserve_the_larger_estimate() -> None:
    small = replace(tiny_facts("org/tiny"), weights_bytes=1024 * GB * 1024)
    hosts = [
        replace(host("a", [70]), models={"org/tiny": small}),
        with_models(host("b", [70]), "org/tiny"),
    ]
    alloc = plan_of("org/tiny", hosts)
    assert alloc.estimate is not None and alloc.estimate.per_gpu_mib == TINY_MIB
