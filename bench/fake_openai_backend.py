"""A fast, fake OpenAI-compatible backend for benchmarks and tests.

    python -m bench.fake_openai_backend --port 8301 --service-ms 20 [--stream-chunks 16]

Replies are canned and precomputed; ``--service-ms`` is how long each request takes
(a non-blocking timer, so any number of requests can wait at once). Streams send
``--stream-chunks`` SSE events spread evenly over the service time, then
``data: [DONE]``.

Why asyncio with a hand-written HTTP/1.1 parser and not ``http.server``: in a
benchmark the backend shares the CPU with the gateway and the load generator, so each
request must cost it little. At concurrency 32 this server used about half to a third
of the CPU per request of a ``ThreadingHTTPServer`` doing the same (~80 vs ~220 us per
instant request, ~410 vs ~960 us per 16-chunk stream, on the 2-core dev VM); at
concurrency 1 both cost about the same. It does HTTP/1.1 keep-alive, ``Content-Length``
request bodies (what OpenAI clients and the gateway send), chunked responses for
streams, and ``Connection: close``; nothing more.

Importable for tests::

    server, thread = serve_in_thread(0, service_ms=5)   # port 0: any free port
    base = f"http://127.0.0.1:{server.port}"
    ...
    server.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EMBEDDING_DIM = 384
MAX_HEADER_BYTES = 64 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    501: "Not Implemented",
}


def _json_response(status: int, body: bytes, *, close: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    return head.encode("latin-1") + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body


def _error(status: int, message: str) -> bytes:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    return json.dumps(body).encode()


def _sse_chunk(payload: bytes) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    event = b"data: " + payload + b"\n\n"
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_DONE = _sse_chunk(b"[DONE]") + b"0\r\n\r\n"


@dataclass
class _Replies:
    """Every reply body, built once: serving a request is then a dict lookup and a write."""

    served_name: str
    stream_chunks: int
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        name = self.served_name
        self.health = b"{}"
        self.models = json.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "fake",
                        "root": name,
                        "max_model_len": 4096,
                    }
                ],
            }
        ).encode()
        usage = {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
        self.chat = json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": self.created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello from the fake backend."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        ).encode()
        self.completion = json.dumps(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": self.created,
                "model": name,
                "choices": [
                    {"index": 0, "text": " from the fake backend.", "finish_reason": "stop"}
                ],
                "usage": usage,
            }
        ).encode()
        n = max(1, self.stream_chunks)
        self.chat_stream = [self._chat_event(i, n) for i in range(n)]
        self.completion_stream = [self._completion_event(i, n) for i in range(n)]
        vector = [round(((i * 37) % 101) / 101 - 0.5, 6) for i in range(EMBEDDING_DIM)]
        self.vector_json = json.dumps(vector)

    def _chat_event(self, i: int, n: int) -> bytes:
        delta: dict[str, str] = {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.served_name,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": "stop" if i == n - 1 else None}
            ],
        }
        return _sse_chunk(json.dumps(chunk, separators=(",", ":")).encode())

    def _completion_event(self, i: int, n: int) -> bytes:
        chunk = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": self.created,
            "model": self.served_name,
            "choices": [
                {"index": 0, "text": f"tok{i} ", "finish_reason": "stop" if i == n - 1 else None}
            ],
        }
        return _sse_chunk(json.dumps(chunk, separators=(",", ":")).encode())

    def embeddings(self, inputs: int) -> bytes:
        data = ",".join(
            f'{{"object":"embedding","index":{i},"embedding":{self.vector_json}}}'
            for i in range(inputs)
        )
        return (
            f'{{"object":"list","data":[{data}],"model":"{self.served_name}",'
            f'"usage":{{"prompt_tokens":{4 * inputs},"total_tokens":{4 * inputs}}}}}'
        ).encode()


class _Connection(asyncio.Protocol):
    """One client connection: requests are answered in order (no pipelining overlap)."""

    def __init__(self, server: FakeBackend) -> None:
        self.server = server
        self.buf = bytearray()
        self.busy = False  # a delayed reply is pending; hold later requests in buf
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server.connections.discard(self.transport)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next_requests()

    def _next_requests(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEADER_BYTES:
                    self._write(_json_response(413, _error(413, "headers too large"), close=True))
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._write(_json_response(400, _error(400, "bad request line"), close=True))
                return
            length = 0
            close = version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    if not value.strip().isdigit():
                        msg = "bad Content-Length"
                        self._write(_json_response(400, _error(400, msg), close=True))
                        return
                    length = int(value)
                elif name == "connection":
                    value = value.strip().lower()
                    close = value == "close" or (version == "HTTP/1.0" and value != "keep-alive")
                elif name == "transfer-encoding":
                    msg = "chunked request bodies are not supported; send Content-Length"
                    self._write(_json_response(501, _error(501, msg), close=True))
                    return
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            self.server.requests += 1
            self._dispatch(method, target.split("?", 1)[0], body, close)

    def _write(self, data: bytes, close: bool = True) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.transport.close()
            self.transport = None

    def _now(self, status: int, body: bytes, close: bool) -> None:
        self._write(_json_response(status, body, close=close), close)

    def _reply(self, data: bytes, close: bool) -> None:
        """Reply now, or after the service time, then go on with buffered requests."""
        delay = self.server.service_s
        if delay <= 0:
            self._write(data, close)
            return
        self.busy = True

        def later() -> None:
            self.busy = False
            self._write(data, close)
            self._next_requests()

        self.server.call_later(delay, later)

    def _dispatch(self, method: str, path: str, body: bytes, close: bool) -> None:
        r = self.server.replies
        if path in ("/health", "/v1/models"):
            if method != "GET":
                self._now(405, _error(405, "use GET"), close)
            else:
                self._now(200, r.health if path == "/health" else r.models, close)
            return
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            self._now(404, _error(404, f"no route {path}"), close)
            return
        if method != "POST":
            self._now(405, _error(405, "use POST"), close)
            return
        try:
            payload: Any = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError
        except ValueError:
            self._now(400, _error(400, "the body must be a JSON object"), close)
            return
        if path == "/v1/embeddings":
            inputs = payload.get("input", "")
            # a string or a list of token ids is one input; a list of those is several
            several = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
            count = len(inputs) if several else 1
            self._reply(_json_response(200, r.embeddings(max(1, count)), close=close), close)
            return
        chat = path == "/v1/chat/completions"
        if payload.get("stream") is True:
            self._stream(r.chat_stream if chat else r.completion_stream, close)
            return
        self._reply(_json_response(200, r.chat if chat else r.completion, close=close), close)

    def _stream(self, events: list[bytes], close: bool) -> None:
        """Headers and event i at (i + 1) * service / n; [DONE] with the last event.

        Times are absolute (``call_at``), so timer lateness does not add up over events.
        """
        head = _STREAM_HEAD + (b"Connection: close\r\n\r\n" if close else b"\r\n")
        step = self.server.service_s / len(events)
        if step <= 0:
            self._write(head + b"".join(events) + _DONE, close)
            return
        self.busy = True
        start = self.server.now()

        def send(i: int) -> None:
            if self.transport is None:  # the client went away
                self.busy = False
                return
            last = i == len(events) - 1
            data = (head if i == 0 else b"") + events[i] + (_DONE if last else b"")
            if not last:
                self._write(data, close=False)
                self.server.call_at(start + (i + 2) * step, send, i + 1)
                return
            self.busy = False
            self._write(data, close)
            self._next_requests()

        self.server.call_at(start + step, send, 0)


class FakeBackend:
    """The server: ``start()`` it in this thread's loop (``run``) or in a thread."""

    def __init__(
        self,
        port: int = 0,
        service_ms: float = 0.0,
        *,
        stream_chunks: int = 16,
        served_model_name: str = "bench-model",
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port
        self.service_s = service_ms / 1000.0
        self.replies = _Replies(served_model_name, stream_chunks)
        self.requests = 0  # requests parsed so far (tests, logs)
        self.connections: set[asyncio.Transport] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._stopped = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_later(delay, fn, *args)

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_at(when, fn, *args)

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _serve(self, ready: threading.Event | None, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._server.close)
        if ready is not None:
            ready.set()
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass
        finally:
            for t in list(self.connections):
                t.close()
            self._stopped.set()

    def run(self, ready: threading.Event | None = None, *, handle_signals: bool = False) -> None:
        """Serve in the calling thread until ``stop()`` (or SIGTERM/SIGINT when
        ``handle_signals``; only the main thread may)."""
        asyncio.run(self._serve(ready, handle_signals))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close every connection; safe from any thread, idempotent."""
        loop, server = self._loop, self._server
        if loop is None or server is None or self._stopped.is_set():
            return
        try:
            loop.call_soon_threadsafe(server.close)
        except RuntimeError:  # the loop already ended
            return
        self._stopped.wait(timeout)


def serve_in_thread(
    port: int = 0,
    service_ms: float = 0.0,
    *,
    stream_chunks: int = 16,
    served_model_name: str = "bench-model",
    host: str = "127.0.0.1",
) -> tuple[FakeBackend, threading.Thread]:
    """Start a backend in a daemon thread; returns once it listens (``server.port``)."""
    server = FakeBackend(
        port,
        service_ms,
        stream_chunks=stream_chunks,
        served_model_name=served_model_name,
        host=host,
    )
    ready = threading.Event()
    thread = threading.Thread(
        target=server.run, args=(ready,), daemon=True, name=f"fake-openai-{port}"
    )
    thread.start()
    if not ready.wait(10):
        raise RuntimeError(f"fake backend did not start listening on {host}:{port}")
    return server, thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service-ms", type=float, default=0.0, help="time per request")
    parser.add_argument("--stream-chunks", type=int, default=16, help="SSE events per stream")
    parser.add_argument("--served-model-name", default="bench-model")
    args = parser.parse_args(argv)
    server = FakeBackend(
        args.port,
        args.service_ms,
        stream_chunks=args.stream_chunks,
        served_model_name=args.served_model_name,
        host=args.host,
    )
    ready = threading.Event()
    threading.Thread(
        target=lambda: ready.wait() and print(f"listening on {server.base_url}", flush=True),
        daemon=True,
    ).start()
    server.run(ready, handle_signals=True)


if __name__ == "__main__":
    main()
