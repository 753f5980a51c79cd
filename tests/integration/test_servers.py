"""The project's own engine servers, run as real processes and spoken to over real HTTP.

Each server is started once per module (``python -m workers.servers.<name>``) on a
small local model: all-MiniLM-L6-v2 from its package, and a tiny random Llama built
by ``tests.tiny_llm``. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One engine server subprocess, its port and its log file."""

    def __init__(self, module: str, model: Path, log_dir: Path, served_name: str) -> None:
        self.port = _free_port()
        self.served_name = served_name
        self.log_path = log_dir / f"{module.rsplit('.', 1)[-1]}-{self.port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        argv = [
            sys.executable,
            "-m",
            module,
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            served_name,
            "--device",
            "cpu",
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> ServerProcess:
        """Poll /health until 200; fail with the server's log if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet: the model is still loading
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout_s} s:\n{self.log_tail()}")


def _stop_all(servers: list[ServerProcess]) -> list[str]:
    """SIGTERM every server at once, SIGKILL whichever has not gone in 10 s; say which
    did not exit 0 by themselves."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    unclean = []
    for server in servers:
        try:
            code = server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            code = server.proc.wait()
        if code != 0:
            unclean.append(f"{server.served_name}: exit {code}\n{server.log_tail()}")
    return unclean


@dataclass(frozen=True)
class Servers:
    embedding: ServerProcess
    llm: ServerProcess
    llm_to_terminate: ServerProcess  # for the SIGTERM test, which ends it


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest, minilm_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """Every server this module needs, launched together so their model loading overlaps.

    Launched, not waited for: each test waits for the one it uses to be ready.
    """
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[ServerProcess] = []
    try:
        started.append(ServerProcess("workers.servers.embedding", minilm_path, log_dir, "minilm"))
        # Built here, while the embedding server loads: each takes seconds of CPU.
        tiny_llm_path: Path = request.getfixturevalue("tiny_llm_path")
        for name in ("tiny", "tiny-to-terminate"):
            started.append(
                ServerProcess("workers.servers.transformers", tiny_llm_path, log_dir, name)
            )
        yield Servers(*started)
    finally:
        unclean = _stop_all(started)
    # SIGTERM is how the control plane stops engines: each must exit 0 on it.
    assert not unclean, "\n".join(unclean)


@pytest.fixture
def embedding_server(servers: Servers) -> ServerProcess:
    return servers.embedding.wait_ready()


@pytest.fixture
def llm_server(servers: Servers) -> ServerProcess:
    return servers.llm.wait_ready()


def _post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# --- embedding server ---------------------------------------------------------------------


