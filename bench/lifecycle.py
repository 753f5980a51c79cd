"""How fast the lifecycle reacts: start overhead, crash detection, crash recovery, and
``/status`` with 200 engines, in one run.

    python -m bench.lifecycle [--quick] [--runs N] [--startup-delay S] [--json out.json]

Sets up everything on 127.0.0.1 by itself: a throw-away redis-server, the API under
gunicorn as production starts it (``app.dev.stack.gunicorn_argv``), one ``sagellm
worker`` with mock GPUs (2 x 80 GB) and one ``sagellm beat``. Engines are the stand-in
``vllm`` (``tests/fakes/vllm``), ready ``--startup-delay`` seconds after it starts.

1. **engine's own spawn -> ready** (the baseline): the stand-in started directly and
   polled every 2 ms (a bare TCP connect until it listens: light on a 2-core machine)
   until ``/health`` and ``/v1/models`` answer.
2. **start**: ``POST /v1/management/engines?wait=true`` until its answer (RUNNING),
   alternating with (1), round by round; the engine is stopped between rounds.
   Start overhead = start - the engine's own spawn -> ready (median of (1)).
3. **crash detection / recovery**: kill -9 of a RUNNING engine's process, until its
   record leaves RUNNING, and until it is RUNNING again (a new process). Detection and
   recovery are read from the record's changes as Redis announces them.
4. **/status**: ``GET /v1/management/status`` (and ``/engines``, ``/gpus``,
   ``/backends``) with the bench host only, then with 200 RUNNING engine records on
   8 synthetic hosts x 8 GPUs (host heartbeats, capacity and records with their
   reservations written through ``app.state``), and ``/status`` again with one record
   written before each GET (as health checks write them in a live cluster: the API
   reads the records written since its last read); ``GET /health`` is the floor.

See bench/README.md for the columns and the caveats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import HOST, REPO, LocalStack, local_stack, print_report, progress

FAKES = REPO / "tests" / "fakes"
MODEL = str(REPO / "tests" / "fixtures" / "models" / "Qwen2.5-1.5B-Instruct")
SERVED = "bench-qwen"
TOKEN = "bench-admin-token"
BENCH_HOST = "bench-a"
PORTS = (18400, 18449)
# Targets from issue 13.
TARGET_OVERHEAD_P50_MS = 50.0
TARGET_OVERHEAD_P99_MS = 150.0
TARGET_DETECT_S = 1.0
TARGET_RECOVERY_EXTRA_S = 0.5  # over the engine's own boot + the first backoff
TARGET_STATUS_P50_MS = 5.0
STATUS_HOSTS, STATUS_GPUS, STATUS_ENGINES = 8, 8, 200


@dataclass
class Row:
    what: str
    samples: list[float] = field(default_factory=list)  # seconds
    note: str = ""

    def pct(self, q: float) -> float:
        return percentile(sorted(self.samples), q)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values``, interpolated linearly; NaN for none."""
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ----------------------------------------------------------------------- processes


