"""External engines (issue 15): OpenAI-compatible endpoints sagellm did not start,
registered through the real API on a real redis-server, routed to by the real gateway,
probed by the workers' probe (called here as the control queue's task would), against
a real HTTP backend that wants its own key and remembers every header it was sent.

No worker runs: the probe task the registration queues sits in the control queue and
the tests run its function themselves, step by step."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from flask.testing import FlaskClient

from app import create_app
from app.core.errors import IllegalTransition
from app.core.health import HealthPolicy
from app.core.models import EngineState, HostRecord
from app.dev.redis_server import RedisProcess
from app.services.engines import stop_engine
from app.settings import Settings
from app.state import keys
from app.state.ledger import Ledger
from app.state.prune import prune_records
from app.state.queues import CONTROL_QUEUE
from app.state.registry import Registry
from tests.integration.harness import wait_until
from tests.integration.keyed_backend import KeyedBackend
from tests.integration.test_api import add_host
from tests.unit.cli_harness import api_url, run
from workers.agent.external_probe import probe_external_engines
from workers.beat_scheduler import mark_lost_engines

pytestmark = pytest.mark.integration
__all__ = ["api_url"]  # a fixture, used by name
E = "/v1/management/engines"
REGISTER = f"{E}/register"
KEY = "sk-ext-5ecret-0f-the-lab-0123456789abcdef"
CLIENT_TOKEN = "Bearer the-client-s-own-token"
S = EngineState


@pytest.fixture
def api(redis_server: RedisProcess, real_redis: redis.Redis) -> Iterator[FlaskClient]:
    settings = Settings.from_env(
        {
            "SAGELLM_REDIS_URL": redis_server.url,
            "SAGELLM_HOST_NAME": "api",
            "SAGELLM_GATEWAY_REFRESH_S": "0.1",
        }
    )
    app = create_app(settings)
    app.testing = True
    yield app.test_client()
    app.extensions["sagellm.gateway"].transport.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


@pytest.fixture
def backends() -> Iterator[list[KeyedBackend]]:
    started: list[KeyedBackend] = []
    yield started
    for b in started:
        b.stop()


def _backend(started: list[KeyedBackend], last_octet: int, port: int, **kw: Any) -> KeyedBackend:
    b = KeyedBackend(f"127.0.40.{last_octet}", port, **kw).start()
    started.append(b)
    return b


def _probe(r: redis.Redis, http: httpx.Client, unhealthy_after: int = 1) -> dict[str, str]:
    """What the control queue's ``sagellm.probe_external`` does on a worker."""
    policy = HealthPolicy(unhealthy_after=unhealthy_after)
    return probe_external_engines(Registry(r), http, policy, timeout_s=2.0)


def _register(api: FlaskClient, **body: Any) -> dict[str, Any]:
    r = api.post(REGISTER, json=body)
    assert r.status_code == 202, r.json
    rec: dict[str, Any] = r.json  # type: ignore[assignment]
    return rec


def _chat(api: FlaskClient, model: str, **extra: Any) -> Any:
    return api.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra},
        headers={"Authorization": CLIENT_TOKEN},
    )


def _text_of_every_answer(api: FlaskClient, engine_id: str) -> str:
    paths = [
        E,
        f"{E}/{engine_id}",
        f"{E}/{engine_id}/events",
        "/v1/management/status",
        "/v1/models",
        "/metrics",
    ]
    out = []
    for path in paths:
        r = api.get(path)
        assert r.status_code == 200, (path, r.status_code)
        out.append(r.get_data(as_text=True))
    return "\n".join(out)