def test_embedding_models_lists_served_name_with_model_root(
    embedding_server: ServerProcess, minilm_path: Path
) -> None:
    body = httpx.get(f"{embedding_server.url}/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == "minilm"
    assert card["object"] == "model"
    assert card["owned_by"] == "sagellm"
    assert card["root"] == str(minilm_path)
    assert isinstance(card["created"], int)


def test_embeddings_of_a_string_and_a_list_are_384_dim_with_real_token_counts(
    embedding_server: ServerProcess,
) -> None:
    one = _post(embedding_server, "/v1/embeddings", {"model": "minilm", "input": "hello world"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list"
    assert body["model"] == "minilm"
    [item] = body["data"]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == 384
    # [CLS] hello world [SEP]: the BERT tokenizer's real count, not a guess.
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}

    many = _post(embedding_server, "/v1/embeddings", {"input": ["a", "hello world", ""]}).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert all(len(d["embedding"]) == 384 for d in many["data"])
    assert many["usage"]["prompt_tokens"] == 3 + 4 + 2
    # The same text embeds the same alone or in a batch.
    assert _cosine(many["data"][1]["embedding"], item["embedding"]) > 0.9999


def test_similar_sentences_embed_closer_than_unrelated_ones(
    embedding_server: ServerProcess,
) -> None:
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
    ]
    data = _post(embedding_server, "/v1/embeddings", {"input": texts}).json()["data"]
    food, bread, stocks = (d["embedding"] for d in data)
    assert _cosine(food, bread) > _cosine(food, stocks) + 0.3


def test_base64_encoding_carries_the_same_float32_vector(embedding_server: ServerProcess) -> None:
    import numpy as np

    floats = _post(embedding_server, "/v1/embeddings", {"input": "tea"}).json()
    b64 = _post(embedding_server, "/v1/embeddings", {"input": "tea", "encoding_format": "base64"})
    raw = base64.b64decode(b64.json()["data"][0]["embedding"])
    decoded = np.frombuffer(raw, dtype="<f4")
    assert decoded.shape == (384,)
    assert np.allclose(decoded, floats["data"][0]["embedding"], atol=1e-6)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "input", "required"),
        ({"input": 42}, "input", "string"),
        ({"input": []}, "input", "empty"),
        ({"input": [101, 2088]}, "input", "token ids"),
        ({"input": [[101], [2088]]}, "input", "token ids"),
        ({"input": ["ok", 3]}, "input", "list of strings"),
        ({"input": ["x"] * 2049}, "input", "2048"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
        ({"input": "x", "dimensions": 128}, "dimensions", "384"),
        ({"input": "x", "model": 7}, "model", "string"),
    ],
)
def test_bad_embedding_requests_are_400_naming_the_field(
    embedding_server: ServerProcess, body: dict[str, Any], field: str, words: str
) -> None:
    response = _post(embedding_server, "/v1/embeddings", body)
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == field
    assert field in error["message"]
    assert words in error["message"]


def test_embedding_request_naming_another_model_is_404(embedding_server: ServerProcess) -> None:
    response = _post(embedding_server, "/v1/embeddings", {"model": "gpt-4", "input": "x"})
    assert response.status_code == 404
    assert _error(response)["code"] == "model_not_found"


def test_non_json_body_and_unknown_route_get_openai_errors(
    embedding_server: ServerProcess,
) -> None:
    not_json = httpx.post(f"{embedding_server.url}/v1/embeddings", content=b"input=x")
    assert not_json.status_code == 400
    assert "JSON object" in _error(not_json)["message"]
    unknown = httpx.get(f"{embedding_server.url}/v1/nope")
    assert unknown.status_code == 404
    assert "/v1/nope" in _error(unknown)["message"]


def test_openai_sdk_embeddings(embedding_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="x")
    # The SDK asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model="minilm", input=["hello", "world"])
    assert [len(d.embedding) for d in result.data] == [384, 384]
    assert result.usage.prompt_tokens == 6
    floats = client.embeddings.create(model="minilm", input="hello", encoding_format="float")
    assert _cosine(floats.data[0].embedding, result.data[0].embedding) > 0.9999


# --- transformers server ------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hello world"}]


def test_llm_models_lists_served_name(llm_server: ServerProcess) -> None:
    [card] = httpx.get(f"{llm_server.url}/v1/models").json()["data"]
    assert card["id"] == "tiny"
    assert card["max_model_len"] == 256


def test_chat_completion_has_openai_shape_and_usage(llm_server: ServerProcess) -> None:
    response = _post(
        llm_server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 6}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    # <s> <|user|> hello world </s> <|assistant|>: the chat template's tokens.
    assert usage["prompt_tokens"] == 6
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_completion_runs_to_max_tokens_and_says_length(llm_server: ServerProcess) -> None:
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0}
    first = _post(llm_server, "/v1/completions", body).json()
    assert first["id"].startswith("cmpl-")
    assert first["object"] == "text_completion"
    [choice] = first["choices"]
    assert choice["logprobs"] is None
    assert choice["text"]
    assert first["usage"]["completion_tokens"] == 8
    assert choice["finish_reason"] == "length"
    # temperature 0 is greedy: the same text every time.
    assert _post(llm_server, "/v1/completions", body).json()["choices"][0]["text"] == choice["text"]


