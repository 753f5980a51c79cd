"""The OpenAI-compatible gateway over real HTTP: real engines started by a real
worker, the official openai SDK as the client."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app import create_app
from app.core.models import EngineState
from app.core.spec import EngineKind, EngineSpec
from app.services.engines import start_engine, wait_for_state
from app.settings import Settings
from tests.integration.harness import AppServer, ClusterEnv, wait_until

pytestmark = pytest.mark.integration
S = EngineState


def _gateway(env: ClusterEnv, **extra: str) -> AppServer:
    values = {k: v for k, v in env.env.items() if k.startswith("SAGELLM_")}
    values.update({"SAGELLM_GATEWAY_REFRESH_S": "0.2", **extra})
    return AppServer(create_app(Settings.from_env(values)))


@pytest.fixture
def gw(env: ClusterEnv) -> Iterator[AppServer]:
    server = _gateway(env)
    yield server
    server.close()


def _replica(env: ClusterEnv, name: str = "rep", delay: str = "0") -> str:
    spec = EngineSpec(
        model="org/Rep-1B",
        served_model_name=name,
        required_memory_gb=8,
        extra_args=("--fake-reply-delay-s", delay),
    )
    rec = wait_for_state(env.cluster, start_engine(env.cluster, spec).id, [S.RUNNING], 60)
    assert rec.state is S.RUNNING, rec.last_error
    return rec.id


def test_openai_sdk_chat_stream_embeddings_and_models(
    env: ClusterEnv, gw: AppServer, tiny_llm_path: Path, minilm_path: Path
) -> None:
    env.start_worker("a")
    chat = start_engine(
        env.cluster,
        EngineSpec(
            model=str(tiny_llm_path),
            runtime="transformers",
            use_gpu=False,
            served_model_name="tiny-chat",
        ),
    )
    emb = start_engine(
        env.cluster,
        EngineSpec(
            model=str(minilm_path),
            label="minilm",
            kind=EngineKind.EMBEDDING,
            served_model_name="all-minilm-l6-v2",
        ),
    )
    for rec in (chat, emb):
        assert wait_for_state(env.cluster, rec.id, [S.RUNNING, S.FAILED], 180).state is S.RUNNING
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    wait_until(lambda: len(client.models.list().data) == 2, 10, what="models listed")
    assert sorted(m.id for m in client.models.list().data) == ["all-minilm-l6-v2", "tiny-chat"]

    out = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert out.choices[0].message.content and out.usage and out.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == out.choices[0].message.content

    # the model omitted: exactly one LLM model runs, so it is used
    r = httpx.post(f"{gw.url}/v1/completions", json={"prompt": "the", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"

    # by label, with the engine's served name substituted for the engine
    e = client.embeddings.create(model="minilm", input=["a cat", "a dog"])
    assert [len(d.embedding) for d in e.data] == [384, 384]

    # wrong kind: 400 that says so
    with pytest.raises(openai.BadRequestError, match="is an embedding engine"):
        client.chat.completions.create(
            model="all-minilm-l6-v2", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="is an llm engine"):
        client.embeddings.create(model="tiny-chat", input="x")


def test_unknown_model_is_404_at_once_and_lists_the_served_models(
    env: ClusterEnv, gw: AppServer
) -> None:
    """As OpenAI answers: the SDK (default retries) raises NotFoundError at once, and the
    message lists what is served instead of suggesting to start the misspelt name."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused")  # retries on 503
    messages = [{"role": "user", "content": "hi"}]

    def not_found(model: str) -> openai.NotFoundError:
        t0 = time.monotonic()
        with pytest.raises(openai.NotFoundError) as exc:
            client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 1.0, "an unknown model must not be retried"
        assert (exc.value.code, exc.value.param, exc.value.type) == (
            "model_not_found",
            "model",
            "invalid_request_error",
        )
        return exc.value

    assert "no model is served" in not_found("Qwen/Qwen2.5-7B-Instruct").message
    r = httpx.post(f"{gw.url}/v1/embeddings", json={"input": "x"})  # model omitted
    assert r.status_code == 404 and "--kind embedding" in r.json()["error"]["message"]

    env.start_worker("a")
    _replica(env, name="rep")
    wait_until(lambda: client.models.list().data, 10, what="rep listed")
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "rpe", "messages": messages})
    assert r.status_code == 404 and "Retry-After" not in r.headers
    message = not_found("rpe").message
    assert "'rpe' does not exist" in message and "models served: rep" in message
    assert "engine start rpe" not in message


