"""The stand-in for an external engine: an OpenAI-compatible HTTP server that sagellm
did not start, which wants an API key and remembers the headers of every request.

Real HTTP/1.1 (keep-alive) on a real socket, optionally TLS and under a path prefix.
``stop()`` closes the listening socket and every open connection (a backend that went
away); ``start()`` listens again on the same address.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class KeyedBackend:
    host: str
    port: int
    served_name: str
    api_key: str | None = None
    prefix: str = ""  # e.g. "/openai": routes are <prefix>/v1/...
    tls: tuple[str, str] | None = None  # (certfile, keyfile)
    echo_auth: bool = False  # put the Authorization header it got in chat answers
    seen: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.prefix}"

    def start(self) -> KeyedBackend:
        server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for conn in conns:  # keep-alive connections would go on answering
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


def _handler(backend: KeyedBackend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with backend._lock:
                backend._conns.add(self.connection)

        def finish(self) -> None:
            with backend._lock:
                backend._conns.discard(self.connection)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self) -> str | None:
            """The path under the prefix, once the request is authorised (else None:
            answered already)."""
            backend.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
            if not self.path.startswith(backend.prefix + "/v1/"):
                self._send(404, b'{"error": {"message": "no such route"}}')
                return None
            auth = self.headers.get("Authorization", "")
            if backend.api_key is not None and auth != f"Bearer {backend.api_key}":
                self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
                return None
            return self.path[len(backend.prefix) :]

        def do_GET(self) -> None:  # http.server's name
            path = self._route()
            if path is None:
                return
            if path != "/v1/models":
                self._send(404, b"{}")
                return
            models = {"object": "list", "data": [{"id": backend.served_name, "object": "model"}]}
            self._send(200, json.dumps(models).encode())

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self._route()
            if path is None:
                return
            payload = json.loads(body)
            name = backend.served_name
            if path == "/v1/embeddings":
                data = [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}]
                self._send(200, json.dumps({"object": "list", "data": data}).encode())
                return
            if path != "/v1/chat/completions":
                self._send(404, b"{}")
                return
            said = f"model {payload.get('model')}"
            if backend.echo_auth:
                said += f"; you sent {self.headers.get('Authorization')}"
            if payload.get("stream") is True:
                self._stream(name, ["external ", "stream"])
                return
            answer = {
                "object": "chat.completion",
                "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": said}}],
            }
            self._send(200, json.dumps(answer).encode())

        def _stream(self, name: str, pieces: list[str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = [
                {
                    "object": "chat.completion.chunk",
                    "model": name,
                    "choices": [{"delta": {"content": p}}],
                }
                for p in pieces
            ]
            for data in [*(json.dumps(e) for e in events), "[DONE]"]:
                event = f"data: {data}\n\n".encode()
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    return Handler
