"""GPU inventory: mock specs, hosts without GPUs, NVML reading, and finding our engines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from app.core.errors import ConfigError
from app.core.gpus import GpuCapacity, GpuInfo, GpuProcess
from app.core.inventory_spec import parse_mock_gpus
from app.settings import Settings
from workers.host.gpu_inventory import (
    ENGINE_ID_ENV,
    Inventory,
    gpu_capacities,
    our_engine_pids,
    read_inventory,
)

MIB = 1024 * 1024


def settings(**env: str) -> Settings:
    return Settings.from_env({"SAGELLM_HOST_NAME": "host-a", **env})


# ---------------------------------------------------------------------------- mock


def test_mock_spec_gives_gpus_in_index_order_with_outside_memory_as_used() -> None:
    inv = read_inventory(
        settings(
            SAGELLM_MOCK_GPUS='[{"total_gb": 80, "outside_gb": 10, "name": "A100"}, '
            '{"total_gb": 24}]'
        )
    )
    assert inv.source == "mock"
    assert inv.error is None
    assert [g.index for g in inv.gpus] == [0, 1]
    a100, small = inv.gpus
    assert (a100.name, a100.total_mib, a100.free_mib, a100.used_mib) == (
        "A100",
        80 * 1024,
        70 * 1024,
        10 * 1024,
    )
    assert (small.total_mib, small.free_mib) == (24 * 1024, 24 * 1024)


@pytest.mark.parametrize(
    ("spec", "sizes_gb"),
    [("2x80", [80, 80]), ("2x80,1x24", [80, 80, 24]), ("80,24", [80, 24]), (" 1X40.5 ", [40.5])],
)
def test_mock_shorthand_forms(spec: str, sizes_gb: list[float]) -> None:
    inv = read_inventory(settings(SAGELLM_MOCK_GPUS=spec))
    assert [g.total_mib for g in inv.gpus] == [round(gb * 1024) for gb in sizes_gb]
    assert all(g.free_mib == g.total_mib for g in inv.gpus)


@pytest.mark.parametrize("spec", ["none", "NONE", "0"])
def test_mock_none_is_a_host_with_zero_gpus(spec: str) -> None:
    inv = read_inventory(settings(SAGELLM_MOCK_GPUS=spec))
    assert inv.gpus == ()


@pytest.mark.parametrize(
    "spec",
    [
        "2x",
        "x80",
        "abc",
        "-1",
        "0x80",
        "65x80",
        "2x80,,1x24",
        '[{"total_gb": -5}]',
        '[{"total_gb": 0}]',
        '[{"total_gb": "80"}]',
        '[{"total_gb": true}]',
        '[{"outside_gb": 1}]',
        '[{"total_gb": 24, "outside_gb": 30}]',
        '[{"total_gb": 24, "outside_gb": -1}]',
        '[{"total_gb": 80, "memory": 1}]',
        '[{"total_gb": 80, "utilization_pct": "busy"}]',
        '[{"total_gb": 80, "utilization_pct": 101}]',
        "[80]",
        '{"total_gb": 80}',
        "[{not json",
    ],
)
def test_malformed_mock_spec_is_config_error_naming_the_variable(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mock_gpus(spec, "host-a")
    assert info.value.field == "SAGELLM_MOCK_GPUS"
    assert "SAGELLM_MOCK_GPUS" in str(info.value)
    # Settings validate it at start-up too, so a bad value never reaches a heartbeat.
    with pytest.raises(ConfigError, match="SAGELLM_MOCK_GPUS"):
        settings(SAGELLM_MOCK_GPUS=spec)


def test_malformed_mock_error_says_what_was_wrong() -> None:
    with pytest.raises(ConfigError, match="outside_gb"):
        parse_mock_gpus('[{"total_gb": 24, "outside_gb": 30}]', "h")
    with pytest.raises(ConfigError, match="unknown field 'memory'"):
        parse_mock_gpus('[{"total_gb": 80, "memory": 1}]', "h")
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_mock_gpus("[{not json", "h")


def test_mock_uuids_are_stable_per_host_and_index_and_distinct_across_hosts() -> None:
    first = [g.uuid for g in parse_mock_gpus("2x80", "host-a")]
    again = [g.uuid for g in parse_mock_gpus("2x80,1x24", "host-a")]
    other = [g.uuid for g in parse_mock_gpus("2x80", "host-b")]
    assert all(u.startswith("GPU-") for u in first + other)
    assert first == again[:2]  # same host and index: same GPU after a restart
    assert len(set(first)) == 2
    assert not set(first) & set(other)


def test_mock_wins_over_nvml_settings() -> None:
    inv = read_inventory(settings(SAGELLM_MOCK_GPUS="1x80", SAGELLM_DISABLE_NVML="1"))
    assert inv.source == "mock"
    assert len(inv.gpus) == 1


# ---------------------------------------------------------------------------- no GPUs


def test_disable_nvml_gives_zero_gpus_without_touching_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom() -> None:
        raise AssertionError("NVML must not be initialised when disabled")

    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    inv = read_inventory(settings(SAGELLM_DISABLE_NVML="1"))
    assert (inv.gpus, inv.source) == ((), "none")
    assert inv.error is not None and "SAGELLM_DISABLE_NVML" in inv.error


@pytest.mark.parametrize(
    "error", [pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded]
)
def test_missing_nvml_library_or_driver_gives_zero_gpus_and_the_reason(
    monkeypatch: pytest.MonkeyPatch, error: type[pynvml.NVMLError]
) -> None:
    def fail() -> None:
        raise error()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    inv = read_inventory(settings())
    assert (inv.gpus, inv.source) == ((), "none")
    assert inv.error is not None and str(error()) in inv.error


def test_missing_nvidia_ml_py_package_gives_zero_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    inv = read_inventory(settings())
    assert (inv.gpus, inv.source) == ((), "none")
    assert inv.error is not None and "nvidia-ml-py" in inv.error


# ---------------------------------------------------------------------------- NVML


class FakeNvml:
    """Stands in for the NVML library behind pynvml's functions (no GPU here)."""

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self.devices = devices
        self.init_calls = 0
        self.shutdown_calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def init() -> None:
            self.init_calls += 1

        def shutdown() -> None:
            self.shutdown_calls += 1

        def device(handle: int) -> dict[str, Any]:
            return self.devices[handle]

        def utilization(handle: int) -> SimpleNamespace:
            util = device(handle)["util"]
            if isinstance(util, Exception):
                raise util
            return SimpleNamespace(gpu=util, memory=0)

        def memory(handle: int) -> SimpleNamespace:
            d = device(handle)
            if "memory_error" in d:
                raise d["memory_error"]
            return SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

        def processes(handle: int) -> list[SimpleNamespace]:
            return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in device(handle)["procs"]]

        for name, fn in {
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlSystemGetDriverVersion": lambda: b"580.159.04",
            "nvmlDeviceGetCount": lambda: len(self.devices),
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetUUID": lambda h: device(h)["uuid"],
            "nvmlDeviceGetName": lambda h: device(h)["name"],
            "nvmlDeviceGetMemoryInfo": memory,
            "nvmlDeviceGetUtilizationRates": utilization,
            "nvmlDeviceGetComputeRunningProcesses": processes,
        }.items():
            monkeypatch.setattr(pynvml, name, fn)


