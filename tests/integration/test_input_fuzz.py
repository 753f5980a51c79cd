"""Hostile input to the management API and the gateway, on a real redis-server.

Two parts:

* Presets never see the API's environment: ``${VAR}`` is the client's to expand, and
  a preset that still holds one is a 400 that names the line (issue 11).
* Hypothesis fuzz of engine starts, preset plans/applies and gateway bodies: no 5xx
  (a 503 only where it means "no engine/worker"), every error a JSON body with a
  reason, and after any 4xx nothing is reserved, recorded or queued.

No worker runs: a host heartbeat is written by the test (as in ``test_api.py``), so
placement, the ledger and the task queues are real while nothing consumes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from app.dev.redis_server import RedisProcess
from app.settings import Settings
from app.state.ledger import Ledger
from app.state.registry import Registry
from tests.integration.test_api import add_host

pytestmark = pytest.mark.integration

E = "/v1/management/engines"
P = "/v1/management/presets"
SECRET_REDIS_URL = "redis://:s3cret-password@db.internal:6379/0"


@pytest.fixture
def api(
    redis_server: RedisProcess, real_redis: redis.Redis, tmp_path: Path
) -> Iterator[FlaskClient]:
    settings = Settings.from_env(
        {
            "SAGELLM_REDIS_URL": redis_server.url,
            "SAGELLM_HOST_NAME": "api",
            "SAGELLM_DATA_DIR": str(tmp_path / "api-data"),
        }
    )
    app = create_app(settings)
    app.testing = False  # a bug is a 500 answer here, as a client would see it
    yield app.test_client()


def _preset(model: str, **engine: Any) -> str:
    lines = [f"    {k}: {v}" for k, v in engine.items()]
    return "\n".join(
        [
            "version: 1",
            "name: leak",
            "engines:",
            "  - name: chat",
            f"    model: {model}",
            "    use_gpu: false",
            *lines,
            "",
        ]
    )


# ---------------------------------------------------------------------------- presets


def test_dry_run_of_a_preset_naming_a_server_variable_is_400_and_leaks_nothing(
    api: FlaskClient, real_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API process's environment holds secrets a preset must never read.
    monkeypatch.setenv("SAGELLM_REDIS_URL", SECRET_REDIS_URL)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    add_host(real_redis, "a", "none")

    r = api.post(
        f"{P}/apply",
        query_string={"dry_run": "true"},
        json={"yaml": _preset("${SAGELLM_REDIS_URL}", label="${HF_TOKEN:-none}")},
    )

    assert r.status_code == 400, r.json
    assert r.json["message"] == (
        "request body: line 5 still contains ${SAGELLM_REDIS_URL}: variables are expanded "
        "by the client (sagellm preset apply --file) from your environment"
    )
    assert "s3cret" not in r.text and "hf_secret" not in r.text
    assert Ledger(real_redis).is_empty() and Registry(real_redis).engines() == []


def test_a_preset_object_body_with_a_variable_is_400_too(
    api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    doc = {
        "version": 1,
        "name": "leak",
        "engines": [{"name": "chat", "model": "m", "env": {"HF_TOKEN": "${HF_TOKEN}"}}],
    }

    r = api.post(f"{P}/apply", query_string={"dry_run": "true"}, json={"preset": doc})

    assert r.status_code == 400, r.json
    assert "still contains ${HF_TOKEN}" in r.json["message"]
    assert "hf_secret" not in r.text


def test_an_escaped_dollar_brace_is_a_literal_and_not_refused(
    api: FlaskClient, real_redis: redis.Redis
) -> None:
    add_host(real_redis, "a", "none")
    r = api.post(
        f"{P}/apply",
        query_string={"dry_run": "true"},
        json={
            "yaml": _preset("m", env="{HF_GREETING: '$${not_a_variable}'}", runtime="transformers")
        },
    )
    assert r.status_code == 200, r.json
    assert r.json["ok"] is True  # the parser unescapes it (see test_presets.py)


def test_builtins_use_the_apis_data_dir_not_its_environment(
    api: FlaskClient, real_redis: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGELLM_DATA_DIR", str(tmp_path / "env-data"))
    add_host(real_redis, "a", "none")

    shown = api.get(f"{P}/cpu-demo")
    planned = api.post(f"{P}/cpu-demo/apply", query_string={"dry_run": "true"})

    assert shown.status_code == 200, shown.json
    want = str(tmp_path / "api-data" / "models" / "tiny-chat")
    assert shown.json["engines"][0]["spec"]["model"] == want
    assert planned.status_code == 200, planned.json
    assert planned.json["plan"][0]["model"] == want
    assert "${" not in shown.text and "${" not in planned.text


def test_a_body_may_name_the_apis_model_locations(
    api: FlaskClient, real_redis: redis.Redis, tmp_path: Path
) -> None:
    # The two locations cpu-demo uses are the API's facts (not environment variables):
    # a user copy of cpu-demo.yaml keeps working.
    add_host(real_redis, "a", "none")
    r = api.post(
        f"{P}/apply",
        query_string={"dry_run": "true"},
        json={"yaml": _preset("${SAGELLM_DEMO_LLM_PATH}", runtime="transformers")},
    )
    assert r.status_code == 200, r.json
    assert r.json["plan"][0]["model"] == str(tmp_path / "api-data" / "models" / "tiny-chat")


# ---------------------------------------------------------------------------- fuzz

# Bounded and deterministic: the same examples every run, well under a minute in all.
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

ENGINE_FIELDS = (
    "model",
    "kind",
    "runtime",
    "tensor_parallel",
    "pipeline_parallel",
    "use_gpu",
    "label",
    "port",
    "host",
    "gpu_ids",
    "required_memory_gb",
    "max_model_len",
    "extra_args",
    "served_model_name",
    "env",
    "dtype",
    "quantization",
    "policy",
)

odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "m; rm -rf /",
            "$(reboot)",
            "`id`",
            "../../etc/passwd",
            "${HF_TOKEN}",
            "$${x}",
            "--port=1",
            "--host 0.0.0.0",
            "\x00",
            "\ud7ff\ue000\U0010ffff",
            "é" * 300,
            "a" * 5000,
            "Qwen/Qwen2.5-1.5B-Instruct",
            "vllm",
            "embedding",
            "llm",
            "transformers",
            "CUDA_VISIBLE_DEVICES",
        ]
    ),
)
odd_number = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalar = st.one_of(st.none(), st.booleans(), odd_number, odd_text)
json_value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(odd_text, inner, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def engine_bodies(draw: st.DrawFn) -> Any:
    """Mostly objects with the real field names (some values plausible, some hostile),
    plus random keys; sometimes not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_value)
    body: dict[str, Any] = {}
    if draw(st.integers(0, 3)) > 0:  # mostly valid but for one or two fields: deep paths
        body["model"] = draw(st.sampled_from(["m", "Qwen/Qwen2.5-1.5B-Instruct"]))
        body["required_memory_gb"] = draw(st.sampled_from([1, 1.5, 79]))
    for key in draw(st.lists(st.sampled_from(ENGINE_FIELDS), max_size=2, unique=True)):
        if key == "extra_args":
            body[key] = draw(st.one_of(st.lists(odd_text, max_size=4), json_value))
        elif key == "env":
            body[key] = draw(st.one_of(st.dictionaries(odd_text, odd_text, max_size=3), json_value))
        elif key == "gpu_ids":
            body[key] = draw(st.one_of(st.lists(odd_number, max_size=3), json_value))
        else:
            body[key] = draw(json_value)
    if draw(st.integers(0, 3)) == 0:
        body.update(draw(st.dictionaries(odd_text, json_value, max_size=2)))
    return body


