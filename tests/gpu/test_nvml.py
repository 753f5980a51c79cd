"""The inventory against a real NVIDIA GPU: NVML facts, UUID pinning, our engines' memory.

Skipped (see conftest.py) where NVML sees no GPU; the torch tests also skip where
torch can't use CUDA. Torch only ever runs in child processes, never in the runner.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from app.core.engine_policy import ENGINE_ID_ENV
from app.core.gpus import GpuInfo
from app.settings import Settings
from workers.host.gpu_inventory import Inventory, our_engine_pids, read_inventory

pytestmark = pytest.mark.gpu

ALLOC_MIB = 1024  # what the child engine allocates: 256 Mi float32
ALLOC_CODE = (
    "import time, torch\n"
    "x = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device='cuda')\n"
    "torch.cuda.synchronize()\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)


def nvml_inventory() -> Inventory:
    # An explicit environment: a SAGELLM_MOCK_GPUS in the runner's must not apply here.
    return read_inventory(Settings.from_env({"SAGELLM_HOST_NAME": "gpu-test"}))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENGINE_ID_ENV}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env | {"PYTHONUNBUFFERED": "1"} | extra


def normalise_uuid(raw: str) -> str:
    """'GPU-8f0c...' (NVML) and '8f0c...' (torch) as one comparable form."""
    text = raw.strip().lower().removeprefix("gpu-")
    return str(uuid.UUID(text))


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's next stdout line, or '' if none came within ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> str:
    """Kill ``proc`` if it still runs and reap it; return the end of its stderr."""
    if proc.poll() is None:
        proc.kill()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # a process stuck in the driver: nothing more to do
        return ""
    return (err or "")[-2000:]


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        stop(p)


def test_nvml_inventory_reports_every_gpu_with_uuid_memory_and_name() -> None:
    inv = nvml_inventory()
    assert inv.source == "nvml", inv.error
    assert inv.error is None
    assert inv.driver_version
    assert [g.index for g in inv.gpus] == list(range(len(inv.gpus)))
    assert inv.gpus
    for g in inv.gpus:
        assert g.uuid.startswith("GPU-"), g.uuid
        normalise_uuid(g.uuid)  # a real UUID after the prefix
        assert g.name.strip()
        assert g.total_mib > g.free_mib > 0
        assert g.utilization_pct is None or 0 <= g.utilization_pct <= 100
    assert len({g.uuid for g in inv.gpus}) == len(inv.gpus)


def test_cuda_visible_devices_by_uuid_pins_exactly_that_gpu(
    torch_cuda: None, children: list[subprocess.Popen[str]]
) -> None:
    last = nvml_inventory().gpus[-1]
    code = (
        "import torch\n"
        "print(torch.cuda.device_count())\n"
        "print(torch.cuda.get_device_properties(0).uuid)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=child_env(CUDA_VISIBLE_DEVICES=last.uuid),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    count, torch_uuid = out.split()[:2]
    assert int(count) == 1
    assert normalise_uuid(torch_uuid) == normalise_uuid(last.uuid)


def find_gpu(inv: Inventory, gpu_uuid: str) -> GpuInfo:
    return next(g for g in inv.gpus if g.uuid == gpu_uuid)


def test_memory_of_our_engine_is_not_counted_as_outside(
    torch_cuda: None, children: list[subprocess.Popen[str]]
) -> None:
    target = max(nvml_inventory().gpus, key=lambda g: g.free_mib)
    if target.free_mib < ALLOC_MIB + 2048:
        pytest.skip(f"GPU {target.index} has only {target.free_mib} MiB free")
    proc = subprocess.Popen(
        [sys.executable, "-c", ALLOC_CODE],
        env=child_env(CUDA_VISIBLE_DEVICES=target.uuid, **{ENGINE_ID_ENV: "test-gpu-inventory"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    try:
        line = read_line(proc, timeout=120)
        if line != "ready":
            pytest.fail(f"the child engine did not get ready (said {line!r}): {stop(proc)}")

        deadline = time.monotonic() + 60
        while True:
            gpu = find_gpu(nvml_inventory(), target.uuid)
            mine = [p for p in gpu.processes if p.pid == proc.pid]
            if mine and (mine[0].used_mib or 0) >= 1000:
                break
            assert proc.poll() is None, "the child engine died"
            if time.monotonic() > deadline:
                if not any(psutil.pid_exists(p.pid) for p in gpu.processes):
                    # NVML reports pids of another PID namespace (a container): our
                    # memory then counts as outside, which is conservative but wasteful.
                    pytest.skip(
                        "NVML does not report processes by this PID namespace's pids "
                        f"(saw {[p.pid for p in gpu.processes]}, ours is {proc.pid})"
                    )
                pytest.fail(f"pid {proc.pid} not on GPU {gpu.index} with >= 1000 MiB: {mine}")
            time.sleep(0.5)

        ours = our_engine_pids()
        assert proc.pid in ours
        assert gpu.outside_mib(ours) <= gpu.used_mib - 1000
        assert gpu.outside_mib(set()) == gpu.used_mib  # without the tag it would be outside
    finally:
        stop(proc)

    assert proc.pid not in our_engine_pids()
    deadline = time.monotonic() + 30
    while any(p.pid == proc.pid for p in find_gpu(nvml_inventory(), target.uuid).processes):
        assert time.monotonic() < deadline, f"pid {proc.pid} still on the GPU after it died"
        time.sleep(0.5)