def test_nvml_read_maps_bytes_to_mib_and_handles_str_or_bytes_and_missing_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(
        [
            {
                "uuid": "GPU-aaaa",
                "name": "NVIDIA H100 80GB HBM3",
                "total": 81559 * MIB + 123,
                "free": 80000 * MIB + MIB - 1,  # floors to 80000
                "util": 37,
                "procs": [(4242, 1500 * MIB + 7), (4343, None), (4444, 2**64 - 1)],
            },
            {
                "uuid": b"GPU-bbbb",  # old pynvml returns bytes
                "name": b"NVIDIA A10",
                "total": 24 * 1024 * MIB,
                "free": 24 * 1024 * MIB,
                "util": pynvml.NVMLError_NotSupported(),
                "procs": [],
            },
        ]
    )
    fake.install(monkeypatch)
    inv = read_inventory(settings())
    assert inv.source == "nvml"
    assert inv.driver_version == "580.159.04"
    assert inv.error is None
    h100, a10 = inv.gpus
    assert (h100.index, h100.uuid, h100.name) == (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3")
    assert (h100.total_mib, h100.free_mib, h100.utilization_pct) == (81559, 80000, 37)
    assert h100.processes == (
        GpuProcess(4242, 1500),
        GpuProcess(4343, None),
        GpuProcess(4444, None),
    )
    assert (a10.index, a10.uuid, a10.name, a10.utilization_pct) == (
        1,
        "GPU-bbbb",
        "NVIDIA A10",
        None,
    )
    assert fake.shutdown_calls == fake.init_calls == 1


def test_nvml_device_that_fails_is_left_out_and_reported_others_keep_their_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok = {"uuid": "GPU-ok", "name": "x", "total": 10 * MIB, "free": 5 * MIB, "util": 0, "procs": []}
    lost = dict(ok, uuid="GPU-lost", memory_error=pynvml.NVMLError_GpuIsLost())
    fake = FakeNvml([lost, ok])
    fake.install(monkeypatch)
    inv = read_inventory(settings())
    assert [(g.index, g.uuid) for g in inv.gpus] == [(1, "GPU-ok")]
    assert inv.error is not None and inv.error.startswith("GPU 0:")
    assert fake.shutdown_calls == 1


def test_nvml_is_shut_down_even_when_reading_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([])
    fake.install(monkeypatch)

    def broken() -> int:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", broken)
    with pytest.raises(RuntimeError):
        read_inventory(settings())
    assert fake.shutdown_calls == 1


# ---------------------------------------------------------------------------- outside memory


def gpu(total: int, free: int, procs: tuple[GpuProcess, ...] = ()) -> GpuInfo:
    return GpuInfo(index=0, uuid="GPU-x", name="x", total_mib=total, free_mib=free, processes=procs)


def test_outside_is_used_minus_what_nvml_attributes_to_our_pids() -> None:
    g = gpu(80_000, 50_000, (GpuProcess(10, 20_000), GpuProcess(11, 4_000), GpuProcess(99, 5_000)))
    assert g.used_mib == 30_000
    assert g.outside_mib(set()) == 30_000
    assert g.outside_mib({10}) == 10_000
    assert g.outside_mib({10, 11}) == 6_000  # 99's memory and unattributed 1 000 MiB remain
    assert g.outside_mib(frozenset({10, 11, 99})) == 1_000


def test_outside_counts_unattributed_memory_of_our_pids_and_never_goes_negative() -> None:
    assert gpu(80_000, 70_000, (GpuProcess(10, None),)).outside_mib({10}) == 10_000
    # NVML's per-process numbers can exceed total-free for a moment.
    assert gpu(80_000, 70_000, (GpuProcess(10, 12_000),)).outside_mib({10}) == 0


def test_gpu_capacities_carry_host_uuid_total_and_outside() -> None:
    inv = Inventory(
        gpus=(gpu(80_000, 50_000, (GpuProcess(10, 20_000),)),), source="nvml", driver_version="x"
    )
    assert gpu_capacities(inv, "host-a", {10}) == [
        GpuCapacity(host="host-a", index=0, uuid="GPU-x", total_mib=80_000, outside_mib=10_000)
    ]
    assert gpu_capacities(Inventory(gpus=(), source="none"), "host-a", set()) == []


# ---------------------------------------------------------------------------- our pids


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def spawn_sleeper(procs: list[subprocess.Popen[bytes]], code: str, **env: str) -> int:
    child_env = {k: v for k, v in os.environ.items() if k != ENGINE_ID_ENV} | env
    p = subprocess.Popen([sys.executable, "-c", code], env=child_env)
    procs.append(p)
    return p.pid


def test_our_engine_pids_finds_tagged_process_and_not_untagged(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    sleep = "import time; time.sleep(30)"
    tagged = spawn_sleeper(sleepers, sleep, **{ENGINE_ID_ENV: "eng-test-1"})
    untagged = spawn_sleeper(sleepers, sleep)
    pids = our_engine_pids()
    assert tagged in pids
    assert untagged not in pids
    assert os.getpid() not in pids
    sleepers[0].kill()
    sleepers[0].wait(timeout=10)
    assert tagged not in our_engine_pids()  # a dead engine holds nothing


def test_our_engine_pids_includes_children_that_dropped_the_tag(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    # The tagged parent starts a child with an empty environment (as a worker
    # process could); that child still belongs to our engine.
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], env={})\n"
        "print(c.pid, flush=True)\n"
        "try:\n    time.sleep(30)\nfinally:\n    c.kill()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENGINE_ID_ENV}
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env | {ENGINE_ID_ENV: "eng-test-2"},
        stdout=subprocess.PIPE,
    )
    sleepers.append(parent)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        # The child's /proc entry may appear a moment after its pid is printed.
        deadline = time.monotonic() + 10
        while child not in (pids := our_engine_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {parent.pid, child} <= pids
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
