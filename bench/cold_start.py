"""What a cold start costs beyond the engine's own boot: a gateway request for a model on
STANDBY, until the first byte of its answer, minus the engine's own spawn -> ready.

    python -m bench.cold_start [--quick] [--runs N] [--startup-delay S] [--json out.json]

Sets up everything on 127.0.0.1 by itself (as ``bench.lifecycle`` does): a throw-away
redis-server, the API under gunicorn as production starts it, one ``sagellm worker``
with mock GPUs; the engine is the stand-in ``vllm`` (``tests/fakes/vllm``), ready
``--startup-delay`` seconds after it starts. Round by round, alternating:

1. **engine's own spawn -> ready** (the baseline): the stand-in started directly,
   polled every 2 ms until ``/health`` and ``/v1/models`` answer;
2. **cold request -> first byte**: a streamed ``POST /v1/chat/completions`` through the
   gateway for the STANDBY model: the wake (placement + reservation), the worker's
   spawn and readiness watch, the gateway's wait, the forward, the first chunk;
3. the engine goes back to STANDBY by itself (``idle_timeout_s`` 0.5 s, idle checks
   every 0.1 s), which ends the round.

Cold-start overhead = (2) - median of (1); also paired round by round. A warm request
(the engine RUNNING) is measured too: the part of (2) that is the request itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.lifecycle import MODEL, SERVED, TOKEN, engine_env, engine_own_ready, percentile
from bench.stack import HOST, local_stack, progress, wait_until

TARGET_OVERHEAD_P50_MS = 100.0  # issue 15
IDLE_TIMEOUT_S = 0.5


def first_byte(client: Any, api: str) -> float:
    """Seconds from sending a streamed chat request until its first body byte."""
    body = {
        "model": SERVED,
        "stream": True,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }
    began = time.monotonic()
    with client.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=120) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"chat answered {resp.status_code}: {resp.read()[:300]!r}")
        took = None
        for chunk in resp.iter_raw():  # read to its end; time the first bytes
            if chunk and took is None:
                took = time.monotonic() - began
        if took is None:
            raise RuntimeError("the answer had no body")
    return took


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from app.core.models import EngineState
    from app.dev.redis_server import free_port
    from app.state.client import connect
    from app.state.registry import Registry

    with local_stack("sagellm-bench-cold-", args.keep_logs) as stack:
        env = engine_env(stack, args.startup_delay)
        env["SAGELLM_IDLE_CHECK_S"] = "0.1"
        api = stack.start_cluster(env).url
        registry = Registry(connect(stack.redis_url))
        client = httpx.Client(
            timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False
        )
        spec = {
            "model": MODEL,
            "served_model_name": SERVED,
            "on_demand": True,
            "idle_timeout_s": IDLE_TIMEOUT_S,
        }
        resp = client.post(f"{api}/v1/management/engines", json=spec)
        if resp.status_code != 202:
            raise RuntimeError(f"register answered {resp.status_code}: {resp.text[:300]}")
        eid = resp.json()["engine"]["id"]

        def on_standby() -> bool:
            return registry.get(eid).state is EngineState.STANDBY

        own: list[float] = []
        cold: list[float] = []
        warm: list[float] = []
        direct_port = free_port(HOST)
        progress("warm-up cold start")
        first_byte(client, api)
        wait_until(on_standby, 30, "the idle stop", 0.02)
        for i in range(args.runs):
            own.append(engine_own_ready(env, direct_port))
            cold.append(first_byte(client, api))
            warm.append(first_byte(client, api))
            wait_until(on_standby, 30, "the idle stop", 0.02)
            progress(
                f"round {i + 1}/{args.runs}: own {own[-1]:.3f}s, cold {cold[-1]:.3f}s, "
                f"warm {warm[-1] * 1000:.1f}ms"
            )
        baseline = statistics.median(own)
        return {
            "rows": {
                "own": ("engine's own spawn -> ready", own),
                "cold": ("cold request -> first byte (STANDBY model)", cold),
                "warm": ("warm request -> first byte (RUNNING)", warm),
                "overhead": (
                    "cold-start overhead (cold - own median)",
                    [c - baseline for c in cold],
                ),
                "paired": (
                    "cold-start overhead, paired (cold - own, same round)",
                    [c - o for c, o in zip(cold, own, strict=True)],
                ),
            },
            "startup_delay_s": args.startup_delay,
            "runs": args.runs,
        }


def render(result: dict[str, Any]) -> str:
    out = [
        f"stand-in engine ready {result['startup_delay_s']:g} s after it starts; "
        f"{result['runs']} rounds",
        "",
        "| measured | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for what, samples in result["rows"].values():
        s = sorted(samples)
        out.append(
            f"| {what} | {len(s)} | {percentile(s, 0.5) * 1000:.1f} | "
            f"{percentile(s, 0.99) * 1000:.1f} | {s[-1] * 1000:.1f} |"
        )
    o50 = percentile(sorted(result["rows"]["overhead"][1]), 0.5) * 1000
    met = "MET" if o50 <= TARGET_OVERHEAD_P50_MS else "MISSED"
    out += ["", f"cold-start overhead p50 <= {TARGET_OVERHEAD_P50_MS:g} ms: {met} ({o50:.1f} ms)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help="rounds (default 15; 3 quick)")
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=0.66,
        help="seconds the stand-in engine takes to be ready (default 0.66)",
    )
    parser.add_argument("--json", type=Path, help="also write the samples here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 15
    result = run(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