def engine_env(stack: LocalStack, startup_delay: float) -> dict[str, str]:
    """The environment of the bench host's worker and the API: mock GPUs, the stand-in
    ``vllm`` first on PATH, ready ``startup_delay`` seconds after it starts."""
    bindir = Path(sys.executable).parent
    return stack.env(
        BENCH_HOST,
        SAGELLM_HOST_ADDRESS=HOST,
        SAGELLM_MOCK_GPUS="2x80",
        SAGELLM_PORT_RANGE=f"{PORTS[0]}-{PORTS[1]}",
        SAGELLM_MODEL_ROOTS=str(REPO / "tests" / "fixtures" / "models"),
        SAGELLM_ADMIN_TOKEN=TOKEN,
        # Every kill restarts after the first backoff: the budget is back after 1 s of
        # running, and there are as many restarts as the runs need.
        SAGELLM_RESTART_RESET_AFTER_S="1",
        SAGELLM_MAX_RESTARTS="1000",
        PATH=f"{FAKES}{os.pathsep}{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        FAKE_VLLM_STARTUP_DELAY=f"{startup_delay:g}",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


# ----------------------------------------------------------------------- measurements


def _listening(port: int) -> bool:
    """A bare TCP connect: a poll that costs the booting engine (sharing 2 cores)
    next to nothing, unlike an HTTP client's request."""
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def engine_own_ready(env: dict[str, str], port: int) -> float:
    """Spawn the stand-in directly (as the worker would: its own session, its argv);
    seconds until /health and /v1/models answer, polled every 2 ms (a TCP connect
    until it listens, then HTTP)."""
    import httpx

    argv = ["vllm", "serve", MODEL, "--host", HOST, "--port", str(port)]
    argv += ["--served-model-name", SERVED]
    e = {k: v for k, v in env.items() if not k.startswith("SAGELLM_")}
    e["SAGELLM_ENGINE_ID"] = "bench-direct"  # engines carry it; the stand-in reads none
    began = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=e,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with httpx.Client(timeout=1, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the stand-in exited with {proc.returncode}")
                try:
                    if not _listening(port):
                        time.sleep(0.002)
                        continue
                    if client.get(f"http://{HOST}:{port}/health").status_code == 200:
                        models = client.get(f"http://{HOST}:{port}/v1/models").json()
                        if any(m.get("id") == SERVED for m in models.get("data", [])):
                            return time.monotonic() - began
                except httpx.HTTPError:
                    pass
                time.sleep(0.002)
    finally:
        proc.terminate()
        proc.wait(10)


def _engines_url(api: str) -> str:
    return f"{api}/v1/management/engines"


def managed_start(client: Any, api: str) -> tuple[float, str]:
    """POST ?wait=true; (seconds until the answer, engine id). Raises unless RUNNING."""
    body = {"model": MODEL, "served_model_name": SERVED}
    began = time.monotonic()
    resp = client.post(_engines_url(api), params={"wait": "true", "timeout": 60}, json=body)
    took = time.monotonic() - began
    if resp.status_code != 200:
        raise RuntimeError(f"start answered {resp.status_code}: {resp.text[:500]}")
    return took, str(resp.json()["engine"]["id"])


def stop_engine(client: Any, api: str, registry: Any, engine_id: str) -> None:
    from app.core.models import EngineState

    resp = client.delete(f"{_engines_url(api)}/{engine_id}", params={"drain": "false"})
    if resp.status_code >= 300:
        raise RuntimeError(f"stop answered {resp.status_code}: {resp.text[:300]}")
    registry.wait(engine_id, lambda r: r.state is EngineState.STOPPED, 30)


def kill_and_watch(registry: Any, engine_id: str) -> tuple[float, float]:
    """kill -9 of a RUNNING engine: (seconds until its record leaves RUNNING, seconds
    until it is RUNNING again as a new process)."""
    import signal

    from app.core.models import EngineState

    running = EngineState.RUNNING
    rec = registry.get(engine_id)
    assert rec.state is running and rec.pid is not None
    pid = rec.pid
    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    seen = registry.wait(engine_id, lambda r: r.state is not running or r.pid != pid, 30)
    detected = time.monotonic() - began
    if seen.state is running and seen.pid == pid:
        raise RuntimeError(f"kill -9 of {engine_id} not seen within 30 s")
    back = registry.wait(engine_id, lambda r: r.state is running and r.pid != pid, 60)
    recovered = time.monotonic() - began
    if back.state is not running:
        raise RuntimeError(f"{engine_id} not RUNNING again: {back.state.value} {back.last_error}")
    return detected, recovered


def synthetic_cluster(redis_url: str) -> None:
    """8 hosts x 8 GPUs (80 GB) and 200 RUNNING engines with their reservations,
    written as workers and the API would write them."""
    from app.core.gpus import GpuCapacity, GpuInfo
    from app.core.models import EngineRecord, EngineState, GpuAssignment, HostRecord
    from app.core.spec import EngineSpec
    from app.state.client import connect
    from app.state.ledger import Ledger, ReserveRequest
    from app.state.registry import Registry

    client = connect(redis_url)
    registry, ledger = Registry(client), Ledger(client)
    total = 80 * 1024
    gpus: dict[str, list[GpuInfo]] = {}
    for h in range(STATUS_HOSTS):
        name = f"syn-{h}"
        gpus[name] = [
            GpuInfo(index=i, uuid=f"GPU-syn-{h}-{i}", name="mock", total_mib=total, free_mib=total)
            for i in range(STATUS_GPUS)
        ]
        ledger.publish_capacity(
            name, [GpuCapacity(name, g.index, g.uuid, g.total_mib, 0) for g in gpus[name]]
        )
        registry.put_host(
            HostRecord(name=name, address=HOST, port_range=(20000, 20999), gpus=gpus[name]),
            ttl_s=3600,
        )
    for n in range(STATUS_ENGINES):
        name = f"syn-{n % STATUS_HOSTS}"
        gpu = gpus[name][(n // STATUS_HOSTS) % STATUS_GPUS]
        mib = 16 * 1024
        rec = EngineRecord(
            id=f"eng-syn-{n:04d}",
            spec=EngineSpec(model=f"org/model-{n % 7}", served_model_name=f"syn-{n}"),
            state=EngineState.RUNNING,
            host=name,
            address=HOST,
            port=20000 + n,
            gpus=[GpuAssignment(gpu.index, gpu.uuid, mib)],
            memory_per_gpu_mib=mib,
            pid=100000 + n,
            last_health_at=time.time(),
            running_since=time.time(),
        )
        registry.create(
            rec,
            reserve=ReserveRequest(
                name, ((gpu.uuid, mib),), port_range=(20000, 20999), margin_mib=0, port=rec.port
            ),
        )


def health_writer(registry: Any) -> Callable[[], None]:
    """Writes the synthetic engines' records in turn, as their health checks would."""
    turn = iter(range(10**9))

    def write() -> None:
        eid = f"eng-syn-{next(turn) % STATUS_ENGINES:04d}"
        registry.update(eid, lambda r: setattr(r, "last_health_at", time.time()))

    return write


def time_gets(
    client: Any, url: str, n: int, warmup: int, before: Callable[[], Any] | None = None
) -> list[float]:
    """Seconds each GET took; ``before`` runs (untimed) before each."""
    out = []
    for i in range(warmup + n):
        if before is not None:
            before()
        began = time.perf_counter()
        resp = client.get(url)
        took = time.perf_counter() - began
        if resp.status_code != 200:
            raise RuntimeError(f"GET {url} answered {resp.status_code}: {resp.text[:300]}")
        if i >= warmup:
            out.append(took)
    return out


# ----------------------------------------------------------------------- the run


def wait_mechanism() -> str:
    """How the API's ?wait=true learns of the state change, in this checkout."""
    from app.state.registry import Registry

    if hasattr(Registry, "wait"):
        return "Redis pub/sub (Registry.wait)"
    return "polls Redis every 0.2 s"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from app.dev.redis_server import free_port
    from app.settings import Settings
    from app.state.client import connect
    from app.state.registry import Registry

    rows: dict[str, Row] = {}
    with local_stack("sagellm-bench-lifecycle-", args.keep_logs) as stack:
        env = engine_env(stack, args.startup_delay)
        api = stack.start_cluster(env, beat=True).url
        registry = Registry(connect(stack.redis_url))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        client = httpx.Client(timeout=90, headers=headers, trust_env=False)

        settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("SAGELLM_")})

        # 1 + 2: the engine's own spawn -> ready, and a managed start, alternating.
        own, start = Row("engine's own spawn -> ready"), Row("POST ?wait=true -> RUNNING")
        direct_port = free_port(HOST)
        progress("warm-up start")
        _, eid = managed_start(client, api)  # imports, connections, model facts: warm
        stop_engine(client, api, registry, eid)
        for i in range(args.runs):
            own.samples.append(engine_own_ready(env, direct_port))
            took, eid = managed_start(client, api)
            start.samples.append(took)
            stop_engine(client, api, registry, eid)
            progress(f"start {i + 1}/{args.runs}: own {own.samples[-1]:.3f}s, managed {took:.3f}s")
        baseline = statistics.median(own.samples)
        overhead = Row(
            "start overhead (start - own median)",
            [s - baseline for s in start.samples],
        )
        paired = Row(
            "start overhead, paired (start - own, same round)",
            [m - o for m, o in zip(start.samples, own.samples, strict=True)],
        )
        rows.update(own=own, start=start, overhead=overhead, paired=paired)

        # 3: kill -9, detection and recovery.
        detect, recover = Row("kill -9 -> record leaves RUNNING"), Row("kill -9 -> RUNNING again")
        _, eid = managed_start(client, api)
        for i in range(args.kills):
            time.sleep(settings.restart_reset_after_s + 0.1)  # the first backoff applies
            d, r = kill_and_watch(registry, eid)
            detect.samples.append(d)
            recover.samples.append(r)
            progress(f"kill {i + 1}/{args.kills}: detected {d:.3f}s, running again {r:.3f}s")
        stop_engine(client, api, registry, eid)
        rows.update(detect=detect, recover=recover)

        # 4: /status and friends, small and with 200 engines.
        mgmt = f"{api}/v1/management"
        n, warm = args.gets, max(10, args.gets // 10)
        rows["floor"] = Row("GET /health (floor)", time_gets(client, f"{api}/health", n, warm))
        rows["status_small"] = Row(
            "GET /status, 1 host, 0 engines", time_gets(client, f"{mgmt}/status", n, warm)
        )
        synthetic_cluster(stack.redis_url)
        what = f"{STATUS_ENGINES} engines, {STATUS_HOSTS} hosts x {STATUS_GPUS} GPUs"
        for path in ("status", "engines", "gpus", "backends"):
            rows[f"{path}_200"] = Row(
                f"GET /{path}, {what}", time_gets(client, f"{mgmt}/{path}", n, warm)
            )
        # As in a live cluster, where health checks write records all the time: one
        # record written (as a passing health check writes it) before each GET.
        rows["status_200_written"] = Row(
            f"GET /status, {what}, a record written before each",
            time_gets(client, f"{mgmt}/status", n, warm, before=health_writer(registry)),
        )
        return {
            "rows": {k: {"what": r.what, "samples": r.samples} for k, r in rows.items()},
            "baseline_s": baseline,
            "backoff_s": settings.restart_backoff_s,
            "wait": wait_mechanism(),
            "startup_delay_s": args.startup_delay,
            "runs": args.runs,
            "kills": args.kills,
            "gets": n,
        }


# ----------------------------------------------------------------------- report


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]

    def line(key: str) -> str:
        s = sorted(rows[key]["samples"])
        return (
            f"| {rows[key]['what']} | {len(s)} | {percentile(s, 0.5) * 1000:.1f} | "
            f"{percentile(s, 0.99) * 1000:.1f} | {s[-1] * 1000:.1f} |"
        )

    out = [
        f"stand-in engine ready {result['startup_delay_s']:g} s after it starts; "
        f"API wait: {result['wait']}; first restart backoff {result['backoff_s']:g} s",
        "",
        "| measured | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    out += [line(k) for k in rows]
    out += ["", *verdict(result)]
    return "\n".join(out)


def verdict(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]

    def pct(key: str, q: float) -> float:
        return percentile(sorted(rows[key]["samples"]), q)

    def met(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    o50, o99 = pct("overhead", 0.5) * 1000, pct("overhead", 0.99) * 1000
    d_max = max(rows["detect"]["samples"])
    r_limit = result["baseline_s"] + result["backoff_s"] + TARGET_RECOVERY_EXTRA_S
    r_max = max(rows["recover"]["samples"])
    s50 = pct("status_200", 0.5) * 1000
    return [
        f"start overhead p50 <= {TARGET_OVERHEAD_P50_MS:g} ms, p99 <= "
        f"{TARGET_OVERHEAD_P99_MS:g} ms: "
        f"{met(o50 <= TARGET_OVERHEAD_P50_MS and o99 <= TARGET_OVERHEAD_P99_MS)} "
        f"(p50 {o50:.1f} ms, p99 {o99:.1f} ms)",
        f"crash detection <= {TARGET_DETECT_S:g} s every time: "
        f"{met(d_max <= TARGET_DETECT_S)} (max {d_max * 1000:.0f} ms)",
        f"crash recovery <= own boot {result['baseline_s']:.2f} s + first backoff "
        f"{result['backoff_s']:g} s + {TARGET_RECOVERY_EXTRA_S:g} s = {r_limit:.2f} s every "
        f"time: {met(r_max <= r_limit)} (max {r_max:.2f} s)",
        f"/status p50 <= {TARGET_STATUS_P50_MS:g} ms with {STATUS_ENGINES} engines: "
        f"{met(s50 <= TARGET_STATUS_P50_MS)} (p50 {s50:.1f} ms)",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help="starts (default 20; 5 quick)")
    parser.add_argument("--kills", type=int, default=None, help="kill -9s (default 10; 3 quick)")
    parser.add_argument("--gets", type=int, default=None, help="GETs per endpoint (default 200)")
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=0.66,
        help="seconds the stand-in engine takes to be ready (default 0.66, as in the issue)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir and logs")
    args = parser.parse_args(argv)
    args.runs = args.runs or (5 if args.quick else 20)
    args.kills = args.kills or (3 if args.quick else 10)
    args.gets = args.gets or (50 if args.quick else 200)
    print(f"machine: {os.cpu_count()} CPUs; running (progress on stderr)...", file=sys.stderr)
    began = time.monotonic()
    result = run(args)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    print_report(render(result), result, args.json)


if __name__ == "__main__":
    main()
