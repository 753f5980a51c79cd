"""Placement: filters, policies, reasons. Pure, no Redis."""

from __future__ import annotations

import pytest

from app.core.errors import PlacementError, UnknownPolicyError, ValidationError
from app.core.models import GpuCapacity
from app.core.placement import (
    POLICIES,
    PlacementHost,
    PlacementRequest,
    apply_placement,
    explain,
    make_policy,
    place,
)

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
