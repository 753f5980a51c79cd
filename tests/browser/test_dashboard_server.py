"""The dashboard's server side, without a browser (these run where Chromium is missing):
who may fetch what, cheap polls (ETag/304), what a page may load, what the package
ships, and the small pure pieces (form -> API body, GPU bars, latency quantiles)."""

from __future__ import annotations

import fnmatch
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from app.core.models import EngineState
from app.dev.redis_server import RedisProcess
from app.settings import Settings
from app.state.client import connect
from app.state.registry import Registry
from app.ui.access import public_endpoints
from app.ui.cluster_view import host_card
from app.ui.forms import FormProblem, read_start_form, start_body
from app.ui.traffic import _quantile

REPO = Path(__file__).resolve().parents[2]
UI = REPO / "app" / "ui"
TOKEN = "ui-server-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAGE = {**AUTH, "HX-Request": "true"}  # what the dashboard's own page sends


@pytest.fixture
def app(redis_server: RedisProcess) -> Iterator[Flask]:
    client = connect(redis_server.url)
    client.flushall()
    settings = Settings.from_env(
        {
            "SAGELLM_REDIS_URL": redis_server.url,
            "SAGELLM_HOST_NAME": "api",
            "SAGELLM_ADMIN_TOKEN": TOKEN,
        }
    )
    flask_app = create_app(settings)
    flask_app.testing = True
    yield flask_app
    client.flushall()


def _url(rule: Any) -> str:
    """A concrete URL of a route (any value for its arguments)."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: "x1", rule.rule)


# ---------------------------------------------------------------------------- access


def test_every_dashboard_route_but_the_page_shells_needs_the_admin_token(app: Flask) -> None:
    client = app.test_client()
    rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/ui/")]
    public = {r.endpoint for r in rules if r.endpoint in public_endpoints()}
    shells = {"ui.cluster", "ui.engines", "ui.engine", "ui.presets", "ui.preset", "ui.gateway"}
    assert public == shells | {"ui.static"}
    data = [r for r in rules if r.endpoint not in public]
    assert len(data) >= 15  # fragments and actions
    for rule in data:
        assert rule.rule.startswith("/ui/data/"), rule.rule
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}):
                resp = client.open(_url(rule), method=method, headers=headers)
                assert resp.status_code == 401, (method, rule.rule, headers)
                assert resp.json["field"] == "Authorization"  # management's own answer
    for endpoint in shells:
        rule = next(r for r in rules if r.endpoint == endpoint)
        assert client.get(_url(rule)).status_code == 200, rule.rule
    assert client.get("/ui/static/ui.js").status_code == 200
    assert client.get("/ui/nowhere").status_code == 401  # unknown: not told apart
    assert client.get("/").headers["Location"] == "/ui/"


def test_pages_may_load_from_this_origin_only(app: Flask) -> None:
    resp = app.test_client().get("/ui/engines")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # Nothing the pages load names another host (htmx's own code only mentions URLs).
    for path in [
        *(UI / "templates").rglob("*.html"),
        UI / "static" / "ui.js",
        UI / "static" / "ui.css",
    ]:
        text = path.read_text()
        assert not re.search(r"""(src|href|action|hx-\w+)\s*=\s*["']?(https?:)?//""", text), path
        assert "url(http" not in text and "@import" not in text, path
    assert (UI / "static" / "vendor" / "htmx.LICENSE").read_text().startswith("Zero-Clause BSD")