def yaml_bomb(depth: int, width: int) -> str:
    """Billion laughs in one flow list: ``width**depth`` leaves from a few hundred bytes
    (each level an anchor whose items are aliases of the one before)."""
    levels = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, depth + 1):
        levels.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "[" + ", ".join(levels) + "]"


def test_the_alias_bomb_is_yaml_that_expands() -> None:
    # An alias before its anchor is only an "undefined alias" error, refused before any
    # expansion: each level must come after the one its aliases name.
    assert yaml.safe_load(yaml_bomb(3, 2))[-1] == [[[["lol"] * 2] * 2] * 2] * 2


# YAML scalars that break naive loaders: huge numbers, non-finite floats, deep nesting,
# tags, undefined aliases.
HOSTILE_YAML = [
    ".inf",
    "-.inf",
    ".nan",
    "9" * 5000,
    "-" + "9" * 5000,
    "0x" + "f" * 5000,
    "1e999",
    "[" * 3000 + "]" * 3000,
    "{a: " * 500 + "1" + "}" * 500,
    "!!python/object/apply:os.system ['id']",
    "!!binary aGk=",
    "!!set {a, b}",
    "2001-12-14t21:59:43.10-05:00",
    "*undefined",
    "&x [*x]",
    "'\\x00'",
    '"\\ud800"',
    "~",
    "[]",
    "{}",
]


