"""A real engine started through sagellm's own runtime and spawn code on a real GPU:
pinned by UUID, its memory attributed to its pid by NVML, not counted as outside."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.core.models import EngineRecord, GpuAssignment
from app.core.spec import EngineSpec
from app.dev.redis_server import free_port
from app.settings import Settings
from app.state.ledger import port_is_bindable
from workers.host import processes
from workers.host.gpu_inventory import our_engine_pids, read_inventory
from workers.runtimes import get_runtime

pytestmark = pytest.mark.gpu


def test_transformers_engine_pinned_by_uuid_uses_only_its_gpu(
    tmp_path: Path, torch_cuda: None
) -> None:
    from app.dev.demo_model import build_tiny_llm

    model = build_tiny_llm(tmp_path / "tiny")
    inv = read_inventory(Settings.from_env({}))
    target = inv.gpus[-1]
    port = free_port()
    rec = EngineRecord(
        id="eng-gputest0001",
        spec=EngineSpec(model=str(model), runtime="transformers", served_model_name="tiny"),
        host="gpu",
        address="127.0.0.1",
        port=port,
        gpus=[GpuAssignment(target.index, target.uuid, 2048)],
    )
    plan = get_runtime("transformers").build(rec)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == target.uuid
    assert "--device" in plan.argv and plan.argv[plan.argv.index("--device") + 1] == "cuda"
    proc = processes.spawn(plan, tmp_path / "engine.log")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert processes.is_alive(proc.pid, proc.create_time), (
                tmp_path / "engine.log"
            ).read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        env = psutil.Process(proc.pid).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == target.uuid
        assert env["SAGELLM_ENGINE_ID"] == rec.id

        ours = our_engine_pids()
        assert proc.pid in ours
        seen = None
        for _ in range(50):
            now = read_inventory(Settings.from_env({}))
            for gpu in now.gpus:
                for p in gpu.processes:
                    if p.pid in ours:
                        seen = (gpu, p)
            if seen:
                break
            time.sleep(0.2)
        assert seen is not None, "NVML never attributed memory to the engine"
        gpu, gp = seen
        assert gpu.uuid == target.uuid  # on the pinned GPU, and only there
        others = [g for g in now.gpus if g.uuid != target.uuid]
        assert all(p.pid not in ours for g in others for p in g.processes)
        assert gp.used_mib and gp.used_mib > 0
        assert gpu.outside_mib(ours) <= gpu.used_mib - gp.used_mib
        print(f"engine pid {proc.pid} on {gpu.uuid}: {gp.used_mib} MiB attributed by NVML")
    finally:
        result = processes.stop(proc.pid, proc.create_time, 10, engine_id=rec.id)
        assert result.exited
    assert port_is_bindable("127.0.0.1", port)