def test_seed_makes_sampling_repeatable(llm_server: ServerProcess) -> None:
    def sample(seed: int) -> str:
        body = {"prompt": "hello", "max_tokens": 12, "temperature": 1.0, "seed": seed}
        return str(_post(llm_server, "/v1/completions", body).json()["choices"][0]["text"])

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_cuts_the_output_before_it(llm_server: ServerProcess) -> None:
    body: dict[str, Any] = {"prompt": "hello", "max_tokens": 12, "temperature": 0}
    full = _post(llm_server, "/v1/completions", body).json()["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 4
    stop = words[3]
    cut = _post(llm_server, "/v1/completions", {**body, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def _sse_payloads(response: httpx.Response) -> list[str]:
    payloads = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            payloads.append(line[len("data: ") :])
    return payloads


def test_streamed_chat_sends_role_then_content_deltas_then_finish_then_done(
    llm_server: ServerProcess,
) -> None:
    body = {
        "model": "tiny",
        "messages": CHAT,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{llm_server.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        payloads = _sse_payloads(response)

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == []
    assert final["choices"][0]["finish_reason"] == "length"
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(deltas) > 3  # word by word, not one blob at the end
    streamed = "".join(deltas)
    assert streamed.strip()
    assert usage_chunk["usage"]["completion_tokens"] == 10
    # Streaming and not streaming produce the same greedy text.
    plain = _post(llm_server, "/v1/chat/completions", {**body, "stream": False}).json()
    assert plain["choices"][0]["message"]["content"] == streamed


def test_streamed_completion_ends_with_done(llm_server: ServerProcess) -> None:
    body = {"prompt": "hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{llm_server.url}/v1/completions", json=body) as response:
        payloads = _sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["text"] for c in chunks).strip()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "content"),
        ("/v1/chat/completions", {"messages": CHAT, "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 300}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": CHAT, "stop": 5}, "stop"),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"prompt": "word " * 300}, "prompt"),
    ],
)
def test_bad_generation_requests_are_400_naming_the_field(
    llm_server: ServerProcess, path: str, body: dict[str, Any], field: str
) -> None:
    response = _post(llm_server, path, body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert field in error["param"]
    assert field in error["message"]


def test_generation_request_naming_another_model_is_404(llm_server: ServerProcess) -> None:
    response = _post(llm_server, "/v1/chat/completions", {"model": "gpt-4", "messages": CHAT})
    assert response.status_code == 404
    assert _error(response)["code"] == "model_not_found"


def test_openai_sdk_chat_streaming_and_not(llm_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{llm_server.url}/v1", api_key="x")
    messages: Any = CHAT
    result = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0
    )
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content
    assert result.usage is not None and result.usage.completion_tokens == 5

    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == result.choices[0].message.content

    text = client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    assert text.choices[0].text


def test_sigterm_during_a_stream_exits_zero_within_seconds(servers: Servers) -> None:
    server = servers.llm_to_terminate.wait_ready()
    body = {"prompt": "hello", "max_tokens": 250, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        next(response.iter_lines())  # generation has started
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0, server.log_tail()
    assert time.monotonic() - started < 5
    assert "shutting down" in server.log_tail()


# --- in process: cancellation ------------------------------------------------------------


def test_closing_a_generation_early_cancels_it_and_frees_the_engine(tiny_llm_path: Path) -> None:
    from workers.servers.transformers import CausalLMEngine, SamplingParams

    engine = CausalLMEngine(str(tiny_llm_path), "cpu")
    params = SamplingParams(max_tokens=100, temperature=0, top_p=1.0, seed=None, stop=())
    ids = engine.completion_prompt_ids("hello")
    full = engine.start(ids, params, "prompt")
    "".join(full)
    assert full.completion_tokens == 100  # greedy runs the whole way without EOS

    gen = engine.start(ids, params, "prompt")
    pieces = iter(gen)
    next(pieces)
    pieces.close()  # what the HTTP layer does when the client goes away
    assert gen.completion_tokens < 100
    assert engine.shutdown(timeout_s=0.1)  # the lock was released