@st.composite
def preset_texts(draw: st.DrawFn) -> str:
    """YAML a person (or an attacker) might send: well-formed presets with one hostile
    value, alias bombs in any field, or plain garbage."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.text(max_size=200))
    if choice in (1, 2):
        if choice == 1:
            value = yaml_bomb(draw(st.integers(1, 8)), draw(st.integers(2, 9)))
        else:
            value = draw(st.sampled_from(HOSTILE_YAML))
        field = draw(st.sampled_from([*ENGINE_FIELDS[:-1], "name", "version", "description"]))
        engine = {"name": "e", "model": "m", "use_gpu": "false", "required_memory_gb": "1"}
        top = {"version": "1", "name": "b", "description": "d"}
        where = draw(st.sampled_from(["engine", "top"]))
        (engine if where == "engine" else top)[field] = value
        lines = [f"{k}: {v}" for k, v in top.items()] + ["engines:"]
        items = list(engine.items())
        lines.append(f"  - {items[0][0]}: {items[0][1]}")
        lines += [f"    {k}: {v}" for k, v in items[1:]]
        return "\n".join(lines) + "\n"
    engine = draw(engine_bodies())
    if isinstance(engine, dict) and draw(st.booleans()):
        engine.pop("policy", None)
        engine["name"] = draw(st.one_of(st.just("e"), odd_text))
    top: Any = {
        "version": draw(st.one_of(st.just(1), json_value)),
        "name": draw(st.one_of(st.just("p"), odd_text)),
        "engines": draw(st.one_of(st.just([engine]), json_value)),
    }
    if choice == 3:
        top.update(draw(st.dictionaries(odd_text, json_value, max_size=2)))
    try:
        return yaml.safe_dump(top, allow_unicode=draw(st.booleans()))
    except yaml.YAMLError:
        return json.dumps(top)


@st.composite
def preset_bodies(draw: st.DrawFn) -> Any:
    choice = draw(st.integers(0, 6))
    if choice <= 3:
        return {"yaml": draw(preset_texts())}
    if choice == 4:
        return {"preset": draw(st.one_of(json_value, engine_bodies()))}
    if choice == 5:
        return draw(st.dictionaries(st.sampled_from(["yaml", "preset", "x"]), json_value))
    return draw(json_value)


@st.composite
def gateway_bodies(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 4)) == 0:
        return draw(json_value)
    body = draw(st.dictionaries(odd_text, json_value, max_size=3))
    for key in draw(
        st.lists(
            st.sampled_from(["model", "messages", "input", "stream", "max_tokens"]), max_size=4
        )
    ):
        body[key] = draw(json_value)
    return body


raw_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [b"", b"{", b"[1,", b"null", b"\xff\xfe", b'{"model": "m"', b"NaN", b"1e999999"]
    ),
)


@dataclass
class Sent:
    status: int
    body: Any
    text: str


def _send(api: FlaskClient, path: str, body: Any, raw: bytes | None, **query: Any) -> Sent:
    if raw is not None:
        r = api.post(path, data=raw, content_type="application/json", query_string=query)
    else:
        # json.dumps writes NaN and Infinity as bare words: hostile, but what Python
        # clients send.
        data = json.dumps(body)
        r = api.post(path, data=data, content_type="application/json", query_string=query)
    try:
        parsed = json.loads(r.get_data(as_text=True))
    except ValueError:
        parsed = None
    return Sent(r.status_code, parsed, r.get_data(as_text=True))


def _error_reason(sent: Sent) -> str:
    """The reason in a management ({message, field?}) or OpenAI ({error: {message}})
    error body; empty when the body has none."""
    body = sent.body
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "")
    return str(body.get("message") or "")


def _nothing_left(r: redis.Redis) -> None:
    assert Ledger(r).is_empty()
    assert Registry(r).engines() == []
    assert r.llen("host.a") == 0  # the start task would sit here, addressed by host


def _check(sent: Sent, r: redis.Redis, *, no_backend_ok: bool, where: str) -> None:
    assert sent.status < 500 or (no_backend_ok and sent.status == 503), (where, sent.text[:500])
    if sent.status >= 400:
        assert _error_reason(sent), (where, sent.status, sent.text[:500])
        _nothing_left(r)


def _fresh(r: redis.Redis) -> None:
    r.flushdb()
    add_host(r, "a", "2x80", ttl=3600)


def _preset_with(field: str, value: str, *, top: bool) -> str:
    engine = {"name": "e", "model": "m", "use_gpu": "false", "required_memory_gb": "1"}
    head = {"version": "1", "name": "b"}
    (head if top else engine)[field] = value
    lines = [f"{k}: {v}" for k, v in head.items()] + ["engines:"]
    items = list(engine.items())
    lines.append(f"  - {items[0][0]}: {items[0][1]}")
    lines += [f"    {k}: {v}" for k, v in items[1:]]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("value", [*HOSTILE_YAML, yaml_bomb(8, 9)])
def test_hostile_yaml_values_are_4xx_in_every_field(
    api: FlaskClient, real_redis: redis.Redis, value: str
) -> None:
    """Each of these was a 500 (a 5000-digit int, nesting 3000 deep, .inf memory) or a
    multi-gigabyte error message (the alias bomb quoted whole) before it was fixed."""
    add_host(real_redis, "a", "2x80", ttl=3600)
    fields = [(f, False) for f in ENGINE_FIELDS[:-1]]
    fields += [("version", True), ("name", True), ("description", True)]
    for field, top in fields:
        text = _preset_with(field, value, top=top)
        sent = _send(api, f"{P}/apply", {"yaml": text}, None, dry_run="true")
        _check(sent, real_redis, no_backend_ok=False, where=f"{field}: {value[:40]}")
        assert len(sent.text) < 4096, (field, sent.text[:200])


@pytest.mark.parametrize(
    "value",
    ["[" * 3000 + "]" * 3000, "[{a: " * 1500 + "1" + "}]" * 1500, "{a: " * 3000 + "1" + "}" * 3000],
    ids=["lists", "lists-and-maps", "maps"],
)
def test_deeply_nested_yaml_is_refused_before_it_costs_cpu(
    api: FlaskClient, real_redis: redis.Redis, value: str
) -> None:
    """PyYAML's scanner costs O(depth) per token: 3000 ``[`` cost the API a second of
    CPU (20 s for the 20 fields of the test above) before the composer gave up with a
    RecursionError. Now ten of each are refused, at the depth cap, in under 2 s."""
    add_host(real_redis, "a", "2x80", ttl=3600)
    text = _preset_with("model", value, top=False)
    started = time.monotonic()
    for _ in range(10):
        sent = _send(api, f"{P}/apply", {"yaml": text}, None, dry_run="true")
        assert sent.status == 400, sent.text[:300]
        assert sent.body["message"].startswith(
            "request body: line 5: invalid YAML (nested deeper than 32 levels, column"
        ), sent.body
    assert time.monotonic() - started < 2.0
    _nothing_left(real_redis)


def test_fuzz_engine_start_bodies(api: FlaskClient, real_redis: redis.Redis) -> None:
    @FUZZ
    @given(body=engine_bodies(), raw=st.one_of(st.none(), raw_bytes))
    def run(body: Any, raw: bytes | None) -> None:
        _fresh(real_redis)
        sent = _send(api, E, body, raw, wait="false")
        _check(sent, real_redis, no_backend_ok=False, where=f"POST {E} {body!r:.300} {raw!r}")

    run()


@pytest.mark.parametrize("route", [f"{P}/apply", f"{P}/cpu-demo/apply"])
def test_fuzz_preset_bodies(api: FlaskClient, real_redis: redis.Redis, route: str) -> None:
    @FUZZ
    @given(
        body=preset_bodies(),
        raw=st.one_of(st.none(), raw_bytes),
        query=st.one_of(
            st.just({}),
            st.just({}),
            st.just({}),
            st.dictionaries(
                st.sampled_from(["dry_run", "rollback", "timeout", "policy"]),
                st.one_of(odd_text, st.sampled_from(["true", "-1", "1e9", "nan", "spread"])),
                max_size=3,
            ),
        ),
    )
    def run(body: Any, raw: bytes | None, query: dict[str, str]) -> None:
        _fresh(real_redis)
        # dry_run always: a real apply would wait for engines no worker here starts.
        sent = _send(api, route, body, raw, **{**query, "dry_run": "true"})
        _check(sent, real_redis, no_backend_ok=False, where=f"POST {route} {body!r:.300}")
        if sent.status < 400:
            _nothing_left(real_redis)  # a dry run reserves nothing either

    run()


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/embeddings"])
def test_fuzz_gateway_bodies_without_engines(
    api: FlaskClient, real_redis: redis.Redis, route: str
) -> None:
    @FUZZ
    @given(body=gateway_bodies(), raw=st.one_of(st.none(), raw_bytes))
    def run(body: Any, raw: bytes | None) -> None:
        _fresh(real_redis)
        sent = _send(api, route, body, raw)
        # No engine runs: 503 (no engine serves the model) or a 4xx, never another 5xx.
        assert sent.status >= 400, sent.text[:300]
        _check(sent, real_redis, no_backend_ok=True, where=f"POST {route} {body!r:.300}")

    run()
