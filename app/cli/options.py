"""Small pieces of the engine commands: option parsers and table cells."""

from __future__ import annotations

from typing import Any

import click


def parse_gpu_ids(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected GPU indices like 0,1") from None


def parse_env(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    env: dict[str, str] = {}
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE")
        env[key] = val
    return env


def idle_cell(e: dict[str, Any], now: float) -> str | None:
    """When an engine stops for idleness: ``in 42s``; ``on demand`` on STANDBY."""
    if e["state"] == "STANDBY":
        return "on demand"
    stops_at = e.get("idle_stops_at")
    if e["state"] == "RUNNING" and stops_at:
        return f"in {max(0.0, stops_at - now):.0f}s"
    return None
