"""The gateway's added latency and its share of direct throughput, in one run.

    python -m bench.gateway [--quick] [--worker-class CLASS] [--json out.json]

Sets up everything on 127.0.0.1 by itself: a throw-away redis-server, two fake
OpenAI backends (``bench.fake_openai_backend``: one instant, one taking 20 ms a
request), a RUNNING engine record for each written straight into Redis (no worker:
the gateway routes to whatever the registry says runs), and the API under gunicorn
started exactly as production starts it (``app.dev.stack.gunicorn_argv``).

Each cell (backend x stream/non-stream x concurrency) is measured twice, directly
against the backend and through the gateway, by a load generator in its own process:
one thread per concurrent client, each with one keep-alive connection, a fixed number
of requests after a warm-up. See bench/README.md for the columns and the caveats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import HOST, REPO, cpu_model, local_stack, print_report, wait_http

# Targets from the issue: what the gateway should add and keep.
TARGET_ADDED_P50_MS = 2.0
TARGET_SHARE_PCT = 90.0
SLOW_SERVICE_MS = 20.0
STREAM_CHUNKS = 16
WORKER_CLASSES = {
    "production": "app.gateway.server.ApiWorker",
    "gevent": "gevent",
    "gevent_pywsgi": "gevent_pywsgi",
    "gthread": "gthread",
}


@dataclass(frozen=True)
class BackendPlan:
    label: str  # shown in the table
    served_name: str  # engine record's served_model_name; the gateway routes by it
    service_ms: float
    counts: dict[int, int]  # concurrency -> measured requests per cell


FULL_PLAN = (
    BackendPlan("instant (0 ms)", "bench-instant", 0.0, {1: 1500, 32: 5000}),
    BackendPlan(f"{SLOW_SERVICE_MS:g} ms", "bench-20ms", SLOW_SERVICE_MS, {1: 500, 32: 4000}),
)
QUICK_PLAN = (
    BackendPlan("instant (0 ms)", "bench-instant", 0.0, {1: 100, 32: 320}),
    BackendPlan(f"{SLOW_SERVICE_MS:g} ms", "bench-20ms", SLOW_SERVICE_MS, {1: 40, 32: 320}),
)


# ----------------------------------------------------------------------- load generator
# Runs in its own process (``--loadgen SPEC``) so its work does not hold the GIL of
# the orchestrator; it still shares the machine's cores with the servers.


def _request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: */*\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Conn:
    """One keep-alive HTTP/1.1 connection with a minimal response reader.

    A raw socket, not httpx: the client's own CPU per request is then a fraction of
    the servers' (see bench/transport_clients.py), so the machine's two cores go
    to what is measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, bytearray()
        return sock

    def _recv(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data

    def request(self, raw: bytes) -> tuple[int, float]:
        """Send ``raw``; read the whole response. Returns (status, time of the first
        body data: the first SSE chunk for chunked replies)."""
        sock = self.sock or self._connect()
        try:
            sock.sendall(raw)
            self._recv()
        except (ConnectionError, OSError):  # a keep-alive connection the server closed
            self.close()
            self._connect().sendall(raw)
            self._recv()
        return self._read_response()

    def _read_response(self) -> tuple[int, float]:
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            self._recv()
            buf = self.buf
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length: int | None = None
        chunked = close = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = value.strip().lower() == "close"
        pos = end + 4
        first = 0.0
        if chunked:
            while True:
                while (eol := self.buf.find(b"\r\n", pos)) < 0:
                    self._recv()
                size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
                need = eol + 2 + size + 2
                while len(self.buf) < need:
                    self._recv()
                if not first:
                    first = time.perf_counter()
                pos = need
                if size == 0:
                    break
        elif length is not None:
            while len(self.buf) < pos + length:
                self._recv()
            first = time.perf_counter()
            pos += length
        else:  # delimited by close
            try:
                while True:
                    self._recv()
            except ConnectionError:
                pass
            first = time.perf_counter()
            pos = len(self.buf)
            close = True
        del self.buf[:pos]
        if close:
            self.close()
        return status, first

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then send ``spec['n']`` requests from ``spec['concurrency']`` clients."""
    host, port, c = spec["host"], spec["port"], spec["concurrency"]
    raw = _request_bytes(host, port, spec["path"], spec["body"].encode())
    per_thread = [spec["n"] // c + (1 if i < spec["n"] % c else 0) for i in range(c)]
    warmup = max(1, spec["warmup"] // c)
    start = threading.Barrier(c + 1)
    lat: list[list[float]] = [[] for _ in range(c)]
    ttfb: list[list[float]] = [[] for _ in range(c)]
    errors: list[str] = []

    def client(i: int) -> None:
        conn = _Conn(host, port)
        try:
            for _ in range(warmup):
                conn.request(raw)
        except Exception as exc:
            errors.append(f"warm-up: {type(exc).__name__}: {exc}")
        start.wait()
        for _ in range(per_thread[i]):
            t0 = time.perf_counter()
            try:
                status, first = conn.request(raw)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            t1 = time.perf_counter()
            if status != 200:
                errors.append(f"HTTP {status}")
                continue
            lat[i].append(t1 - t0)
            ttfb[i].append(first - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(c)]
    for t in threads:
        t.start()
    start.wait()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    latencies = sorted(x for per in lat for x in per)
    firsts = sorted(x for per in ttfb for x in per)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "wall_s": wall,
        "req_s": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": _pct(latencies, 0.50) * 1000,
        "p99_ms": _pct(latencies, 0.99) * 1000,
        "ttfb_p50_ms": _pct(firsts, 0.50) * 1000,
        "sent": spec["n"] + warmup * c,  # with the warm-up, for CPU per request
        "client_cpu_us": cpu / len(latencies) * 1e6 if latencies else math.nan,
        "latencies_s": latencies,  # pooled over rounds by _combine, then dropped
        "firsts_s": firsts,
    }


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's rounds of a cell as one result: throughput is the median round's
    (robust to a round the machine's scheduler was unkind to), latency percentiles are
    over all rounds' requests, CPU per request is the mean."""
    latencies = sorted(x for r in runs for x in r["latencies_s"])
    firsts = sorted(x for r in runs for x in r["firsts_s"])
    out = {
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "first_errors": sorted({e for r in runs for e in r["first_errors"]})[:3],
        "rounds_req_s": [round(r["req_s"], 1) for r in runs],
        "req_s": statistics.median(r["req_s"] for r in runs),
        "p50_ms": _pct(latencies, 0.50) * 1000,
        "p99_ms": _pct(latencies, 0.99) * 1000,
        "ttfb_p50_ms": _pct(firsts, 0.50) * 1000,
    }
    for key in ("client_cpu_us", "backend_cpu_us", "gateway_cpu_us"):
        if key in runs[0]:
            out[key] = statistics.fmean(r[key] for r in runs)
    return out


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


# ----------------------------------------------------------------------- orchestration


@dataclass
class Cell:
    backend: str
    service_ms: float
    stream: bool
    concurrency: int
    direct: dict[str, Any] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)

    @property
    def added_p50_ms(self) -> float:
        return float(self.gateway["p50_ms"] - self.direct["p50_ms"])

    @property
    def share_pct(self) -> float:
        d = self.direct["req_s"]
        return 100.0 * self.gateway["req_s"] / d if d else math.nan


