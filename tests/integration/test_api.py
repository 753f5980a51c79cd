"""Management API through the Flask test client, on a real redis-server.

No worker runs here: a host heartbeat is written by the test, so placement, the
ledger and the queued tasks are real while nothing consumes them. The end-to-end
path with workers is covered by the CLI tests against the real stack."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from app import create_app
from app.core.inventory_spec import parse_mock_gpus
from app.core.models import EngineState, HostRecord
from app.dev.redis_server import RedisProcess
from app.settings import Settings
from app.state.ledger import Ledger
from app.state.registry import Registry
from workers.host.gpu_inventory import Inventory, gpu_capacities

pytestmark = pytest.mark.integration
E = "/v1/management/engines"


def add_host(r: redis.Redis, name: str, mock: str, ttl: float = 60) -> None:
    gpus = parse_mock_gpus(mock, name)
    Ledger(r).publish_capacity(name, gpu_capacities(Inventory(tuple(gpus), "mock"), name, set()))
    Registry(r).put_host(HostRecord(name, "127.0.0.1", (8100, 8199), gpus=gpus), ttl_s=ttl)


@pytest.fixture
def api(redis_server: RedisProcess, real_redis: redis.Redis) -> Iterator[FlaskClient]:
    settings = Settings.from_env(
        {"SAGELLM_REDIS_URL": redis_server.url, "SAGELLM_HOST_NAME": "api"}
    )
    app = create_app(settings)
    app.testing = True
    yield app.test_client()


def _ledger(api: FlaskClient) -> Ledger:
    return api.application.extensions["sagellm"].ledger  # type: ignore[no-any-return]


def test_start_engine_accepts_places_reserves_and_queues(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    r = api.post(
        E, json={"model": "Qwen/Qwen2.5-7B-Instruct", "required_memory_gb": 20, "label": "chat"}
    )
    assert r.status_code == 202, r.json
    body: dict[str, Any] = r.json  # type: ignore[assignment]
    eng = body["engine"]
    assert eng["state"] == "PENDING" and eng["host"] == "a" and eng["port"] == 8100
    assert eng["gpus"][0]["memory_mib"] == 20 * 1024
    assert body["task_id"]
    # the start task sits in host a's queue, addressed by name
    queued = [json.loads(m) for m in real_redis.lrange("host.a", 0, -1)]
    assert [m["headers"]["task"] for m in queued] == ["sagellm.start_engine"]
    assert _ledger(api).reservation(eng["id"]) is not None
    got = api.get(f"{E}/{eng['id']}").json
    assert got["id"] == eng["id"] and got["spec"]["label"] == "chat"
    listed = api.get(E, query_string={"label": "chat"}).json
    assert [e["id"] for e in listed] == [eng["id"]]
    assert api.get(E, query_string={"state": "RUNNING"}).json == []


def test_nothing_fits_is_409_with_reasons_and_reserves_nothing(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", '[{"total_gb": 24, "outside_gb": 10}]')
    r = api.post(E, json={"model": "m", "required_memory_gb": 33})
    assert r.status_code == 409
    assert r.json["reasons"] == ["host a, GPU 0: 13.0 GB free, 33.0 GB needed"]
    assert "no room" in r.json["message"]
    assert _ledger(api).is_empty()
    assert api.get(E).json == []


def test_no_worker_alive_is_503(api: FlaskClient) -> None:
    r = api.post(E, json={"model": "m", "required_memory_gb": 1})
    assert r.status_code == 503
    assert "flask sagellm worker" in r.json["message"]
    assert api.get(E).json == []


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"modell": "x"}, 422, "model"),
        ({"model": "m", "bogus": 1}, 422, "bogus"),
        ({"model": "m", "tensor_parallel": 0}, 422, "tensor_parallel"),
        ({"model": "m", "required_memory_gb": -1}, 422, "required_memory_gb"),
        ({"model": "m", "required_memory_gb": 1, "port": 9999}, 400, "port"),
        ({"model": "m; rm -rf /", "required_memory_gb": 1}, 400, "model"),
        ({"model": "$(reboot)", "required_memory_gb": 1}, 400, "model"),
        ({"model": "m", "required_memory_gb": 1, "tensor_parallel": 4}, 400, "tensor_parallel"),
        ({"model": "m", "policy": "fastest"}, 422, "policy"),
        ({"model": "m", "kind": "embedding", "runtime": "vllm"}, 400, "runtime"),
        ({"model": "m", "required_memory_gb": 1, "env": {"CUDA_VISIBLE_DEVICES": "1"}}, 400, "env"),
        ({"model": "unknown/no-size-in-name"}, 400, "required_memory_gb"),
    ],
)
def test_bad_input_is_4xx_naming_the_field_and_nothing_is_left(
    api: FlaskClient, real_redis: redis.Redis, body: dict[str, Any], status: int, field: str
) -> None:
    add_host(real_redis, "a", "2x80")
    r = api.post(E, json=body)
    assert r.status_code == status, r.json
    assert r.json["field"] == field
    assert field in r.json["message"]
    assert {"code", "status", "message"} <= set(r.json)
    assert _ledger(api).is_empty()
    assert api.get(E).json == []
    assert real_redis.llen("host.a") == 0


def test_unknown_engine_is_404_in_the_same_shape(api: FlaskClient) -> None:
    for r in (
        api.get(f"{E}/eng-nope"),
        api.delete(f"{E}/eng-nope"),
        api.post(f"{E}/eng-nope/restart"),
    ):
        assert r.status_code == 404
        assert r.json["code"] == 404 and "eng-nope" in r.json["message"]


def test_delete_marks_stopping_and_queues_the_stop(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    eid = api.post(E, json={"model": "m", "required_memory_gb": 1}).json["engine"]["id"]
    r = api.delete(f"{E}/{eid}")
    assert r.status_code == 202 and r.json["state"] == "STOPPING"
    tasks = [json.loads(m)["headers"]["task"] for m in real_redis.lrange("host.a", 0, -1)]
    assert tasks.count("sagellm.stop_engine") == 1
    # stopping twice is harmless
    assert api.delete(f"{E}/{eid}").status_code == 202


def test_status_gpus_hosts_backends(api: FlaskClient, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", '[{"total_gb": 80, "outside_gb": 10}, {"total_gb": 80}]')
    add_host(real_redis, "b", "none", ttl=0.001)  # DOWN at once
    eid = api.post(E, json={"model": "m", "required_memory_gb": 20}).json["engine"]["id"]
    st = api.get("/v1/management/status").json
    hosts = {h["name"]: h for h in st["hosts"]}
    assert hosts["a"]["up"] is True and hosts["b"]["up"] is False
    gpu = {(g["host"], g["index"]): g for g in st["gpus"]}
    g0 = gpu[("a", 0)]
    # binpack: GPU 0 (70 free) is tighter than GPU 1 (80 free)
    assert (g0["total_gb"], g0["outside_gb"], g0["reserved_gb"]) == (80.0, 10.0, 20.0)
    assert g0["available_gb"] == 80 - 10 - 20 - 1.0
    assert st["reservations"][0]["engine_id"] == eid
    assert st["counts"] == {"PENDING": 1}
    assert api.get("/v1/management/gpus").json == st["gpus"]
    assert [h["name"] for h in api.get("/v1/management/hosts").json] == ["a", "b"]
    assert api.get("/v1/management/backends").json == {"llm_backends": [], "embedding_backends": []}


def test_prune_deletes_old_terminal_records(api: FlaskClient, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "2x80")
    eid = api.post(E, json={"model": "m", "required_memory_gb": 1}).json["engine"]["id"]
    reg = Registry(real_redis)
    reg.transition(eid, EngineState.FAILED)
    r = api.post(f"{E}/prune", query_string={"older_than_s": 0})
    assert r.status_code == 200 and r.json["pruned"] == [eid]
    assert _ledger(api).is_empty()


def test_task_state_is_reported(api: FlaskClient, real_redis: redis.Redis) -> None:
    add_host(real_redis, "a", "2x80")
    task_id = api.post(E, json={"model": "m", "required_memory_gb": 1}).json["task_id"]
    r = api.get(f"/v1/management/tasks/{task_id}")
    assert r.status_code == 200 and r.json["id"] == task_id and r.json["state"] == "PENDING"


def test_openapi_and_offline_docs(api: FlaskClient) -> None:
    spec = api.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert "/v1/management/engines" in spec["paths"]
    page = api.get("/docs").get_data(as_text=True)
    assert "/docs/static/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower() and "https://" not in page
    assert api.get("/docs/static/swagger-ui-bundle.js").status_code == 200


def test_forgetting_a_down_host_ends_its_engines_and_releases_everything(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "2x80")
    add_host(real_redis, "b", "2x80")
    eid = api.post(E, json={"model": "m", "required_memory_gb": 5, "host": "b"}).json["engine"]
    other = api.post(E, json={"model": "m", "required_memory_gb": 5, "host": "a"}).json["engine"]
    Registry(real_redis).transition(eid["id"], EngineState.LOST, error="host b is down")
    # b is up: refused, nothing changes
    r = api.delete("/v1/management/hosts/b")
    assert r.status_code == 409 and "stop its worker" in r.json["message"]
    add_host(real_redis, "b", "2x80", ttl=0.001)  # its heartbeat expires: DOWN
    time.sleep(0.05)
    r = api.delete("/v1/management/hosts/b")
    assert r.status_code == 200, r.json
    assert r.json["engines"] == [eid["id"]]
    gone = api.get(f"{E}/{eid['id']}").json
    assert gone["state"] == "FAILED" and gone["last_error"] == "host b was forgotten"
    assert _ledger(api).reserved_engines() == {other["id"]}
    assert [h["name"] for h in api.get("/v1/management/hosts").json] == ["a"]
    assert api.delete("/v1/management/hosts/b").status_code == 404


def test_preset_with_a_refused_engine_field_is_400_before_anything_is_placed(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "1x80")
    text = (
        "version: 1\nname: p\nengines:\n  - name: chat\n    model: org/m\n"
        '    extra_args: ["--trust-remote-code"]\n'
    )
    resp = api.post(
        "/v1/management/presets/apply", query_string={"dry_run": "false"}, json={"yaml": text}
    )
    assert resp.status_code == 400, resp.get_json()
    assert "--trust-remote-code" in resp.get_json()["message"]
    assert Ledger(real_redis).is_empty() and Registry(real_redis).engines() == []


@pytest.mark.parametrize(
    ("extra_args", "says"),
    [
        (["--port=1"], "sets --port, which sagellm sets; use port instead"),
        (["--po", "1"], "sets --port"),
        (["--trust-remote-code"], "SAGELLM_ENGINE_UNSAFE_FLAGS=--trust-remote-code"),
        (["--config", "x.yaml"], "--config"),
    ],
)
def test_a_direct_start_runs_the_runtimes_argv_check_before_anything_is_reserved(
    api: FlaskClient, real_redis: redis.Redis, extra_args: list[str], says: str
) -> None:
    add_host(real_redis, "a", "2x80")
    body = {"model": "org/m", "required_memory_gb": 1, "extra_args": extra_args}

    for r in (
        api.post(E, json=body),
        api.post(E, json={**body, "kind": "embedding", "use_gpu": False}),  # its own server
    ):
        assert r.status_code == 400, r.json
        assert r.json["field"] == "extra_args"
        assert says in r.json["message"]
    assert _ledger(api).is_empty()
    assert api.get(E).json == []
    assert real_redis.llen("host.a") == 0


def test_start_waiting_for_an_engine_whose_record_redis_lost_is_503_not_404(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    """FLUSHALL while ``POST /engines?wait=true`` waits: the engine it created is gone.
    The answer says the state store lost it (503, retry), not 404 about its own id."""
    import threading

    add_host(real_redis, "a", "1x80")

    def flush_once_queued() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not real_redis.llen("host.a"):
            time.sleep(0.01)
        time.sleep(0.2)
        real_redis.flushall()

    flusher = threading.Thread(target=flush_once_queued)
    flusher.start()
    r = api.post(
        E,
        json={"model": "Qwen/Qwen2.5-7B-Instruct", "required_memory_gb": 20},
        query_string={"wait": "true", "timeout": 20},
    )
    flusher.join()
    assert r.status_code == 503, r.json
    message = r.json["message"]  # type: ignore[index]
    assert "lost its record" in message and "retry" in message, message


def test_on_demand_start_records_standby_and_bad_on_demand_input_is_4xx(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "1x24")
    r = api.post(E, json={"model": "org/m-1B", "required_memory_gb": 8, "on_demand": True})
    assert r.status_code == 202, r.json
    eng = r.json["engine"]  # type: ignore[index]
    assert eng["state"] == "STANDBY" and eng["host"] is None and eng["port"] is None
    assert _ledger(api).reservation(eng["id"]) is None
    assert real_redis.llen("host.a") == 0  # nothing queued
    for body, field, code in (
        ({"model": "org/m", "idle_timeout_s": -1}, "idle_timeout_s", 422),
        ({"model": "org/m", "idle_timeout_s": 0}, "idle_timeout_s", 422),
        ({"model": "org/m", "on_demand": "maybe"}, "on_demand", 422),
        (
            {"model": "org/m", "required_memory_gb": 30, "gpu_ids": [0], "on_demand": True},
            "gpu_ids",
            400,
        ),
    ):
        bad = api.post(E, json=body)
        assert bad.status_code == code, (body, bad.json)
        assert bad.json["field"] == field, bad.json  # type: ignore[index]
    assert [e["id"] for e in api.get(E).json] == [eng["id"]]  # type: ignore[union-attr]
