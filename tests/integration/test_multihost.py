"""Three hosts on one machine: three real workers (SAGELLM_HOST_NAME h1..h3, addresses
127.0.0.2-4, different mock GPU inventories), one beat, one API, Flower; engines are
real processes (the stand-in vllm) bound to their host's address."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.dev.redis_server import free_port
from app.settings import Settings
from tests.integration.harness import BIN, AppServer, ClusterEnv, Proc, wait_until

pytestmark = pytest.mark.integration
HOSTS = {
    "h1": ("127.0.0.2", "2x80"),
    "h2": ("127.0.0.3", "1x24"),
    "h3": ("127.0.0.4", '[{"total_gb": 80, "outside_gb": 70}]'),  # 9 GB usable
}
M = "/v1/management"


@dataclass
class Cluster3:
    env: ClusterEnv
    api: AppServer
    flower_url: str

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.api.url}{path}", params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def start(self, **spec: Any) -> dict[str, Any]:
        r = httpx.post(
            f"{self.api.url}{M}/engines",
            json=spec,
            params={"wait": "true", "timeout": "60"},
            timeout=90,
        )
        assert r.status_code == 200, r.text
        return r.json()["engine"]  # type: ignore[no-any-return]

    def stop_all(self) -> None:
        for e in self.get(f"{M}/engines"):
            if e["state"] not in ("STOPPED", "FAILED"):
                httpx.delete(f"{self.api.url}{M}/engines/{e['id']}")
        wait_until(
            lambda: all(e["state"] in ("STOPPED", "FAILED") for e in self.get(f"{M}/engines")),
            30,
            what="all stopped",
        )
        wait_until(lambda: self.get(f"{M}/status")["reservations"] == [], 10, what="released")


@pytest.fixture(scope="module")
def c3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster3]:
    env = ClusterEnv.create(tmp_path_factory.mktemp("c3"), SAGELLM_PORT_RANGE="18400-18449")
    for name, (address, mock) in HOSTS.items():
        env.start_worker(name, address, SAGELLM_MOCK_GPUS=mock)
    env.start_beat()
    settings = Settings.from_env({k: v for k, v in env.env.items() if k.startswith("SAGELLM_")})
    api = AppServer(create_app(settings))
    port = free_port()
    flower = Proc(
        "flower",
        [str(BIN / "sagellm"), "flower", "--port", str(port), "--address", "127.0.0.1"],
        dict(env.env, SAGELLM_FLOWER_BASIC_AUTH="admin:s3cret"),
        env.tmp / "logs",
    )
    env.procs["flower"] = flower.start()
    try:
        yield Cluster3(env, api, f"http://127.0.0.1:{port}")
    finally:
        api.close()
        env.close()


@pytest.fixture
def clean(c3: Cluster3) -> Iterator[Cluster3]:
    yield c3
    c3.stop_all()


def _fake(name: str, gb: float, **extra: Any) -> dict[str, Any]:
    return {"model": "org/Bench-1B", "served_model_name": name, "required_memory_gb": gb, **extra}


def test_placement_uses_the_host_with_room(clean: Cluster3) -> None:
    big = clean.start(**_fake("big", 30))  # only h1 has 30 GB on one GPU
    assert big["host"] == "h1" and big["address"] == "127.0.0.2"
    assert big["base_url"].startswith("http://127.0.0.2:")
    small = clean.start(**_fake("small", 10))  # binpack: h2's 23 GB is the tightest fit
    assert small["host"] == "h2"
    r = httpx.post(f"{clean.api.url}{M}/engines", json=_fake("nope", 85))
    assert r.status_code == 409
    assert {
        "host h1, GPU 0: 49.0 GB free, 85.0 GB needed",
        "host h2, GPU 0: 13.0 GB free, 85.0 GB needed",
        "host h3, GPU 0: 9.0 GB free, 85.0 GB needed",
    } <= set(r.json()["reasons"])


def test_tensor_parallel_never_spans_hosts(clean: Cluster3) -> None:
    tp2 = clean.start(**_fake("tp2", 20, tensor_parallel=2))
    assert tp2["host"] == "h1" and sorted(g["index"] for g in tp2["gpus"]) == [0, 1]
    # 4 GPUs exist in the cluster, but no host has 3
    r = httpx.post(f"{clean.api.url}{M}/engines", json=_fake("tp3", 1, tensor_parallel=3))
    assert r.status_code == 400 and r.json()["field"] == "tensor_parallel"


def test_a_preset_spreads_across_hosts(clean: Cluster3) -> None:
    preset = {
        "version": 1,
        "name": "spread3",
        "engines": [
            {"name": "a", **_fake("a", 20)},  # -> h2 (23 GB: tightest)
            {"name": "b", **_fake("b", 20)},  # -> h1 (h2 has 3 GB left)
            {"name": "c", **_fake("c", 5)},  # -> h3 (9 GB: tightest)
        ],
    }
    r = httpx.post(
        f"{clean.api.url}{M}/presets/apply",
        json={"preset": preset},
        params={"timeout": "60"},
        timeout=90,
    )
    assert r.status_code == 200, r.text
    placed = {e["spec"]["preset_engine"]: e["host"] for e in r.json()["engines"]}
    assert placed == {"a": "h2", "b": "h1", "c": "h3"}
    for e in r.json()["engines"]:
        assert httpx.get(f"{e['base_url']}/health").status_code == 200


def test_dead_host_goes_down_its_engines_lost_then_reconciled(clean: Cluster3) -> None:
    eng = clean.start(**_fake("on-h2", 10, host="h2"))
    other = clean.start(**_fake("on-h1", 10, host="h1"))
    reservations = clean.get(f"{M}/status")["reservations"]
    clean.env.procs["worker-h2"].kill9()
    t0 = time.monotonic()
    wait_until(
        lambda: not {h["name"]: h["up"] for h in clean.get(f"{M}/hosts")}["h2"],
        6,
        what="h2 DOWN within the heartbeat TTL (3 s)",
    )
    lost = wait_until(
        lambda: (e := clean.get(f"{M}/engines/{eng['id']}"))["state"] == "LOST" and e,
        5,
        what="engine LOST",
    )
    assert time.monotonic() - t0 < 8 and "host h2 is down" in lost["last_error"]
    assert clean.get(f"{M}/engines/{other['id']}")["state"] == "RUNNING"
    # the engine process itself lives on
    assert httpx.get(f"{eng['base_url']}/health").status_code == 200

    clean.env.start_worker("h2", "127.0.0.3", SAGELLM_MOCK_GPUS=HOSTS["h2"][1])
    back = wait_until(
        lambda: (e := clean.get(f"{M}/engines/{eng['id']}"))["state"] == "RUNNING" and e,
        15,
        what="reconciled",
    )
    assert back["pid"] == eng["pid"] and back["restart_count"] == 0
    engines = clean.get(f"{M}/engines", state="RUNNING")
    assert sorted(e["id"] for e in engines) == sorted([eng["id"], other["id"]])
    assert clean.get(f"{M}/status")["reservations"] == reservations


def test_metrics_match_status(clean: Cluster3) -> None:
    clean.start(**_fake("m1", 12))
    r = httpx.post(
        f"{clean.api.url}/v1/chat/completions",
        json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 200
    ghost = {"model": "ghost", "messages": []}
    assert httpx.post(f"{clean.api.url}/v1/chat/completions", json=ghost).status_code == 404
    text = httpx.get(f"{clean.api.url}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    status = clean.get(f"{M}/status")

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {
            tuple(sorted(s.labels.items())): s.value
            for s in fams[name].samples
            if s.name == name or s.name == name + "_total"
        }

    for gpu in status["gpus"]:
        labels = (("gpu", str(gpu["index"])), ("host", gpu["host"]), ("uuid", gpu["uuid"]))
        for what in ("total", "outside", "reserved", "available"):
            got = samples(f"sagellm_gpu_memory_{what}_bytes")[labels]
            assert got == gpu[f"{what}_mib"] * 1024 * 1024, (what, gpu)
    engines = samples("sagellm_engines")
    for e_state, n in status["counts"].items():
        assert sum(v for k, v in engines.items() if ("state", e_state) in k) == n
    up = samples("sagellm_host_up")
    assert up == {(("host", h["name"]),): (1.0 if h["up"] else 0.0) for h in status["hosts"]}
    reqs = samples("sagellm_gateway_requests")
    assert any(
        dict(k)["model"] == "m1" and dict(k)["code"] == "200" and v >= 1 for k, v in reqs.items()
    )
    errors = samples("sagellm_gateway_errors")
    assert errors[(("model", ""), ("reason", "unknown_model"))] >= 1
    assert "sagellm_gateway_request_duration_seconds" in fams
    runs = samples("sagellm_task_runs")
    assert runs[(("task", "sagellm.start_engine"),)] >= 1
    assert runs[(("task", "sagellm.check_host"),)] >= 1


def test_flower_sees_every_host_worker(c3: Cluster3) -> None:
    auth = ("admin", "s3cret")

    def workers() -> set[str] | None:
        try:
            r = httpx.get(
                f"{c3.flower_url}/api/workers", params={"refresh": "true"}, auth=auth, timeout=10
            )
        except httpx.HTTPError:
            return None
        return set(r.json()) if r.status_code == 200 else None

    names = wait_until(
        lambda: (w := workers()) and len(w) >= 3 and w,
        60,
        interval=1,
        what="Flower lists the workers",
    )
    assert {"sagellm@h1", "sagellm@h2", "sagellm@h3"} <= names
    assert httpx.get(f"{c3.flower_url}/api/workers", timeout=10).status_code == 401
    tasks = httpx.get(f"{c3.flower_url}/api/tasks", auth=auth, timeout=10).json()
    assert any(t.get("name", "").startswith("sagellm.") for t in tasks.values()), json.dumps(
        list(tasks.values())[:3]
    )


def test_hosts_report_their_own_addresses(c3: Cluster3) -> None:
    hosts = {h["name"]: h for h in c3.get(f"{M}/hosts")}
    assert {n: h["address"] for n, h in hosts.items()} == {n: a for n, (a, _) in HOSTS.items()}