def machine() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model("unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for descendants (all our servers and
    load generators, once stopped)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _register(redis_url: str, plan: BackendPlan, port: int) -> None:
    """A RUNNING engine record, as a worker would leave it once the engine is ready."""
    from app.core.models import EngineRecord, EngineState
    from app.core.spec import EngineSpec
    from app.state.client import connect
    from app.state.registry import Registry

    Registry(connect(redis_url)).create(
        EngineRecord(
            id=f"eng-{plan.served_name}",
            spec=EngineSpec(model=plan.served_name, served_model_name=plan.served_name),
            state=EngineState.RUNNING,
            host="bench",
            address=HOST,
            port=port,
            last_health_at=time.time(),
        )
    )


def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.gateway", "--loadgen", json.dumps(spec)],
        cwd=REPO,
        capture_output=True,
        check=False,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _cpu_s(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds used so far by these processes and their children (gunicorn workers)."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            p = psutil.Process(proc.pid)
            for q in [p, *p.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _gunicorn_parser() -> str:
    """Which HTTP parser gunicorn's own workers use here (``--http-parser auto``)."""
    import importlib.util

    return "gunicorn_h1c (C)" if importlib.util.find_spec("gunicorn_h1c") else "pure Python"


def _body(served_name: str, stream: bool) -> str:
    return json.dumps(
        {
            "model": served_name,
            "messages": [{"role": "user", "content": "Say hello in five words."}],
            "max_tokens": 16,
            "stream": stream,
        }
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.dev.redis_server import free_port

    plans = QUICK_PLAN if args.quick else FULL_PLAN
    cells: list[Cell] = []
    with local_stack("sagellm-bench-", args.keep_logs) as stack:
        ports: dict[str, int] = {}
        backends: dict[str, subprocess.Popen[bytes]] = {}
        for plan in plans:
            port = free_port(HOST)
            argv = [sys.executable, "-m", "bench.fake_openai_backend", "--port", str(port)]
            argv += ["--service-ms", f"{plan.service_ms:g}", "--stream-chunks", str(STREAM_CHUNKS)]
            argv += ["--served-model-name", plan.served_name]
            proc = stack.start(argv)
            wait_http(f"http://{HOST}:{port}/health", 15, proc)
            _register(stack.redis_url, plan, port)
            ports[plan.served_name] = port
            backends[plan.served_name] = proc

        # ``threads`` is gthread's thread count, else the worker connections.
        api = stack.start_api(
            stack.env("bench"), args.workers, args.threads, args.worker_class, args.access_log
        )
        gunicorn, gw_log, gw_argv, gw_port = api.proc, api.log, api.argv, api.port
        # The records are in Redis before gunicorn starts, and each worker reads the
        # registry on its first request (the warm-up): one check that routing works.
        listed = json.loads(wait_http(f"{api.url}/v1/models", 60, gunicorn))
        missing = {p.served_name for p in plans} - {m["id"] for m in listed["data"]}
        if missing:
            raise RuntimeError(f"the gateway does not list {sorted(missing)}; see {gw_log}")

        for plan in plans:
            for stream in (False, True):
                for c, n in sorted(plan.counts.items()):
                    cell = Cell(plan.label, plan.service_ms, stream, c)
                    backend = backends[plan.served_name]
                    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
                    # Direct and gateway alternate, round by round, so a slow spell of
                    # the machine does not land on one side only.
                    for _ in range(args.rounds if c > 1 else 1):
                        for target, port in (
                            ("direct", ports[plan.served_name]),
                            ("gateway", gw_port),
                        ):
                            spec = {
                                "host": HOST,
                                "port": port,
                                "path": "/v1/chat/completions",
                                "body": _body(plan.served_name, stream),
                                "n": n,
                                "concurrency": c,
                                "warmup": max(30, 4 * c) if args.quick else max(100, 10 * c),
                            }
                            cpu0 = (_cpu_s([backend]), _cpu_s([gunicorn]))
                            res = _loadgen(spec)
                            sent = res["sent"]
                            res["backend_cpu_us"] = (_cpu_s([backend]) - cpu0[0]) / sent * 1e6
                            if target == "gateway":
                                gw_cpu = _cpu_s([gunicorn]) - cpu0[1]
                                res["gateway_cpu_us"] = gw_cpu / sent * 1e6
                            runs[target].append(res)
                            if gunicorn.poll() is not None:
                                raise RuntimeError(f"gunicorn exited; see {gw_log}")
                    cell.direct = _combine(runs["direct"])
                    cell.gateway = _combine(runs["gateway"])
                    cells.append(cell)
                    _progress(cell)
    return {
        "config": {
            "gunicorn_argv": gw_argv[gw_argv.index("--bind") :],
            "workers": args.workers,
            "threads": args.threads,
            "worker_class": args.worker_class,
            "gunicorn_parser": _gunicorn_parser(),
            "access_log": args.access_log,
            "stream_chunks": STREAM_CHUNKS,
            "rounds": args.rounds,
            "quick": args.quick,
        },
        "cells": [
            {**asdict(c), "added_p50_ms": c.added_p50_ms, "share_pct": c.share_pct} for c in cells
        ],
    }


def _progress(cell: Cell) -> None:
    mode = "stream" if cell.stream else "non-stream"
    print(
        f"  {cell.backend:15s} {mode:10s} c={cell.concurrency:<3d} "
        f"direct {cell.direct['req_s']:7.0f} req/s p50 {cell.direct['p50_ms']:6.2f} ms | "
        f"gateway {cell.gateway['req_s']:7.0f} req/s p50 {cell.gateway['p50_ms']:6.2f} ms",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------- report


def render(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}",
        f"other work on the machine during the run: {result['other_cpu_cores']:.2f} cores "
        "(CPU not used by this benchmark's processes; it skews every number)",
        f"gateway: gunicorn {cfg['worker_class']}, {cfg['workers']} workers"
        + (f" x {cfg['threads']} threads" if cfg["worker_class"] == "gthread" else "")
        + (
            f" (gunicorn's HTTP parser: {cfg['gunicorn_parser']})"
            if cfg["worker_class"] in ("gevent", "gthread")
            else ""
        )
        + f", access log {'on' if cfg['access_log'] else 'off'}; "
        f"streams: {cfg['stream_chunks']} SSE chunks spread over the service time; "
        f"concurrency-32 cells: median of {cfg['rounds']} alternating rounds"
        + (" (--quick: small counts, numbers are noisy)" if cfg["quick"] else ""),
        "",
        "| backend | mode | concurrency | requests | direct p50 ms | gateway p50 ms "
        "| added p50 ms | direct p99 ms | gateway p99 ms | direct req/s | gateway req/s "
        "| share of direct (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = result["cells"]
    for c in cells:
        d, g = c["direct"], c["gateway"]
        lines.append(
            f"| {c['backend']} | {_mode(c)} | {c['concurrency']} | {g['requests']} "
            f"| {d['p50_ms']:.2f} | {g['p50_ms']:.2f} | {c['added_p50_ms']:+.2f} "
            f"| {d['p99_ms']:.2f} | {g['p99_ms']:.2f} | {d['req_s']:.0f} | {g['req_s']:.0f} "
            f"| {c['share_pct']:.0f} |"
        )
    streams = [c for c in cells if c["stream"]]
    if streams:
        lines += [
            "",
            "Streams, time to the first SSE chunk (p50 ms):",
            "",
            "| backend | concurrency | direct | gateway | added |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in streams:
            d, g = c["direct"]["ttfb_p50_ms"], c["gateway"]["ttfb_p50_ms"]
            lines.append(
                f"| {c['backend']} | {c['concurrency']} | {d:.2f} | {g:.2f} | {g - d:+.2f} |"
            )
    lines += [
        "",
        "CPU per request (us; all processes share the same cores):",
        "",
        "| backend | mode | concurrency | load generator | fake backend | gateway (gunicorn) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        g = c["gateway"]
        lines.append(
            f"| {c['backend']} | {_mode(c)} | {c['concurrency']} | {g['client_cpu_us']:.0f} "
            f"| {g['backend_cpu_us']:.0f} | {g['gateway_cpu_us']:.0f} |"
        )
    errors = [
        f"{c['backend']} {_mode(c)} c={c['concurrency']} {who}: "
        f"{c[who]['errors']} errors, e.g. {c[who]['first_errors']}"
        for c in cells
        for who in ("direct", "gateway")
        if c[who]["errors"]
    ]
    if errors:
        lines += ["", "ERRORS:", *errors]
    lines += ["", *verdict(cells)]
    return "\n".join(lines)


def _mode(cell: dict[str, Any]) -> str:
    return "stream" if cell["stream"] else "non-stream"


def verdict(cells: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, read off the cells they are about."""
    out = []
    one = [c for c in cells if c["concurrency"] == 1]
    if one:
        worst = max(one, key=lambda c: c["added_p50_ms"])
        ok = worst["added_p50_ms"] <= TARGET_ADDED_P50_MS
        out.append(
            f"target added p50 <= {TARGET_ADDED_P50_MS:g} ms at concurrency 1: "
            f"{'MET' if ok else 'MISSED'} (worst {worst['added_p50_ms']:+.2f} ms, "
            f"{worst['backend']} {_mode(worst)})"
        )
    slow = [c for c in cells if c["concurrency"] > 1 and c["service_ms"] > 0]
    if slow:
        worst = min(slow, key=lambda c: c["share_pct"])
        ok = worst["share_pct"] >= TARGET_SHARE_PCT
        out.append(
            f"target >= {TARGET_SHARE_PCT:g}% of direct throughput at concurrency "
            f"{worst['concurrency']} ({worst['backend']} backend): "
            f"{'MET' if ok else 'MISSED'} (worst {worst['share_pct']:.0f}%, "
            f"{_mode(worst)})"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument(
        "--threads",
        "--connections",
        dest="threads",
        type=int,
        default=None,
        help="gevent worker connections (default 1000) or gthread threads (default 64)",
    )
    parser.add_argument(
        "--worker-class",
        default="production",
        choices=sorted(WORKER_CLASSES),
        help="gunicorn worker class: production (app.gateway.server.ApiWorker), or gunicorn's "
        "gevent, gevent_pywsgi or gthread to compare (sync is not offered: with "
        "--threads > 1 gunicorn silently runs gthread)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="add a per-request access log (production has none; to see what it costs)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of direct-then-gateway per concurrency-32 cell; req/s is the median "
        "round's (default 3, 1 with --quick; concurrency 1 runs once)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir and logs")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)  # internal: the client process
    args = parser.parse_args(argv)
    if args.loadgen:
        print(json.dumps(run_load(json.loads(args.loadgen))))
        return
    args.worker_class = WORKER_CLASSES[args.worker_class]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.threads is None:
        args.threads = 64 if args.worker_class == "gthread" else 1000
    m = machine()
    print(
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}; "
        "running (progress on stderr)...",
        file=sys.stderr,
        flush=True,
    )
    t0, busy0, ours0 = time.monotonic(), _machine_busy_s(), _own_cpu_s()
    result = {"machine": m, **run(args)}
    wall = time.monotonic() - t0
    other = (_machine_busy_s() - busy0) - (_own_cpu_s() - ours0)
    result["other_cpu_cores"] = round(max(0.0, other) / wall, 2)
    result["elapsed_s"] = round(wall, 1)
    print_report(render(result), result, args.json)


if __name__ == "__main__":
    main()
