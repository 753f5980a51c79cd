"""The API server's gunicorn worker class: gevent, serving HTTP with gevent's own
``pywsgi`` handler (gunicorn's ``gevent_pywsgi``), with an idle timeout and a faster,
stricter request-header parser.

Why gevent: the gateway mostly waits on engines, and one greenlet per connection holds
thousands of concurrent streams in one process, where gthread needs a thread each.
Why pywsgi rather than gunicorn's ``gevent`` worker: on the 2-core benchmark machine it
spent 15-20% less CPU per proxied request (gunicorn's pure-Python request parser and
response writer cost more, and it writes headers and the first body bytes in separate
sends), and CPU per request is what bounds the gateway's throughput there
(``bench/gateway.py --worker-class``; README, Benchmarks).

What this adds to pywsgi:

* An idle timeout: pywsgi waits for a connection's next request forever, so idle
  keep-alive clients would hold their connection slots (``--worker-connections``)
  indefinitely. Here the wait for a request line is bounded by gunicorn's
  ``--keep-alive`` seconds, as gunicorn's own gevent worker bounds it.
* Request headers parsed line by line (about 7 instead of 47 us for an OpenAI SDK
  request; pywsgi uses the ``email`` package), following RFC 9112 section 5 strictly:
  a field name is a token directly followed by ``:``, obsolete line folding is
  refused, at most 100 header lines of at most 64 KiB each, one ``Content-Length``.
  Every violation is a plain 400 (pywsgi would log a traceback for some).
* Fewer, cheaper writes: the response head goes out in one write with the first body
  bytes (pywsgi writes them separately), and each write tries one ``send`` before
  falling back to ``sendall`` (gevent's ``sendall`` costs ~4 us more per call; most
  writes fit the socket buffer at once). A relayed SSE stream makes one write per
  piece, so this is most of the per-piece cost that is ours to save.

These hook pywsgi's ``_sendall`` and ``_write_with_headers`` (underscored, but
unchanged since gevent 1.x; ``tests/integration/test_api_server.py`` exercises both).
"""

from __future__ import annotations

import re
from typing import Any

from gevent.pywsgi import OldMessage
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

MAX_HEADER_LINES = 100
MAX_HEADER_LINE_BYTES = 65536
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_END = (b"\r\n", b"\n", b"")


def parse_header_lines(fp: Any) -> OldMessage:
    """Read header lines from ``fp`` up to the empty line; ValueError if malformed."""
    msg = OldMessage()
    for _ in range(MAX_HEADER_LINES + 1):
        line = fp.readline(MAX_HEADER_LINE_BYTES + 1)
        if line in _END:
            if len(msg.get_all("Content-Length") or ()) > 1:
                raise ValueError("more than one Content-Length header")
            return msg
        if len(line) > MAX_HEADER_LINE_BYTES:
            raise ValueError(f"a header line is longer than {MAX_HEADER_LINE_BYTES} bytes")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            what = "obsolete line folding" if line[:1] in (b" ", b"\t") else "malformed"
            raise ValueError(f"{what} header line {line[:60]!r}")
        msg[name.decode("latin-1")] = value.strip(b" \t\r\n").decode("latin-1")
    raise ValueError(f"more than {MAX_HEADER_LINES} header lines")


class ApiHandler(PyWSGIHandler):
    idle_timeout_s = 20.0
    _collect: bytearray | None = None  # writes held back to go out as one

    def _sendall(self, data: bytes | bytearray) -> None:
        if self._collect is not None:
            self._collect += data
        else:
            self._send(data)
        self.response_length += len(data)

    def _send(self, data: bytes | bytearray) -> None:
        try:
            sent = self.socket.send(data)
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:])
        except OSError as exc:  # pywsgi's bookkeeping for its log, then the same error
            self.status = f"socket error: {exc}"
            code: int = getattr(self, "code", 0) or 0
            if code > 0:
                self.code = -code
            raise

    def log_request(self) -> None:
        # gunicorn's handler builds the access-log record even when access logging is
        # off (production's default): skip that work on every request. It also fails
        # (AttributeError, a traceback per request) for a request too malformed to get
        # a WSGI environ; pywsgi has already logged those as "Invalid request".
        if getattr(self, "environ", None) is None:
            return
        if getattr(self.server.log, "access_log_enabled", True):
            super().log_request()

    def _write_with_headers(self, data: bytes) -> None:
        self._collect = bytearray()
        try:
            super()._write_with_headers(data)  # the head, then the first body bytes
            head_and_body = self._collect
        finally:
            self._collect = None
        self._send(head_and_body)

    def read_requestline(self) -> str | None:
        # A socket timeout, not a gevent.Timeout: no timer to create per request.
        # pywsgi treats the socket.timeout as a closed connection.
        self.socket.settimeout(self.idle_timeout_s)
        try:
            line: str = super().read_requestline()
        finally:
            if self.socket is not None:
                self.socket.settimeout(None)
        return line

    def MessageClass(self, fp: Any, *args: Any) -> OldMessage:
        # pywsgi answers the parser's ValueError with a 400 and one log line.
        return parse_header_lines(fp)


class ApiWorker(GeventPyWSGIWorker):
    def init_process(self) -> None:
        # This server's --keep-alive, on a handler class of this worker process's own.
        self.wsgi_handler = type(
            "ApiHandler", (ApiHandler,), {"idle_timeout_s": float(self.cfg.keepalive)}
        )
        super().init_process()
