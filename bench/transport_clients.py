"""Which HTTP client should the gateway use? Cost per proxied request, by client.

    python -m bench.transport_clients [--n 3000]

Each client sends small chat POSTs to a fake backend (``bench.fake_openai_backend``,
its own process) the way the gateway's transport does: one pooled client, response
read as a stream (non-stream replies read whole, SSE replies chunk by chunk). Reported:
wall time and *client CPU* per request (``time.process_time`` of this process, so the
backend is not counted): on a 2-core machine CPU per request is what caps throughput.

Two scenes: one thread in a loop against an instant backend (the client's own cost),
and 32 threads sharing one client against a 20 ms backend (the pool under
concurrency, as in a gunicorn gthread worker).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import importlib.util
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.stack import HOST, REPO, stop_process, wait_http

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()
HEADERS = {"content-type": "application/json", "accept": "application/json"}

Send = Callable[[str, bytes], int]  # (base_url, body) -> bytes read


def httpx_client(lib: Any = httpx) -> Send:
    """As app.gateway.transport: httpx.Client, send(stream=True), iter_raw."""
    client = lib.Client(
        timeout=lib.Timeout(connect=3, read=600, write=60, pool=3),
        limits=lib.Limits(max_connections=512, max_keepalive_connections=512),
        trust_env=False,
    )

    def send(base: str, body: bytes) -> int:
        req = client.build_request("POST", base + "/v1/chat/completions", content=body)
        req.headers.update(HEADERS)
        resp = client.send(req, stream=True)
        try:
            return sum(len(c) for c in resp.iter_raw())
        finally:
            resp.close()

    return send


def urllib3_client() -> Send:
    import urllib3

    pool = urllib3.PoolManager(maxsize=512, block=False, retries=False)

    def send(base: str, body: bytes) -> int:
        resp = pool.request(
            "POST",
            base + "/v1/chat/completions",
            body=body,
            headers=HEADERS,
            preload_content=False,
            decode_content=False,
        )
        try:
            return sum(len(c) for c in resp.stream(65536))
        finally:
            resp.release_conn()

    return send


def http_client_pool() -> Send:
    """Stdlib http.client with a minimal thread-safe keep-alive pool (a LIFO queue)."""
    idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue()

    def send(base: str, body: bytes) -> int:
        try:
            conn = idle.get_nowait()
        except queue.Empty:
            host, port = base.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body, headers=HEADERS)
        resp = conn.getresponse()
        n = 0
        while chunk := resp.read1(65536):
            n += len(chunk)
        resp.read()  # marks the response done, so the connection can be reused
        idle.put(conn)
        return n

    return send


def sagellm_transport() -> Send:
    """The gateway's own client (``app/gateway/transport.py``), as the proxy uses it:
    ``open``, then ``chunks`` (relay) or ``read`` (whole reply)."""
    from app.gateway.transport import Transport

    transport = Transport(read_timeout_s=600)

    def send(base: str, body: bytes) -> int:
        up = transport.open(base, "/v1/chat/completions", body, HEADERS)
        return sum(len(c) for c in transport.chunks(up))

    return send


def httpx2_client() -> Send:
    """pydantic's httpx fork (same API); its pool fixes the quadratic assignment pass
    (pydantic/httpx2#974, #1075; encode/httpcore#1035 is the unmerged upstream fix)."""
    import httpx2

    return httpx_client(httpx2)


CLIENTS: dict[str, Callable[[], Send]] = {
    "httpx": httpx_client,
    "httpx2": httpx2_client,
    "urllib3": urllib3_client,
    "http.client": http_client_pool,
    "sagellm": sagellm_transport,
}
_MODULES = {"sagellm": "app"}


def measure(send: Send, base: str, body: bytes, n: int, threads: int) -> dict[str, float]:
    for _ in range(max(50, threads * 5)):  # warm-up: connections, imports, caches
        send(base, body)
    per = n // threads

    def loop() -> None:
        for _ in range(per):
            send(base, body)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    total = per * threads
    return {
        "req_s": total / wall,
        "wall_us": wall / total * 1e6 * threads,
        "cpu_us": cpu / total * 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    from app.dev.redis_server import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="requests per measurement")
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help=f"comma-separated subset of {', '.join(CLIENTS)} (default: all installed)",
    )
    args = parser.parse_args(argv)
    procs: list[subprocess.Popen[bytes]] = []
    bases: dict[float, str] = {}
    try:
        for service_ms in (0.0, 20.0):
            port = free_port(HOST)
            argv = [sys.executable, "-m", "bench.fake_openai_backend", "--port", str(port)]
            argv += ["--service-ms", f"{service_ms:g}", "--served-model-name", "m"]
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_http(f"http://{HOST}:{port}/health", 15, proc)
            bases[service_ms] = f"http://{HOST}:{port}"
        rows: list[dict[str, Any]] = []
        for scene, service_ms, threads, n in (
            ("1 thread, instant backend", 0.0, 1, args.n),
            ("32 threads, 20 ms backend", 20.0, 32, args.n),
        ):
            for mode, body in (("non-stream", BODY), ("stream (16 chunks)", STREAM_BODY)):
                for name in args.clients.split(","):
                    make = CLIENTS[name]
                    if importlib.util.find_spec(_MODULES.get(name, name.split(".")[0])) is None:
                        continue  # httpx2 / urllib3 not installed here
                    r = measure(make(), bases[service_ms], body, n, threads)
                    rows.append({"scene": scene, "mode": mode, "client": name, **r})
                    print(
                        f"  {scene} {mode} {name}: {r['req_s']:.0f} req/s, "
                        f"{r['cpu_us']:.0f} us CPU/req",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for proc in procs:
            stop_process(proc)
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("httpx", "httpcore", "httpx2", "urllib3")
        if importlib.util.find_spec(name) is not None
    )
    print(f"python {sys.version.split()[0]}, {versions}\n")
    print("| scene | mode | client | req/s | wall us/req | client CPU us/req |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scene']} | {r['mode']} | {r['client']} | {r['req_s']:.0f} "
            f"| {r['wall_us']:.0f} | {r['cpu_us']:.0f} |"
        )


if __name__ == "__main__":
    main()
