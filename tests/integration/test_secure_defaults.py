"""Secure defaults (issue 11): the admin token, the Host allow-list, Flower's auth,
tokens that are not ASCII, /metrics behind the token, and the OpenAPI security schemes.

The app runs on a real redis-server through the Flask test client (every route, the
gateway's plain-WSGI routes included); Flower runs as the real ``sagellm flower``."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from app.core.errors import ConfigError
from app.dev.redis_server import RedisProcess
from app.settings import Settings
from tests.integration.harness import BIN, base_env

pytestmark = pytest.mark.integration

ADMIN = "adm-secret"
REBIND = "rebind.attacker.example:8000"
# Every kind of route: management, the gateway (Flask and plain WSGI), metrics, docs.
ROUTES = [
    ("GET", "/v1/management/engines"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/health"),
]


@pytest.fixture
def make_app(redis_server: RedisProcess) -> Callable[..., Flask]:
    def make(**env: str) -> Flask:
        settings = Settings.from_env(
            {"SAGELLM_REDIS_URL": redis_server.url, "SAGELLM_HOST_NAME": "api", **env}
        )
        app = create_app(settings)
        app.testing = True
        return app

    return make


def _call(app: Flask, method: str, path: str, **kw: Any) -> Any:
    client = app.test_client()
    if method == "POST":
        kw.setdefault("json", {"model": "m", "input": "x"})
    return client.open(path, method=method, **kw)


# ---------------------------------------------------------------- DNS rebinding


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_rebound_host_is_refused_on_every_route(
    make_app: Callable[..., Flask], method: str, path: str
) -> None:
    app = make_app()  # bound to loopback by default (SAGELLM_API_URL)
    r = _call(app, method, path, headers={"Host": REBIND})
    assert r.status_code == 421, (path, r.status_code, r.data[:200])
    body = r.get_json()
    assert body is not None and "rebind.attacker.example" in str(body)
    assert "SAGELLM_ALLOWED_HOSTS" in str(body)


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"])
def test_loopback_names_are_answered(make_app: Callable[..., Flask], host: str) -> None:
    app = make_app()
    assert _call(app, "GET", "/v1/management/engines", headers={"Host": host}).status_code == 200


def test_allowed_hosts_setting_names_the_hosts_answered(make_app: Callable[..., Flask]) -> None:
    app = make_app(SAGELLM_ALLOWED_HOSTS="api.lab.example, other.example:9000")
    ok = ("api.lab.example", "API.lab.example:8000", "other.example:9000")
    for host in ok:
        r = _call(app, "GET", "/v1/management/engines", headers={"Host": host})
        assert r.status_code == 200, host
    for host in ("other.example:9001", "localhost:8000", REBIND):
        r = _call(app, "GET", "/v1/management/engines", headers={"Host": host})
        assert r.status_code == 421, host
    star = make_app(SAGELLM_ALLOWED_HOSTS="*")
    assert _call(star, "GET", "/health", headers={"Host": REBIND}).status_code == 200


def test_non_loopback_bind_answers_any_host_when_a_token_is_set(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(SAGELLM_API_URL="http://0.0.0.0:8000", SAGELLM_ADMIN_TOKEN=ADMIN)
    r = _call(app, "GET", "/health", headers={"Host": "head.lab.example:8000"})
    assert r.status_code == 200


# ---------------------------------------------------------------- open API refusal


def test_api_without_token_on_a_public_address_refuses_to_start(
    make_app: Callable[..., Flask],
) -> None:
    with pytest.raises(ConfigError) as err:
        make_app(SAGELLM_API_URL="http://0.0.0.0:8000")
    assert "SAGELLM_ADMIN_TOKEN" in err.value.message
    assert "SAGELLM_ALLOW_OPEN_API" in err.value.message
    # An explicit opt-in serves it open.
    app = make_app(SAGELLM_API_URL="http://0.0.0.0:8000", SAGELLM_ALLOW_OPEN_API="1")
    assert _call(app, "GET", "/v1/management/engines").status_code == 200


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize(("method", "path"), ROUTES[:4])
def test_non_ascii_token_is_401_never_500(
    make_app: Callable[..., Flask], method: str, path: str
) -> None:
    app = make_app(SAGELLM_ADMIN_TOKEN=ADMIN, SAGELLM_API_KEYS="key-1")
    r = _call(app, method, path, headers={"Authorization": "Bearer caf\u00e9-\u00fc"})
    assert r.status_code == 401, (path, r.status_code)


def test_metrics_requires_the_admin_token_when_asked(make_app: Callable[..., Flask]) -> None:
    app = make_app(SAGELLM_ADMIN_TOKEN=ADMIN, SAGELLM_METRICS_REQUIRE_TOKEN="1")
    assert _call(app, "GET", "/metrics").status_code == 401
    ok = _call(app, "GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200
    open_metrics = make_app(SAGELLM_ADMIN_TOKEN=ADMIN)
    assert _call(open_metrics, "GET", "/metrics").status_code == 200


# ---------------------------------------------------------------- OpenAPI


def test_openapi_declares_bearer_schemes_and_the_gateway_routes(
    make_app: Callable[..., Flask],
) -> None:
    spec = _call(make_app(SAGELLM_API_KEYS="k1"), "GET", "/openapi.json").get_json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["adminToken"] == {"type": "http", "scheme": "bearer", **_desc(schemes)}
    assert schemes["apiKey"]["type"] == "http" and schemes["apiKey"]["scheme"] == "bearer"
    # Management operations inherit the document's default: the admin token.
    assert spec["security"] == [{"adminToken": []}]
    assert "security" not in spec["paths"]["/v1/management/engines"]["get"]
    for path, method in (
        ("/v1/models", "get"),
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/embeddings", "post"),
    ):
        op = spec["paths"][path][method]
        assert op["security"] == [{"apiKey": []}], path
        assert "401" in op["responses"], path
    # Without API keys the gateway is open, and the document says so.
    open_spec = _call(make_app(), "GET", "/openapi.json").get_json()
    assert open_spec["paths"]["/v1/embeddings"]["post"]["security"] == [{"apiKey": []}, {}]


def _desc(schemes: dict[str, Any]) -> dict[str, Any]:
    d = schemes["adminToken"].get("description")
    return {"description": d} if d else {}


# ---------------------------------------------------------------- the CLI's token


def test_cli_reads_the_local_token_file_when_the_variable_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.api.auth import ensure_admin_token
    from app.cli.client import ApiClient

    token, created = ensure_admin_token(tmp_path)
    assert created and len(token) >= 32
    path = tmp_path / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_admin_token(tmp_path) == (token, False)  # kept, not replaced
    monkeypatch.setenv("SAGELLM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SAGELLM_ADMIN_TOKEN", raising=False)
    assert ApiClient()._client.headers["Authorization"] == f"Bearer {token}"
    monkeypatch.setenv("SAGELLM_ADMIN_TOKEN", "from-env")
    assert ApiClient()._client.headers["Authorization"] == "Bearer from-env"


# ---------------------------------------------------------------- `sagellm up`'s env


def test_only_the_api_gets_the_metrics_folder_and_the_token(tmp_path: Path) -> None:
    from app.dev.stack import Stack

    settings = Settings.from_env({"SAGELLM_DATA_DIR": str(tmp_path)})
    stack = Stack(settings, redis_url_given=False, admin_token=ADMIN)
    api = stack.child_env("api", "redis://127.0.0.1:1/0")
    assert api["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "prometheus")
    assert api["SAGELLM_ADMIN_TOKEN"] == ADMIN
    for name in ("worker", "beat"):
        env = stack.child_env(name, "redis://127.0.0.1:1/0")
        assert "PROMETHEUS_MULTIPROC_DIR" not in env, name  # engines inherit the worker's
        assert "SAGELLM_ADMIN_TOKEN" not in env, name


# ---------------------------------------------------------------- Flower


@pytest.mark.parametrize("address", ["0.0.0.0", "10.1.2.3"])
def test_flower_refuses_a_public_address_without_basic_auth(tmp_path: Path, address: str) -> None:
    env = base_env("redis://127.0.0.1:1/0", tmp_path)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    r = subprocess.run(
        [str(BIN / "sagellm"), "flower", "--address", address, "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode != 0
    assert "SAGELLM_FLOWER_BASIC_AUTH" in r.stderr and address in r.stderr, r.stderr


def test_flower_defaults_to_loopback_and_never_opens_its_api() -> None:
    from app.cli import flower, flower_argv

    address = next(p for p in flower.params if p.name == "address")
    assert address.default == "127.0.0.1"
    assert "FLOWER_UNAUTHENTICATED_API" not in os.environ
    env: dict[str, str] = {"FLOWER_UNAUTHENTICATED_API": "true"}
    argv = flower_argv(5555, "127.0.0.1", "", env)
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert not any(a.startswith("--basic-auth") for a in argv)
    assert "--basic-auth=u:p" in flower_argv(5555, "0.0.0.0", "u:p", env)
