"""What open dashboards cost the API: 200 engines, 5 dashboards polling as the pages do.

Sets up by itself, in a temp dir it removes afterwards (``--keep-logs`` keeps it):

1. a throw-away ``redis-server``;
2. the cluster of ``bench.lifecycle.synthetic_cluster``: 8 hosts x 8 GPUs (80 GB) and
   200 RUNNING engines with their reservations, written through ``app.state``;
3. the API as production serves it (``app.dev.stack.gunicorn_argv``: 2 gevent workers,
   ``PROMETHEUS_MULTIPROC_DIR`` set, an admin token);
4. in this process, the writes a live cluster makes meanwhile: a health check of every
   engine every 10 s (its record's ``last_health_at``: 20 writes/s), each host's
   heartbeat every 5 s, and one engine's state flipped RUNNING <-> UNHEALTHY every 5 s
   (a change the engines table and the cluster page must show).

Then, for ``--seconds`` each, scenarios in one run: **idle** (no dashboard: the
baseline), and 5 simulated dashboards, each polling the fragments of its page at the
page's intervals (``app.ui.freshness.POLL_S``), each with its own keep-alive
connection, the admin token and the ETag of what it shows (as ``ui.js`` does):

* ``engines``: 5 dashboards on the engines page (the 200-row table every 2 s);
* ``cluster``: 5 on the cluster page (64 GPU bars every 3 s);
* ``mixed``: 2 engines pages, 2 cluster pages, 1 gateway page;
* ``engines, no ETag``: the engines page polled without If-None-Match: what a poller
  that re-downloads every time would cost.

Reported: per scenario, the API's CPU (gunicorn master + workers, from psutil, in % of
one core) and that minus the idle baseline; per fragment, the answer time seen by the
dashboard (200s and 304s apart) and the server's render time (``Server-Timing``).

Run: ``.venv/bin/python -m bench.dashboard`` (about 3 min; ``--quick``: 10 s each).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field

from bench.lifecycle import (
    STATUS_ENGINES,
    STATUS_GPUS,
    STATUS_HOSTS,
    percentile,
    synthetic_cluster,
)
from bench.stack import cpu_model, local_stack, progress, wait_http

TOKEN = "bench-dashboard-token"
DASHBOARDS = 5
FRAGMENTS = {
    "engines": "/ui/data/engines",
    "cluster": "/ui/data/cluster",
    "gateway": "/ui/data/gateway",
}
# Which fragments each page polls (its shell's containers).
PAGES = {"engines": ("engines",), "cluster": ("cluster",), "gateway": ("gateway",)}
HEALTH_EVERY_S = 10.0  # SAGELLM_HEALTH_INTERVAL_S's default
HEARTBEAT_EVERY_S = 5.0  # SAGELLM_HEARTBEAT_INTERVAL_S's default
FLIP_EVERY_S = 5.0


@dataclass
class Poll:
    fragment: str
    status: int
    took_s: float
    render_ms: float | None  # Server-Timing; None for a 304 (nothing rendered)
    rendered: bool = False  # rendered for this poll, not taken from the shared renders


@dataclass
class Scenario:
    name: str
    pages: list[str]  # one page per dashboard
    etags: bool = True
    polls: list[Poll] = field(default_factory=list)
    cpu_pct: float = 0.0


_RENDER = re.compile(r"render;dur=([0-9.]+);desc=(\w+)")


# ----------------------------------------------------------------------- the cluster


class Churn:
    """The writes a live 200-engine cluster makes while dashboards watch it."""

    def __init__(self, redis_url: str) -> None:
        from app.state.client import connect
        from app.state.registry import Registry

        self.registry = Registry(connect(redis_url))
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        from app.core.models import EngineState

        ids = sorted(d.id for d in self.registry.snapshot().engines)
        per_check = HEALTH_EVERY_S / len(ids)
        next_beat = next_flip = time.monotonic()
        flipped: str | None = None
        i = 0
        while not self.stop.is_set():
            now = time.monotonic()
            eid = ids[i % len(ids)]
            i += 1
            self.registry.update(eid, lambda r: setattr(r, "last_health_at", time.time()))
            self.writes += 1
            if now >= next_beat:
                next_beat = now + HEARTBEAT_EVERY_S
                for h in self.registry.hosts():
                    h.heartbeat_at = time.time()
                    self.registry.put_host(h, ttl_s=3600)
            if now >= next_flip:
                next_flip = now + FLIP_EVERY_S
                if flipped is None:
                    flipped = random.choice(ids)
                    self.registry.transition(flipped, EngineState.UNHEALTHY)
                else:
                    self.registry.transition(flipped, EngineState.RUNNING)
                    flipped = None
            self.stop.wait(per_check)


# ----------------------------------------------------------------------- dashboards


def dashboard(
    api: str, page: str, etags: bool, until: float, out: list[Poll], lock: threading.Lock
) -> None:
    """One open page: polls its fragments at their intervals, keeps their ETags."""
    import httpx

    from app.ui.freshness import POLL_S

    shown: dict[str, str] = {}
    due = {f: time.monotonic() + random.uniform(0, POLL_S[f]) for f in PAGES[page]}
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, trust_env=False
    ) as client:
        while True:
            fragment = min(due, key=due.__getitem__)
            wait = due[fragment] - time.monotonic()
            if due[fragment] >= until:
                return
            if wait > 0:
                time.sleep(wait)
            headers = {"If-None-Match": shown[fragment]} if etags and fragment in shown else {}
            began = time.perf_counter()
            resp = client.get(FRAGMENTS[fragment], headers=headers)
            took = time.perf_counter() - began
            if resp.status_code not in (200, 304):
                raise RuntimeError(f"{fragment}: {resp.status_code} {resp.text[:300]}")
            if resp.status_code == 200 and resp.headers.get("ETag"):
                shown[fragment] = resp.headers["ETag"]
            timing = _RENDER.search(resp.headers.get("Server-Timing", ""))
            render = float(timing.group(1)) if timing and resp.status_code == 200 else None
            rendered = bool(timing and timing.group(2) == "new")
            with lock:
                out.append(Poll(fragment, resp.status_code, took, render, rendered))
            due[fragment] += POLL_S[fragment]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its children."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_scenario(api: str, server_pid: int, scenario: Scenario, seconds: float) -> None:
    lock = threading.Lock()
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=dashboard, args=(api, page, scenario.etags, until, scenario.polls, lock)
        )
        for page in scenario.pages
    ]
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    for t in threads:
        t.start()
    time.sleep(max(0.0, until - time.monotonic()))
    cpu1, t1 = cpu_seconds(server_pid), time.monotonic()
    for t in threads:
        t.join(30)
    scenario.cpu_pct = (cpu1 - cpu0) / (t1 - t0) * 100


# ----------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> list[Scenario]:
    """The stack (Redis with the synthetic cluster, the API), the churn, the scenarios."""
    with local_stack("sagellm-bench-dashboard-", args.keep_logs) as stack:
        synthetic_cluster(stack.redis_url)
        server = stack.start_api(
            stack.env("bench-api", SAGELLM_ADMIN_TOKEN=TOKEN), workers=args.workers
        )
        api = server.url
        wait_http(f"{api}/health", 60, server.proc)
        churn = Churn(stack.redis_url)
        writer = threading.Thread(target=churn.run, daemon=True)
        writer.start()
        try:
            return _run_scenarios(args, api, server.proc.pid)
        finally:
            churn.stop.set()
            writer.join(10)


def _run_scenarios(args: argparse.Namespace, api: str, server_pid: int) -> list[Scenario]:
    """Every scenario in turn against the running API (``server_pid``: its CPU)."""
    import httpx

    # Warm-up: every fragment once from each worker process (imports, templates).
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for _ in range(4 * args.workers):
            for path in FRAGMENTS.values():
                assert c.get(path).status_code == 200, path
    scenarios = [
        Scenario("idle (baseline)", []),
        Scenario("engines", ["engines"] * DASHBOARDS),
        Scenario("cluster", ["cluster"] * DASHBOARDS),
        Scenario("mixed", ["engines", "engines", "cluster", "cluster", "gateway"]),
        Scenario("engines, no ETag", ["engines"] * DASHBOARDS, etags=False),
    ]
    for s in scenarios:
        progress(f"{s.name}: {args.seconds:g} s ...")
        run_scenario(api, server_pid, s, args.seconds)
    return scenarios


# ----------------------------------------------------------------------- report


def render(scenarios: list[Scenario], seconds: float, workers: int) -> str:
    from app.ui.freshness import POLL_S

    baseline = scenarios[0].cpu_pct
    model = cpu_model(platform.processor() or platform.machine())
    out = [
        f"machine: {os.cpu_count()} CPUs ({model}), no GPU, Python {platform.python_version()}",
        f"cluster: {STATUS_ENGINES} engines on {STATUS_HOSTS} hosts x {STATUS_GPUS} GPUs; "
        f"meanwhile {STATUS_ENGINES / HEALTH_EVERY_S:g} health-check writes/s, heartbeats "
        f"every {HEARTBEAT_EVERY_S:g} s, a state change every {FLIP_EVERY_S:g} s",
        f"API: gunicorn, {workers} gevent workers; {seconds:g} s per scenario; polls every "
        + ", ".join(f"{k} {POLL_S[k]:g} s" for k in ("engines", "cluster", "gateway")),
        "",
        "| scenario | dashboards | polls | 304 (%) | API CPU (% of one core) | "
        "from the dashboards |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        n = len(s.polls)
        not_modified = sum(1 for p in s.polls if p.status == 304)
        share = f"{100 * not_modified / n:.0f}" if n else "-"
        extra = "-" if not s.pages else f"{s.cpu_pct - baseline:+.1f}"
        out.append(f"| {s.name} | {len(s.pages)} | {n} | {share} | {s.cpu_pct:.1f} | {extra} |")
    out += [
        "",
        "Per fragment, over all scenarios with dashboards: answer times as the dashboard "
        "saw them; renders: the 200s rendered for that poll (the others came from the "
        "renders shared by all dashboards), timed by the server (Server-Timing):",
        "",
        "| fragment | answer | n | median ms | p99 ms | rendered | render median ms | "
        "render p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fragment in FRAGMENTS:
        for status in (200, 304):
            polls = [
                p
                for s in scenarios
                for p in s.polls
                if p.fragment == fragment and p.status == status
            ]
            if not polls:
                continue
            took = [p.took_s * 1000 for p in polls]
            renders = [p.render_ms for p in polls if p.rendered and p.render_ms is not None]
            r50 = f"{statistics.median(renders):.2f}" if renders else "-"
            r99 = f"{percentile(sorted(renders), 0.99):.2f}" if renders else "-"
            out.append(
                f"| {fragment} | {status} | {len(polls)} | {statistics.median(took):.2f} | "
                f"{percentile(sorted(took), 0.99):.2f} | "
                f"{len(renders) if status == 200 else '-'} | {r50} | {r99} |"
            )
    worst = max((s.cpu_pct - baseline for s in scenarios if s.pages and s.etags), default=0.0)
    verdict = "MET" if worst < 5.0 else "MISSED"
    out += [
        "",
        f"target: 5 dashboards cost the API < 5% of one core: {verdict} "
        f"(worst {worst:+.1f}% above idle, with ETags as the pages send them)",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="per scenario (default 30)")
    parser.add_argument("--quick", action="store_true", help="10 s per scenario")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir and logs")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (10.0 if args.quick else 30.0)
    began = time.monotonic()
    scenarios = run(args)
    print(render(scenarios, args.seconds, args.workers))
    print(f"\n(total {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
