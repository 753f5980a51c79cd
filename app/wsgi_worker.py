"""The API server's gunicorn worker class: gevent, serving HTTP with gevent's own
``pywsgi`` handler (gunicorn's ``gevent_pywsgi``), plus an idle timeout.

Why gevent: the gateway mostly waits on engines, and one greenlet per connection holds
thousands of concurrent streams in one process, where gthread needs a thread each.
Why pywsgi rather than gunicorn's ``gevent`` worker: on the 2-core benchmark machine it
spent 15-20% less CPU per proxied request (gunicorn's pure-Python request parser and
response writer cost more, and it writes headers and the first body bytes in separate
sends), and CPU per request is what bounds the gateway's throughput there
(``bench/gateway.py --worker-class``; README, Benchmarks).

What this adds: pywsgi waits for a connection's next request forever, so idle
keep-alive clients would hold their connection slots (``--worker-connections``)
indefinitely; here the wait is bounded by gunicorn's ``--keep-alive`` seconds, as
gunicorn's own gevent worker bounds it.

Request limits are pywsgi's, not gunicorn's ``--limit-request-*``: an 8 KiB request
line, at most 100 header lines of 64 KiB each (``http.client``'s header parser). Going
over them, or sending two ``Content-Length`` headers (which pywsgi alone would let
through, reading the first), is a plain 400 here, without a traceback in the log.
"""

from __future__ import annotations

import http.client

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler


class IdleTimeoutHandler(PyWSGIHandler):
    idle_timeout_s = 20.0

    def read_requestline(self) -> str | None:
        with gevent.Timeout(self.idle_timeout_s, False):
            line: str = super().read_requestline()
            return line
        return None  # idle too long: pywsgi closes the connection on an empty line

    def read_request(self, raw_requestline: str) -> bool:
        # pywsgi answers a ValueError with a 400 and logs one line; other errors with
        # a 400 and a traceback.
        try:
            ok: bool = super().read_request(raw_requestline)
        except http.client.HTTPException as exc:  # e.g. more than 100 headers
            raise ValueError(f"bad request headers: {exc}") from None
        if len(self.headers.get_all("Content-Length") or ()) > 1:
            raise ValueError("more than one Content-Length header")
        return ok


class ApiWorker(GeventPyWSGIWorker):
    def init_process(self) -> None:
        # This server's --keep-alive, on a handler class of this worker process's own.
        self.wsgi_handler = type(
            "ApiHandler", (IdleTimeoutHandler,), {"idle_timeout_s": float(self.cfg.keepalive)}
        )
        super().init_process()
