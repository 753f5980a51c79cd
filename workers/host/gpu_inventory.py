"""The GPU inventory of this host: NVML, a mock spec, or none.

``read_inventory`` is what the worker's heartbeat publishes and what placement's
``outside`` memory is computed from. It never invents a GPU: a host where NVML is
missing or broken has zero GPUs, and ``Inventory.error`` says why.

``our_engine_pids`` finds the processes we started (tagged ``SAGELLM_ENGINE_ID``) so
that memory NVML attributes to them is not counted as held by someone else.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import psutil

from app.core.engine_policy import ENGINE_ID_ENV
from app.core.gpus import GpuCapacity, GpuInfo, GpuProcess
from app.core.inventory_spec import parse_mock_gpus
from app.settings import Settings

InventorySource = Literal["nvml", "mock", "none"]

_BYTES_PER_MIB = 1024 * 1024
# NVML's "value not available" for unsigned long long fields (e.g. usedGpuMemory on
# WDDM or in some containers). Recent pynvml maps it to None; older versions don't.
_NVML_VALUE_NOT_AVAILABLE = 2**64 - 1

# pynvml's init/shutdown keep a process-wide refcount and the library handle without
# being safe to interleave from several threads (a heartbeat thread and a task may
# both read the inventory), so one reader at a time.
_NVML_LOCK = threading.Lock()


@dataclass(frozen=True)
class Inventory:
    """The GPUs of this host as read once, where they came from, and any problem."""

    gpus: tuple[GpuInfo, ...]
    source: InventorySource
    driver_version: str | None = None
    error: str | None = None


def read_inventory(settings: Settings) -> Inventory:
    """Read this host's GPUs: the mock spec if set, none if NVML is disabled, else NVML.

    Never raises for a missing or broken NVML: that host has zero GPUs and ``error``
    says why. A malformed mock spec raises ``ConfigError`` (it names the variable).
    Cheap enough to call every few seconds.
    """
    if settings.mock_gpus:
        gpus = parse_mock_gpus(settings.mock_gpus, settings.host_name)
        return Inventory(gpus=tuple(gpus), source="mock")
    if settings.disable_nvml:
        return Inventory(gpus=(), source="none", error="NVML disabled (SAGELLM_DISABLE_NVML=1)")
    return _read_nvml()


def _read_nvml() -> Inventory:
    try:
        import pynvml
    except ImportError as exc:
        return Inventory(gpus=(), source="none", error=f"nvidia-ml-py is not installed: {exc}")
    with _NVML_LOCK:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            # Library not found, driver not loaded, no permission...: a host without GPUs.
            return Inventory(gpus=(), source="none", error=f"NVML unavailable: {exc}")
        try:
            return _read_initialised(pynvml)
        finally:
            # A failed shutdown leaves nothing to undo: the next read initialises again.
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()


def _read_initialised(nvml: ModuleType) -> Inventory:
    try:
        driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError:
        driver = None
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return Inventory(
            gpus=(), source="none", driver_version=driver, error=f"NVML device count: {exc}"
        )
    gpus: list[GpuInfo] = []
    problems: list[str] = []
    for index in range(count):
        try:
            gpus.append(_read_device(nvml, index))
        except nvml.NVMLError as exc:
            # A lost or resetting GPU is left out (placement can't use it) rather than
            # hiding the others; the index stays NVML's, so the rest keep theirs.
            problems.append(f"GPU {index}: {exc}")
    return Inventory(
        gpus=tuple(gpus),
        source="nvml",
        driver_version=driver,
        error="; ".join(problems) or None,
    )


def _read_device(nvml: ModuleType, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:
        utilization = None  # not supported on some GPUs / MIG: unknown, not 0
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_mib=int(memory.total) // _BYTES_PER_MIB,
        free_mib=int(memory.free) // _BYTES_PER_MIB,
        utilization_pct=utilization,
        processes=_compute_processes(nvml, handle),
    )


def _compute_processes(nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
    try:
        infos = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError_FunctionNotFound:
        # Drivers older than the _v3 entry point that recent pynvml calls by default.
        try:
            infos = nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)
        except nvml.NVMLError:
            return ()
    except nvml.NVMLError:
        # Without attribution every byte used counts as outside: conservative.
        return ()
    processes = []
    for info in infos:
        used = getattr(info, "usedGpuMemory", None)
        used_mib = None if used is None or used == _NVML_VALUE_NOT_AVAILABLE else int(used)
        processes.append(
            GpuProcess(
                pid=int(info.pid),
                # Floor: under-stating our own use over-states outside use, never the reverse.
                used_mib=None if used_mib is None else used_mib // _BYTES_PER_MIB,
            )
        )
    return tuple(processes)


def _text(value: str | bytes) -> str:
    # pynvml returns str since 11.x and bytes before.
    return value.decode() if isinstance(value, bytes) else str(value)


def engine_pids() -> dict[int, str]:
    """Live processes we started, pid -> engine id (``SAGELLM_ENGINE_ID``).

    Includes every descendant of a tagged process and every member of a session a
    tagged process leads: vLLM's engine-core and tensor-parallel workers hold GPU memory,
    and setproctitle wipes their environment (so their tag), and they may outlive their
    leader. Processes whose environment we may not read are skipped: an engine runs as
    the worker's user, so those are not ours.
    """
    tagged: dict[int, str] = {}
    children: dict[int, list[int]] = {}
    sessions: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["pid", "ppid"]):
        pid, ppid = proc.info["pid"], proc.info["ppid"]
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
        with contextlib.suppress(OSError):
            sessions.setdefault(os.getsid(pid), []).append(pid)
        try:
            tag = proc.environ().get(ENGINE_ID_ENV)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if tag:
            tagged[pid] = tag
    ours: dict[int, str] = {}
    stack = [(pid, tag) for pid, tag in tagged.items()]
    while stack:
        pid, tag = stack.pop()
        if pid in ours:
            continue
        ours[pid] = tagged.get(pid, tag)
        stack.extend((c, ours[pid]) for c in children.get(pid, ()))
        stack.extend((m, ours[pid]) for m in sessions.get(pid, ()))  # pid leads a session
    return ours


def our_engine_pids() -> set[int]:
    """Pids of live processes we started (see ``engine_pids``)."""
    return set(engine_pids())


def gpu_capacities(
    inventory: Inventory,
    host: str,
    our_pids: Mapping[int, str] | AbstractSet[int],
    reserved: Mapping[str, Mapping[str, int]] | None = None,
) -> list[GpuCapacity]:
    """Each GPU of ``inventory`` as placement sees it: total and memory held by others.

    ``reserved``: per GPU uuid, MiB each engine holds in the ledger; an engine's use
    beyond its reservation then counts as outside (see ``GpuInfo.outside_mib``).
    """
    return [
        GpuCapacity(
            host=host,
            index=gpu.index,
            uuid=gpu.uuid,
            total_mib=gpu.total_mib,
            outside_mib=gpu.outside_mib(
                our_pids, None if reserved is None else reserved.get(gpu.uuid, {})
            ),
        )
        for gpu in inventory.gpus
    ]
