"""External engines' pure rules (``app.core.external``): base URLs, API keys, what a
probe answer means, and what their records may and may not do."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.errors import IllegalTransition, ValidationError
from app.core.external import (
    NOT_PROBED,
    check_api_key,
    external_record,
    models_probe_failure,
    normalise_base_url,
    probed,
)
from app.core.models import EngineRecord, EngineState
from app.core.spec import EngineKind
from app.gateway.discovery import backends_from, known_from

S = EngineState
KEY = "sk-unit-0123456789"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("http://h:8000", "http://h:8000"),
        ("http://h:8000/", "http://h:8000"),
        ("http://h:8000/v1", "http://h:8000"),
        ("http://h:8000/v1/", "http://h:8000"),
        ("HTTPS://API.Example.org/openai/v1", "https://api.example.org/openai"),
        ("https://api.example.org", "https://api.example.org"),
        ("http://10.0.0.7:9000/proxy/v1", "http://10.0.0.7:9000/proxy"),
        ("http://h:8000/v10", "http://h:8000/v10"),  # only a whole /v1 is dropped
    ],
)
def test_base_url_is_stored_as_the_server_root_without_v1(given: str, stored: str) -> None:
    assert normalise_base_url(given) == stored


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("ftp://h:21", "http:// or https://"),
        ("h:8000", "http:// or https://"),
        ("http://", "needs a host"),
        ("http://:8000", "needs a host"),
        (f"http://user:{KEY}@h:8000", "credentials"),
        (f"http://h:8000/v1?api-key={KEY}", "query"),
        ("http://h:8000/#frag", "query or fragment"),
        ("http://h:99999", "not a valid URL"),
        ("http://h:0", "port 0"),
        ("http://h:8000/a b", "spaces"),
        ("http://h\n:8000", "control"),
        ("http://[::1]:8000", "DNS name or an IPv4"),
        ("http://h:8000/p%2e", "path"),
        ("http://" + "h" * 2100, "at most 2048"),
    ],
)
def test_a_bad_base_url_is_refused_naming_the_field_and_never_quoting_it(
    given: str, why: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        normalise_base_url(given)
    assert exc.value.field == "base_url" and why in exc.value.message
    assert KEY not in exc.value.message


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "1-4096"),
        ("k" * 4097, "1-4096"),
        (KEY + "\r\nX-Injected: 1", "visible ASCII"),
        (KEY + " x", "visible ASCII"),
        (KEY + "é", "visible ASCII"),
    ],
)
def test_an_api_key_that_cannot_go_into_a_header_is_refused_without_quoting_it(
    key: str, why: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        check_api_key(key)
    assert exc.value.field == "api_key" and why in exc.value.message
    assert KEY not in exc.value.message
    assert check_api_key("k" * 4096) == "k" * 4096


@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (200, {"data": [{"id": "a"}, {"id": "m"}]}, None),
        (401, {"error": {"message": f"bad key {KEY}"}}, "HTTP 401: it refused the request"),
        (403, None, "HTTP 403"),
        (500, {"data": [{"id": "m"}]}, "HTTP 500"),
        (200, None, "not an OpenAI model list"),
        (200, {"data": "m"}, "not an OpenAI model list"),
        (200, {"data": [{"id": "other"}]}, "does not serve 'm' (it lists ['other'])"),
    ],
)
def test_a_probe_passes_only_when_the_model_list_names_the_served_model(
    status: int, body: Any, failure: str | None
) -> None:
    got = models_probe_failure(status, body, "m")
    if failure is None:
        assert got is None
    else:
        assert got is not None and failure in got and KEY not in got


def _external(state: S = S.RUNNING) -> EngineRecord:
    rec = external_record("eng-x", "ext", EngineKind.LLM, "https://e.org/api", api_key_set=True)
    rec.state = state
    return rec


def test_an_external_record_routes_to_its_url_holds_nothing_and_is_never_stopped() -> None:
    new = external_record("eng-x", "ext", EngineKind.EMBEDDING, "http://e:1", api_key_set=False)
    assert (new.state, new.last_error, probed(new)) == (S.UNHEALTHY, NOT_PROBED, False)
    assert new.spec.gpu_count == 0 and new.spec.kind is EngineKind.EMBEDDING
    rec = _external()
    assert rec.base_url == "https://e.org/api" and rec.host is None and rec.gpus == []
    assert not rec.owns_nothing and rec.in_service and not rec.drainable
    with pytest.raises(IllegalTransition, match="external"):
        rec.request_stop()
    assert rec.state is S.RUNNING
    with pytest.raises(IllegalTransition):
        rec.start_drain(0.0)
    # the record's health methods move it (no process: pid None)
    rec.count_failed_checks(None, 1, unhealthy="GET https://e.org/api/v1/models: HTTP 503")
    assert rec.state is S.UNHEALTHY and probed(rec)
    rec.mark_healthy(None)
    assert rec.state is S.RUNNING and rec.health_failures == 0 and rec.last_health_at
    assert EngineRecord.from_dict(rec.to_dict()) == rec
    assert rec.to_dict()["base_url"] == "https://e.org/api"


def test_discovery_routes_to_a_running_external_engine_with_its_key_out_of_sight() -> None:
    running, unhealthy = _external(), _external(S.UNHEALTHY)
    unhealthy.id = "eng-y"
    (backend,) = backends_from([running, unhealthy], {"eng-x": KEY, "eng-y": "other"})
    assert (backend.engine_id, backend.base_url, backend.api_key) == (
        "eng-x",
        running.base_url,
        KEY,
    )
    assert KEY not in repr(backend)
    assert {k.engine_id for k in known_from([running, unhealthy])} == {"eng-x", "eng-y"}
    (keyless,) = backends_from([running])
    assert keyless.api_key is None