def test_registered_endpoint_gets_chat_with_its_own_key_and_the_key_is_never_answered(
    api: FlaskClient,
    real_redis: redis.Redis,
    http: httpx.Client,
    backends: list[KeyedBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = _backend(backends, 1, 18500, served_name="ext-chat", api_key=KEY)
    rec = _register(api, base_url=f"{backend.url}/v1/", served_model_name="ext-chat", api_key=KEY)
    eid = rec["id"]
    # normalised (no /v1), marked external, holding nothing, not routed before a probe
    assert rec["external_url"] == rec["base_url"] == backend.url
    assert (rec["state"], rec["api_key_set"]) == ("UNHEALTHY", True)
    assert (rec["host"], rec["port"], rec["gpus"], rec["pid"]) == (None, None, [], None)
    assert "api_key" not in rec
    # the first probe is queued on the control queue, by name, without the key
    queued = [json.loads(m) for m in real_redis.lrange(CONTROL_QUEUE, 0, -1)]
    assert [m["headers"]["task"] for m in queued] == ["sagellm.probe_external"]
    assert KEY not in json.dumps(queued)
    assert _chat(api, "ext-chat").status_code == 503  # known, not healthy yet

    assert _probe(real_redis, http) == {eid: "RUNNING"}
    probe = backend.requests_to("/v1/models")[-1]
    assert probe.headers["Authorization"] == f"Bearer {KEY}"

    wait_until(lambda: _chat(api, "ext-chat").status_code == 200, 5, what="routed")
    r = _chat(api, "ext-chat")
    assert r.headers["X-Sagellm-Engine"] == eid
    assert r.json["choices"][0]["message"]["content"] == "model ext-chat"
    sent = backend.requests_to("/v1/chat/completions")[-1]
    # its own key, and never the gateway client's token
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    stream = _chat(api, "ext-chat", stream=True)
    assert stream.status_code == 200 and b"external " in stream.data and b"[DONE]" in stream.data

    # the key is in its own Redis key, not in the record, the answers or the logs
    assert real_redis.get(keys.external_api_key(eid)) == KEY.encode()
    assert real_redis.ttl(keys.external_api_key(eid)) == -1  # kept as long as the record
    assert KEY.encode() not in real_redis.get(keys.engine(eid))
    assert KEY not in _text_of_every_answer(api, eid)
    assert KEY not in caplog.text
    # it holds nothing: no reservation, no port, no GPU
    assert Ledger(real_redis).reservation(eid) is None and Ledger(real_redis).is_empty()


def test_a_key_the_endpoint_echoes_is_redacted_from_the_gateway_answer(
    api: FlaskClient, real_redis: redis.Redis, http: httpx.Client, backends: list[KeyedBackend]
) -> None:
    backend = _backend(backends, 2, 18501, served_name="echo", api_key=KEY, echo_auth=True)
    _register(api, base_url=backend.url, served_model_name="echo", api_key=KEY)
    _probe(real_redis, http)
    wait_until(lambda: _chat(api, "echo").status_code == 200, 5, what="routed")
    content = _chat(api, "echo").json["choices"][0]["message"]["content"]
    assert content == "model echo; you sent Bearer [redacted]"


def test_probe_marks_it_unhealthy_when_the_endpoint_stops_and_running_when_it_returns(
    api: FlaskClient, real_redis: redis.Redis, http: httpx.Client, backends: list[KeyedBackend]
) -> None:
    backend = _backend(backends, 3, 18502, served_name="flaky")
    eid = _register(api, base_url=backend.url, served_model_name="flaky")["id"]
    assert _probe(real_redis, http) == {eid: "RUNNING"}
    wait_until(lambda: _chat(api, "flaky").status_code == 200, 5, what="routed")
    assert "Authorization" not in backend.requests_to("/v1/chat/completions")[-1].headers

    backend.stop()
    # a request that fails takes it out of this process's rotation at once
    assert _chat(api, "flaky").status_code == 502
    assert _chat(api, "flaky").status_code == 503
    assert _probe(real_redis, http) == {eid: "UNHEALTHY"}
    rec = api.get(f"{E}/{eid}").json
    assert rec["state"] == "UNHEALTHY" and "ConnectError" in rec["last_error"]
    assert rec["health_failures"] == 1

    backend.start()
    assert _probe(real_redis, http) == {eid: "RUNNING"}
    rec = api.get(f"{E}/{eid}").json
    assert rec["health_failures"] == 0 and rec["last_health_at"] > rec["created_at"]
    # the passing probe (last_health_at after the ejection) puts it back
    wait_until(lambda: _chat(api, "flaky").status_code == 200, 5, what="back in rotation")
    kinds = [e["kind"] for e in api.get(f"{E}/{eid}/events").json["events"]]
    assert kinds == ["registered", "state", "state", "probe_failed", "state"]


def test_probe_counts_failures_before_unhealthy_as_the_health_policy_says(
    api: FlaskClient, real_redis: redis.Redis, http: httpx.Client, backends: list[KeyedBackend]
) -> None:
    backend = _backend(backends, 4, 18503, served_name="patient")
    eid = _register(api, base_url=backend.url, served_model_name="patient")["id"]
    assert _probe(real_redis, http, unhealthy_after=2) == {eid: "RUNNING"}
    backend.stop()
    assert _probe(real_redis, http, unhealthy_after=2) == {eid: "RUNNING"}  # one failure
    assert _probe(real_redis, http, unhealthy_after=2) == {eid: "UNHEALTHY"}


def test_a_wrong_key_or_a_model_it_does_not_serve_is_unhealthy_with_the_reason(
    api: FlaskClient,
    real_redis: redis.Redis,
    http: httpx.Client,
    backends: list[KeyedBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = _backend(backends, 5, 18504, served_name="real-name", api_key=KEY)
    wrong = "sk-wrong-key-9876543210"
    bad_key = _register(api, base_url=backend.url, served_model_name="real-name", api_key=wrong)
    typo = _register(api, base_url=backend.url, served_model_name="reel-name", api_key=KEY)
    assert _probe(real_redis, http) == {bad_key["id"]: "UNHEALTHY", typo["id"]: "UNHEALTHY"}
    got = api.get(f"{E}/{bad_key['id']}").json
    assert "HTTP 401" in got["last_error"] and "API key" in got["last_error"]
    got = api.get(f"{E}/{typo['id']}").json
    assert "does not serve 'reel-name'" in got["last_error"] and "real-name" in got["last_error"]
    assert _chat(api, "reel-name").status_code == 503
    every = _text_of_every_answer(api, bad_key["id"]) + _text_of_every_answer(api, typo["id"])
    assert wrong not in every and KEY not in every
    assert wrong not in caplog.text and KEY not in caplog.text


def test_delete_forgets_it_with_its_key_and_the_gateway_404s_the_model(
    api: FlaskClient, real_redis: redis.Redis, http: httpx.Client, backends: list[KeyedBackend]
) -> None:
    backend = _backend(backends, 6, 18505, served_name="gone-soon", api_key=KEY)
    eid = _register(api, base_url=backend.url, served_model_name="gone-soon", api_key=KEY)["id"]
    _probe(real_redis, http)
    wait_until(lambda: _chat(api, "gone-soon").status_code == 200, 5, what="routed")
    seen = len(backend.seen)

    r = api.delete(f"{E}/{eid}")
    assert r.status_code == 200 and r.json["id"] == eid and KEY not in r.get_data(as_text=True)
    assert api.get(f"{E}/{eid}").status_code == 404
    for key in (keys.engine(eid), keys.external_api_key(eid), keys.engine_events(eid)):
        assert not real_redis.exists(key), key
    wait_until(lambda: _chat(api, "gone-soon").status_code == 404, 5, what="forgotten")
    assert _chat(api, "gone-soon").json["error"]["code"] == "model_not_found"
    assert _probe(real_redis, http) == {}
    assert len(backend.seen) == seen  # nothing was sent to it: no stop, no signal
    assert api.delete(f"{E}/{eid}").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"base_url": "ftp://127.0.40.9:18549", "served_model_name": "m"}, "base_url"),
        ({"base_url": "http://", "served_model_name": "m"}, "base_url"),
        ({"base_url": "127.0.40.9:18549", "served_model_name": "m"}, "base_url"),
        ({"base_url": f"http://u:{KEY}@127.0.40.9:18549", "served_model_name": "m"}, "base_url"),
        (
            {"base_url": f"http://127.0.40.9:18549/v1?key={KEY}", "served_model_name": "m"},
            "base_url",
        ),
        ({"base_url": "http://127.0.40.9:99999", "served_model_name": "m"}, "base_url"),
        ({"base_url": "http://127.0.40.9:18549/a b", "served_model_name": "m"}, "base_url"),
        ({"base_url": "http://[::1]:18549", "served_model_name": "m"}, "base_url"),
        ({"base_url": "http://127.0.40.9:18549"}, "served_model_name"),
        ({"base_url": "http://127.0.40.9:18549", "served_model_name": "-bad"}, "served_model_name"),
        (
            {"base_url": "http://127.0.40.9:18549", "served_model_name": "m", "kind": "vision"},
            "kind",
        ),
        ({"base_url": 8000, "served_model_name": "m"}, "base_url"),
        ({"base_url": "http://h", "served_model_name": "m", "api_key": "k" * 4097}, "api_key"),
        ({"base_url": "http://h", "served_model_name": "m", "api_key": ""}, "api_key"),
        (
            {"base_url": "http://h", "served_model_name": "m", "api_key": KEY + "\r\nX: y"},
            "api_key",
        ),
        ({"base_url": "http://h", "served_model_name": "m", "api_key": f"{KEY} 2"}, "api_key"),
        ({"base_url": "http://h", "served_model_name": "m", "api_key": 1234}, "api_key"),
        ({"base_url": "http://h", "served_model_name": "m", "key": KEY}, "key"),
    ],
)
def test_bad_input_is_4xx_naming_the_field_and_records_nothing(
    api: FlaskClient, real_redis: redis.Redis, body: dict[str, Any], field: str
) -> None:
    r = api.post(REGISTER, json=body)
    assert r.status_code in (400, 422), r.json
    assert r.json["field"] == field, r.json
    assert field in r.json["message"]
    assert KEY not in r.get_data(as_text=True)  # not even echoed back in the error
    assert real_redis.scard(keys.ENGINES) == 0 and api.get(E).json == []
    assert not list(real_redis.scan_iter(keys.external_api_key("*")))
    assert real_redis.llen(CONTROL_QUEUE) == 0