def test_known_model_without_a_healthy_engine_is_503_with_retry_after(
    env: ClusterEnv, gw: AppServer
) -> None:
    env.start_worker("a", FAKE_VLLM_STARTUP_DELAY="4")  # its engines load for 4 s
    spec = EngineSpec(model="org/Slow-1B", served_model_name="slow", required_memory_gb=8)
    rec = start_engine(env.cluster, spec)
    time.sleep(0.5)  # past the gateway's refresh (0.2 s): it knows the engine
    assert env.get(rec.id).state in (S.PENDING, S.STARTING)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "slow", "messages": []})
    assert r.status_code == 503 and r.headers["Retry-After"] == "10"
    error = r.json()["error"]
    assert error["code"] == "no_backend" and rec.id in error["message"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="org/Slow-1B", messages=[])
    assert exc.value.status_code == 503
    # the model omitted: an LLM engine is on its way, so it is worth retrying
    assert httpx.post(f"{gw.url}/v1/completions", json={"prompt": "x"}).status_code == 503
    assert wait_for_state(env.cluster, rec.id, [S.RUNNING], 30).state is S.RUNNING
    ok = wait_until(
        lambda: (
            (
                x := httpx.post(
                    f"{gw.url}/v1/chat/completions", json={"model": "slow", "messages": []}
                )
            ).status_code
            == 200
            and x
        ),
        5,
        what="slow served once RUNNING",
    )
    assert ok.headers["X-Sagellm-Engine"] == rec.id


def test_replicas_share_by_outstanding_requests_and_survive_a_kill(
    env: ClusterEnv, gw: AppServer
) -> None:
    env.start_worker("a")
    env.start_beat()
    a, b = _replica(env, delay="1.0"), _replica(env, delay="1.0")
    body = {"model": "rep", "messages": [{"role": "user", "content": "hi"}]}
    wait_until(
        lambda: httpx.post(f"{gw.url}/v1/chat/completions", json=body).status_code == 200,
        10,
        what="gateway sees the replicas",
    )
    seen: Counter[str] = Counter()
    peak = 0

    def call() -> str:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200
        return r.headers["X-Sagellm-Engine"]

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call) for _ in range(8)]
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            inflight = httpx.get(f"{gw.url}/v1/management/backends").json()["llm_backends"]
            peak = max(peak, sum(x["in_flight"] for x in inflight))
            time.sleep(0.1)
        seen.update(f.result() for f in futures)
    # 8 concurrent requests over 2 replicas of equal speed: least outstanding gives 4 + 4
    assert seen == Counter({a: 4, b: 4})
    assert peak >= 4  # in-flight counts were visible in /v1/management/backends

    rec = env.get(a)
    assert rec.pid is not None
    os.kill(rec.pid, signal.SIGKILL)
    served = []
    for _ in range(8):
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text  # a connect error fails over to the other
        served.append(r.headers["X-Sagellm-Engine"])
    assert served[0] == b  # the dead one is out of rotation at once
    # ... until its restart, which the worker's exit watch may finish within a request
    assert served[1] == b or env.get(a).restart_count == 1
    # the worker restarts the killed replica; once a health check passes it is back
    back = wait_for_state(env.cluster, a, [S.RUNNING], 20)
    assert back.state is S.RUNNING and back.restart_count == 1
    wait_until(
        lambda: any(
            httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30).headers[
                "X-Sagellm-Engine"
            ]
            == a
            for _ in range(4)
        ),
        20,
        what="restarted replica back in rotation",
    )


def test_streams_pass_through_and_a_client_disconnect_closes_the_upstream(
    env: ClusterEnv, gw: AppServer
) -> None:
    env.start_worker("a")
    eid = _replica(env, name="slow", delay="5")
    base = env.get(eid).base_url
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    wait_until(lambda: httpx.get(f"{gw.url}/v1/models").json()["data"], 10, what="listed")
    t0 = time.monotonic()
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_raw())
        # the first chunk arrives after ~1 s (5 s / 5 chunks), not after the whole 5 s
        assert b"tok0" in first and time.monotonic() - t0 < 3
    # we went away after one chunk: the gateway must close its upstream request
    stats = wait_until(
        lambda: (s := httpx.get(f"{base}/stats").json())["disconnects"] and s,
        8,
        what="upstream closed",
    )
    assert stats["open_streams"] == 0


def test_api_keys_and_admin_token(env: ClusterEnv) -> None:
    server = _gateway(env, SAGELLM_API_KEYS="k1,k2", SAGELLM_ADMIN_TOKEN="adm")
    try:
        r = httpx.get(f"{server.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer k2"}).status_code
            == 200
        )
        r = httpx.get(f"{server.url}/v1/management/hosts", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 401 and "SAGELLM_ADMIN_TOKEN" in r.json()["message"]
        assert (
            httpx.get(
                f"{server.url}/v1/management/hosts", headers={"Authorization": "Bearer adm"}
            ).status_code
            == 200
        )
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.close()


def test_api_keys_without_an_admin_token_still_require_a_key(env: ClusterEnv) -> None:
    server = _gateway(env, SAGELLM_API_KEYS="k1")
    try:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, f"{server.url}{path}", json={})
            assert r.status_code == 401, (path, r.text)
            r = httpx.request(
                method,
                f"{server.url}{path}",
                json={},
                headers={"Authorization": "Basic Zm9vOmJhcg=="},
            )
            assert r.status_code == 401, (path, r.text)
        ok = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
        # no admin token configured: management stays open
        assert httpx.get(f"{server.url}/v1/management/hosts").status_code == 200
    finally:
        server.close()
