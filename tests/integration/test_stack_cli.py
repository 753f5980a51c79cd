"""The CLI against the real stack started by `sagellm up`: gunicorn API, worker, beat
and embedded Redis as real processes, real engines on CPU."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.redis_server import free_port
from tests.integration.harness import BIN, Proc, base_env, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    tmp: Path

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "sagellm"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def api(self, path: str) -> object:
        return httpx.get(f"{self.url}{path}", timeout=10).json()

    def engines(self, preset: str | None = None) -> list[dict[str, object]]:
        out = self.api("/v1/management/engines")
        assert isinstance(out, list)
        return [e for e in out if preset is None or e["spec"]["preset"] == preset]

    def reservations(self) -> list[object]:
        status = self.api("/v1/management/status")
        assert isinstance(status, dict)
        return list(status["reservations"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    url = f"http://127.0.0.1:{free_port()}"
    env = base_env(
        "redis://unused",
        tmp / "data",
        SAGELLM_API_URL=url,
        SAGELLM_MOCK_GPUS="1x24",
        SAGELLM_MAX_RESTARTS="0",
        SAGELLM_HOST_NAME="cpu1",
        SAGELLM_PORT_RANGE="18300-18349",
    )
    env.pop("SAGELLM_REDIS_URL")  # up starts its embedded Redis
    up = Proc("up", [str(BIN / "sagellm"), "up"], env, tmp / "logs").start()
    try:
        wait_until(
            lambda: _get(f"{url}/v1/management/hosts"),
            90,
            interval=0.5,
            what=f"the stack to come up; log:\n{up.output()}",
        )
        yield Stack(url, env, tmp)
    finally:
        down = subprocess.run(
            [str(BIN / "sagellm"), "down"], env=env, capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stderr
        assert not up.alive(), up.output()[-3000:]
        up.stop()


def _get(url: str) -> object:
    try:
        r = httpx.get(url, timeout=2)
        return r.json() if r.status_code == 200 and r.json() else None
    except httpx.HTTPError:
        return None


def test_cpu_demo_dry_run_reserves_nothing(stack: Stack) -> None:
    r = stack.cli("preset", "apply", "-n", "cpu-demo", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tiny-chat" in r.stdout and "minilm" in r.stdout and "cpu1" in r.stdout
    assert stack.reservations() == [] and stack.engines() == []


def test_cpu_demo_apply_runs_real_engines_and_again_starts_nothing(stack: Stack) -> None:
    r = stack.cli("preset", "apply", "-n", "cpu-demo", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    engines = stack.engines("cpu-demo")
    assert sorted(e["spec"]["preset_engine"] for e in engines) == ["minilm", "tiny-chat"]
    assert all(e["state"] == "RUNNING" for e in engines)
    # the production server path (gunicorn) routes to them
    out = httpx.post(
        f"{stack.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"}, timeout=60
    ).json()
    assert len(out["data"][0]["embedding"]) == 384
    chat = httpx.post(
        f"{stack.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "tiny-chat",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    again = stack.cli("preset", "apply", "-n", "cpu-demo", "--yes")
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert len(stack.engines("cpu-demo")) == 2


def test_preset_that_cannot_fit_starts_nothing_and_says_why(stack: Stack) -> None:
    before = stack.reservations()
    f = stack.tmp / "too-big.yaml"
    f.write_text(
        "version: 1\nname: too-big\nengines:\n"
        "  - {name: small, kind: embedding, model: ${SAGELLM_MINILM_PATH}, "
        "served_model_name: small-emb}\n"
        "  - {name: huge, model: org/Huge-70B, required_memory_gb: 40}\n"
    )
    r = stack.cli("preset", "apply", "--file", str(f), "--yes")
    assert r.returncode != 0
    assert "host cpu1, GPU 0:" in r.stdout + r.stderr and "40.0 GB needed" in r.stdout + r.stderr
    assert stack.engines("too-big") == []
    assert stack.reservations() == before


def test_engine_that_fails_at_start_rolls_back_the_others(stack: Stack) -> None:
    before = stack.reservations()
    f = stack.tmp / "half-broken.yaml"
    f.write_text(
        "version: 1\nname: half-broken\nengines:\n"
        "  - {name: good, kind: embedding, model: ${SAGELLM_MINILM_PATH}, "
        "served_model_name: good-emb}\n"
        f"  - {{name: broken, runtime: transformers, use_gpu: false, "
        f"model: {stack.tmp}/no-such-model}}\n"
    )
    r = stack.cli("preset", "apply", "--file", str(f), "--yes", "--timeout", "240")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "broken" in out and "rolled back" in out
    states = {e["spec"]["preset_engine"]: e["state"] for e in stack.engines("half-broken")}
    assert states["broken"] == "FAILED"
    assert states["good"] in ("STOPPING", "STOPPED")
    wait_until(lambda: stack.reservations() == before, 30, what="rollback released everything")
    assert all(
        e["state"] == "STOPPED"
        for e in stack.engines("half-broken")
        if e["spec"]["preset_engine"] == "good"
    )


def test_bad_input_through_the_cli_reserves_nothing(stack: Stack) -> None:
    before = stack.reservations()
    for args in (
        ["engine", "start", "m; rm -rf /", "--memory-gb", "1"],
        ["engine", "start", "m", "--tp", "0"],
        ["engine", "start", "m", "--memory-gb", "1", "--port", "9999"],
        ["preset", "apply", "-n", "no-such-preset", "--yes"],
    ):
        r = stack.cli(*args)
        assert r.returncode != 0, args
        assert r.stderr.strip(), args
    assert stack.reservations() == before