def test_the_package_ships_every_template_and_static_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["app.ui"]
    files = [
        str(p.relative_to(UI))
        for top in ("templates", "static")
        for p in (UI / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert len(files) > 20
    missing = [
        f
        for f in files
        if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)
    ]
    assert missing == []


@pytest.mark.parametrize("token", [TOKEN, ""])
def test_an_action_another_site_makes_the_browser_send_is_refused(
    redis_server: RedisProcess, token: str
) -> None:
    """Without a token (an open API on loopback) a cross-site form could POST: an
    action must carry HX-Request (only a script of this origin can add it) and no
    foreign Origin."""
    settings = Settings.from_env(
        {"SAGELLM_REDIS_URL": redis_server.url, "SAGELLM_ADMIN_TOKEN": token}
    )
    client = create_app(settings).test_client()
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    form = {"model": "org/M-1B"}
    url = "/ui/data/engines"
    assert client.post(url, data=form, headers=auth).status_code == 403  # a plain form
    foreign = {**auth, "HX-Request": "true", "Origin": "http://evil.example"}
    assert client.post(url, data=form, headers=foreign).status_code == 403
    cross = {**auth, "HX-Request": "true", "Sec-Fetch-Site": "cross-site"}
    assert client.post(url, data=form, headers=cross).status_code == 403
    own = {**auth, "HX-Request": "true", "Origin": "http://localhost"}
    assert client.post(url, data=form, headers=own).status_code == 503  # no worker: it got in
    assert client.get("/ui/data/engines", headers=auth).status_code == 200  # reads are safe


# ---------------------------------------------------------------------------- freshness


def test_an_unchanged_fragment_is_a_304_and_a_change_shows(
    app: Flask, redis_server: RedisProcess
) -> None:
    from bench.lifecycle import synthetic_cluster

    synthetic_cluster(redis_server.url)  # 200 RUNNING engines on 8 hosts x 8 GPUs
    registry = Registry(connect(redis_server.url))
    client = app.test_client()
    for path in ("/ui/data/engines", "/ui/data/cluster"):
        first = client.get(path, headers=AUTH)
        assert first.status_code == 200 and first.headers["Cache-Control"] == "no-store"
        etag = first.headers["ETag"]
        again = client.get(path, headers={**AUTH, "If-None-Match": etag})
        assert again.status_code == 304 and again.data == b""
        # A write that changes nothing shown (a health check) is still a 304...
        registry.update("eng-syn-0007", lambda r: setattr(r, "last_health_at", time.time()))
        assert client.get(path, headers={**AUTH, "If-None-Match": etag}).status_code == 304
        # ...a state change is not, and the new state is in the answer.
        registry.transition("eng-syn-0007", EngineState.UNHEALTHY)
        changed = client.get(path, headers={**AUTH, "If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["ETag"] != etag
        assert b"UNHEALTHY" in changed.data
        registry.transition("eng-syn-0007", EngineState.RUNNING)
    rows = client.get("/ui/data/engines?state=RUNNING&host=syn-1", headers=AUTH).data.decode()
    assert rows.count('<tr data-engine="') == 25  # 200 engines over 8 hosts


# ---------------------------------------------------------------------------- pieces


def test_the_start_form_becomes_the_api_body_and_the_api_schema_judges_it() -> None:
    form = {
        "model": " org/M-1B ",
        "tensor_parallel": "2",
        "required_memory_gb": "7.5",
        "use_gpu": "true",
        "gpu_ids": "0, 1",
        "extra_args": "--enable-prefix-caching --max-num-seqs '8'",
        "label": "",
    }
    assert start_body(form) == {
        "model": "org/M-1B",
        "tensor_parallel": 2,
        "required_memory_gb": 7.5,
        "use_gpu": True,
        "gpu_ids": [0, 1],
        "extra_args": ["--enable-prefix-caching", "--max-num-seqs", "8"],
    }
    read = read_start_form(form)
    assert not isinstance(read, FormProblem)
    spec, policy = read
    assert spec.tensor_parallel == 2 and spec.gpu_ids == (0, 1) and policy is None
    bad = read_start_form({"model": "org/M-1B", "tensor_parallel": "2x"})
    assert isinstance(bad, FormProblem)
    assert bad.fields == (("tensor_parallel", "must be an integer, got '2x'"),)


def test_the_dry_run_refuses_what_a_start_would_refuse(app: Flask) -> None:
    client = app.test_client()
    owned = client.post(
        "/ui/data/plan", data={"model": "org/M-1B", "extra_args": "--port 1"}, headers=PAGE
    )
    assert b'data-plan="refused"' in owned.data and b"--port" in owned.data
    nowhere = client.post("/ui/data/plan", data={"model": "org/M-1B"}, headers=PAGE)
    assert b'data-plan="refused"' in nowhere.data and b"no host" in nowhere.data


def test_a_gpu_bar_adds_up_to_its_total_and_clips_what_does_not_fit() -> None:
    mib = 1024
    gpus = (
        (
            0,
            "A",
            "GPU-0",
            80 * mib,
            10 * mib,
            8 * mib,
            61 * mib,
            None,
            ((8 * mib, "e", "eng-1", "RUNNING"),),
        ),
        # outside processes grew after the reservation: more is held than there is
        (1, "A", "GPU-1", 24 * mib, 20 * mib, 8 * mib, 0, None, ((8 * mib, "f", "eng-2", "LOST"),)),
    )
    card = host_card(("h", "10.0.0.1", False, 0.0, "mock", (1, 2), gpus, ()), 1 * mib)
    first, second = card.gpus
    assert [(s.kind, s.mib) for s in first.segments] == [
        ("engine", 8 * mib),
        ("outside", 10 * mib),
        ("margin", 1 * mib),
        ("free", 61 * mib),
    ]
    assert sum(s.width for s in first.segments) == pytest.approx(100)
    assert second.margin_mib == 0 and second.overcommitted_mib == 4 * mib
    assert sum(s.width for s in second.segments) == pytest.approx(100)
    assert not card.up


def test_latency_quantiles_come_from_the_histogram_increase() -> None:
    before = {0.01: 0.0, 0.1: 0.0, 1.0: 0.0, float("inf"): 0.0}
    after = {0.01: 0.0, 0.1: 50.0, 1.0: 100.0, float("inf"): 100.0}
    assert _quantile(0.5, before, after) == pytest.approx(0.1)
    assert _quantile(0.95, before, after) == pytest.approx(0.1 + 0.9 * 0.9)
    assert _quantile(0.5, after, after) is None  # nothing happened in the window