def test_the_same_endpoint_and_name_twice_is_409_and_records_nothing_more(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    first = _register(api, base_url="http://127.0.40.9:18549", served_model_name="twice")
    r = api.post(
        REGISTER, json={"base_url": "http://127.0.40.9:18549/v1", "served_model_name": "twice"}
    )
    assert r.status_code == 409 and first["id"] in r.json["message"]
    assert [e["id"] for e in api.get(E).json] == [first["id"]]


def test_placement_ignores_it_and_stop_prune_and_lost_paths_leave_it_alone(
    api: FlaskClient, real_redis: redis.Redis, http: httpx.Client, backends: list[KeyedBackend]
) -> None:
    backend = _backend(backends, 7, 18506, served_name="beside")
    add_host(real_redis, "a", "1x80")
    eid = _register(api, base_url=backend.url, served_model_name="beside")["id"]
    _probe(real_redis, http)
    registry, cluster = Registry(real_redis), api.application.extensions["sagellm"]
    # the whole GPU is free for a start: the external engine counts for no GPU memory
    gpu = api.get("/v1/management/status").json["gpus"][0]
    assert gpu["reserved_mib"] == 0
    started = api.post(E, json={"model": "org/Big-30B", "required_memory_gb": 70})
    assert started.status_code == 202, started.json
    assert Ledger(real_redis).reserved_engines() == {started.json["engine"]["id"]}
    # no host work for it: the start went to host a, nothing else queued for a host
    assert registry.engines(host="a") == [registry.get(started.json["engine"]["id"])]

    with pytest.raises(IllegalTransition, match="external"):  # never signalled
        stop_engine(cluster, eid)
    assert api.post(f"{E}/{eid}/restart").status_code == 409
    assert api.get(f"{E}/{eid}/logs").status_code == 409
    assert prune_records(registry, Ledger(real_redis), 0) == []
    registry.put_host(HostRecord("a", "127.0.0.1", (8100, 8199)), ttl_s=0.05)
    time.sleep(0.1)  # host a is DOWN: its engines are LOST, not the external one
    assert mark_lost_engines(registry) == []  # the PENDING start is left to its task
    assert registry.get(eid).state is S.RUNNING
    assert [e["host"] for e in api.get(E).json] == [None, "a"]


def _self_signed(tmp: Path, ip: str) -> tuple[str, str]:
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", key, "-out", cert, "-subj", f"/CN={ip}"),
            *("-addext", f"subjectAltName=IP:{ip}"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_an_https_endpoint_under_a_path_prefix_is_probed_and_routed_with_tls_verified(
    api: FlaskClient,
    real_redis: redis.Redis,
    backends: list[KeyedBackend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ip = "127.0.40.8"
    cert, key = _self_signed(tmp_path, ip)
    backend = _backend(
        backends, 8, 18507, served_name="tls-model", api_key=KEY, prefix="/openai", tls=(cert, key)
    )
    rec = _register(api, base_url=f"{backend.url}/v1", served_model_name="tls-model", api_key=KEY)
    assert rec["external_url"] == f"https://{ip}:18507/openai"
    # not trusted yet: the probe refuses the certificate
    with httpx.Client(verify=ssl.create_default_context(), trust_env=False) as untrusting:
        assert _probe(real_redis, untrusting) == {rec["id"]: "UNHEALTHY"}
    assert "CERTIFICATE_VERIFY_FAILED" in api.get(f"{E}/{rec['id']}").json["last_error"]

    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the system store, as an operator sets it
    with httpx.Client(verify=ssl.create_default_context(), trust_env=False) as trusting:
        assert _probe(real_redis, trusting) == {rec["id"]: "RUNNING"}
    wait_until(lambda: _chat(api, "tls-model").status_code == 200, 5, what="routed over TLS")
    sent = backend.requests_to("/openai/v1/chat/completions")[-1]
    assert sent.headers["Authorization"] == f"Bearer {KEY}"


# ---------------------------------------------------------------------------- the CLI


class Prober(threading.Thread):
    """Runs the control queue's probe every 50 ms, as workers and beat would."""

    def __init__(self, r: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.registry = Registry(r)
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(trust_env=False) as http:
            while not self.stopped.wait(0.05):
                probe_external_engines(self.registry, http, HealthPolicy(), timeout_s=1.0)

    def __enter__(self) -> Prober:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(5)


def test_cli_register_takes_the_key_from_an_env_var_lists_it_as_external_never_prints_it(
    api_url: str,
    real_redis: redis.Redis,
    backends: list[KeyedBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = _backend(backends, 10, 18508, served_name="cli-ext", api_key=KEY)
    monkeypatch.setenv("LAB_OPENAI_KEY", KEY)
    url = f"{backend.url}/v1"
    with Prober(real_redis):
        res = run(
            *("engine", "register", "--url", url, "--served-model-name", "cli-ext"),
            *("--api-key-env", "LAB_OPENAI_KEY"),
        )
    assert res.exit_code == 0, res.output
    assert f"RUNNING at {backend.url} (external" in res.output and "API key set" in res.output
    outputs = [res.output]
    listed = run("engine", "list")
    row = next(line for line in listed.output.splitlines() if "cli-ext" in line)
    assert "external" in row.split() and "RUNNING" in row.split()
    outputs.append(listed.output)
    for show in (("engine", "show", "cli-ext"), ("engine", "show", "cli-ext", "-o", "json")):
        shown = run(*show)
        assert shown.exit_code == 0, shown.output
        outputs.append(shown.output)
    assert json.loads(outputs[-1])["api_key_set"] is True
    outputs.append(run("status").output)
    listed = run("backends")  # a backend like the others, its HOST said to be external
    row = next(line for line in listed.output.splitlines() if "cli-ext" in line)
    assert "external" in row.split() and backend.url in row, listed.output
    outputs.append(listed.output)
    data = json.loads(run("backends", "-o", "json").output)["llm_backends"]
    assert [(b["external"], b["host"]) for b in data] == [(True, None)]
    assert all(KEY not in out for out in outputs)

    stopped = run("engine", "stop", "cli-ext")
    assert stopped.exit_code == 0, stopped.output
    assert f"forgotten (external, at {backend.url})" in stopped.output
    assert run("engine", "list").output.strip() == "no engines"
    assert not list(real_redis.scan_iter(keys.external_api_key("*")))


def test_cli_register_reads_the_key_from_stdin_and_never_as_an_option(
    api_url: str, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ("engine", "register", "--url", "http://127.0.40.11:18509", "--no-wait")
    refused = run(*base, "--served-model-name", "m1", "--api-key", KEY)
    assert refused.exit_code == 2 and "No such option" in refused.output
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    unset = run(*base, "--served-model-name", "m1", "--api-key-env", "NO_SUCH_KEY_VAR")
    assert unset.exit_code == 2 and "not set" in unset.output
    assert real_redis.scard(keys.ENGINES) == 0

    res = run(*base, "--served-model-name", "m2", "--api-key-stdin", input=f"{KEY}\n")
    assert res.exit_code == 0, res.output
    assert KEY not in res.output and "API key set" in res.output
    (rec,) = Registry(real_redis).engines()
    assert real_redis.get(keys.external_api_key(rec.id)) == KEY.encode()
    assert rec.state is S.UNHEALTHY and rec.external_url == "http://127.0.40.11:18509"
