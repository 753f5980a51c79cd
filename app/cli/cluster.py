"""``sagellm status``, ``gpu``, ``backends`` and ``host ...``: what the cluster has."""

from __future__ import annotations

from typing import Any

import click

from app.cli.client import connect
from app.cli.render import EXTERNAL_HOST, emit_data, gb, output_option, print_table
from app.core.models import TERMINAL_STATES


def _gpu_rows(gpus: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            g["host"] + ("" if g.get("host_up", True) else " (down)"),
            g["index"],
            g.get("name"),
            gb(g.get("total_gb")),
            gb(g.get("outside_gb")),
            gb(g.get("reserved_gb")),
            gb(g.get("available_gb")),
        )
        for g in gpus
    ]


_ENDED = {s.value for s in TERMINAL_STATES}
GPU_HEADER = ("HOST", "IDX", "NAME", "TOTAL", "OUTSIDE", "RESERVED", "AVAILABLE")


@click.command()
@output_option
def status(output: str) -> None:
    """Hosts (up, heartbeat age), GPUs and engine counts."""
    st = connect().get("/v1/management/status")
    if output != "text":
        emit_data(st, output)
        return
    live: dict[str, int] = {}
    for e in st["engines"]:
        if e.get("host") and e["state"] not in _ENDED:
            live[e["host"]] = live.get(e["host"], 0) + 1
    if st["hosts"]:
        print_table(
            ("NAME", "ADDRESS", "UP", "HEARTBEAT AGE", "GPUS", "ENGINES"),
            (
                (
                    h["name"],
                    h.get("address"),
                    h["up"],
                    f"{h.get('heartbeat_age_s', 0.0):.1f}s",
                    h.get("gpu_count", 0),
                    live.get(h["name"], 0),
                )
                for h in st["hosts"]
            ),
            title="HOSTS",
        )
    else:
        click.echo("HOSTS")
        click.echo("none: start a worker on each GPU host (`sagellm worker`)")
    click.echo()
    if st["gpus"]:
        print_table(GPU_HEADER, _gpu_rows(st["gpus"]), title="GPUS")
    else:
        click.echo("GPUS\nnone")
    counts = st.get("counts") or {}
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    click.echo(f"\nENGINES: {summary or 'none'}")


@click.command()
@output_option
def gpu(output: str) -> None:
    """Every GPU: total, held by outside processes, reserved by sagellm, available."""
    api = connect()
    gpus = api.get("/v1/management/gpus")
    if output != "text":
        emit_data(gpus, output)
    elif gpus:
        print_table(GPU_HEADER, _gpu_rows(gpus))
    else:
        click.echo(no_gpus_message(api.get("/v1/management/hosts")))


def no_gpus_message(hosts: list[dict[str, Any]]) -> str:
    """Why no GPU is listed: no worker alive, or workers alive that have none."""
    up = sorted(h["name"] for h in hosts if h.get("up"))
    if not up:
        down = sorted(h["name"] for h in hosts)
        known = f" (known but down: {', '.join(down)})" if down else ""
        return (
            f"no GPUs known: no worker is alive{known}; start one on each GPU host "
            "(`sagellm worker`, or `sagellm up` on one machine)"
        )
    return (
        f"no GPUs: {len(up)} worker(s) alive ({', '.join(up)}) and none has a GPU; "
        "engines there run on CPU (`sagellm engine start MODEL --no-gpu`)"
    )


@click.command()
@output_option
def backends(output: str) -> None:
    """Engines the gateway routes to, LLM and embedding, with in-flight requests."""
    data = connect().get("/v1/management/backends")
    if output != "text":
        emit_data(data, output)
        return
    for title, key in (
        ("LLM BACKENDS", "llm_backends"),
        ("EMBEDDING BACKENDS", "embedding_backends"),
    ):
        rows = data.get(key) or []
        if not rows:
            click.echo(f"{title}\nnone")
        else:
            print_table(
                ("ENGINE", "MODEL", "SERVED NAME", "HOST", "URL", "HEALTHY", "IN-FLIGHT"),
                (
                    (
                        b["engine_id"],
                        b.get("model"),
                        b.get("served_model_name"),
                        EXTERNAL_HOST if b.get("external") else b.get("host"),
                        b.get("base_url"),
                        b.get("healthy"),
                        b.get("in_flight", 0),
                    )
                    for b in rows
                ),
                title=title,
            )
        if key == "llm_backends":
            click.echo()


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


@click.command()
@output_option
def models(output: str) -> None:
    """Models on each host's disk (measured there), with the memory per GPU each would
    need at the default maximum length."""
    data = connect().get("/v1/management/models")
    if output != "text":
        emit_data(data, output)
        return
    rows = [
        (
            h["host"] + ("" if h.get("up", True) else " (down)"),
            m["model"],
            (m.get("facts") or {}).get("architecture") or "-",
            _params((m.get("facts") or {}).get("param_count")),
            (m.get("facts") or {}).get("dtype") or "-",
            (m.get("facts") or {}).get("max_len") or "-",
            gb((m.get("estimate") or {}).get("per_gpu_gb")) if m.get("estimate") else "-",
        )
        for h in data["hosts"]
        for m in h["models"]
    ]
    if not rows:
        click.echo("no models found on any host's disk (Hugging Face cache or model roots)")
        return
    length = data["default_max_model_len"]
    print_table(
        ("HOST", "MODEL", "ARCH", "PARAMS", "DTYPE", "MAX LEN", f"GPU MEM @{length}"),
        rows,
        state_column=None,
    )


@click.group()
def host() -> None:
    """Hosts of the cluster."""


@host.command("forget")
@click.argument("name")
def host_forget(name: str) -> None:
    """Forget a DOWN host: its engines end FAILED and their reservations are released."""
    data = connect().request("DELETE", f"/v1/management/hosts/{name}")
    ended = data.get("engines") or []
    click.echo(
        f"host {name} forgotten; {len(ended)} engine(s) ended"
        + (f": {', '.join(ended)}" if ended else "")
    )
