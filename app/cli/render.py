"""How the CLI shows things: tables, state colours, times, live progress, JSON.

Two audiences. On a terminal: ``rich`` tables with states in colour, and a live table
that rewrites itself while engines start. Otherwise (a pipe, a file, a test): plain
columns padded with spaces, one line per state change, no escape codes, so ``awk`` and
``grep`` can read them. ``-o json`` (and ``-o yaml``) print the API's data unchanged.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from app.core.models import EngineState

OUTPUT_FORMATS = ("text", "json", "yaml")

# One colour per state; the plain output never shows them.
STATE_STYLES: dict[EngineState, str] = {
    EngineState.PENDING: "yellow",
    EngineState.STARTING: "cyan",
    EngineState.RUNNING: "bold green",
    EngineState.UNHEALTHY: "bold magenta",
    EngineState.DRAINING: "yellow",
    EngineState.STOPPING: "yellow",
    EngineState.STOPPED: "dim",
    EngineState.FAILED: "bold red",
    EngineState.LOST: "red",
    EngineState.STANDBY: "blue",
}

# Record fields that hold a Unix time, by how their names end.
_TIME_SUFFIXES = ("_at", "_since", "_deadline", "_time")


def is_terminal() -> bool:
    """Whether stdout is a terminal: rich output then, plain columns otherwise."""
    return sys.stdout.isatty()


def console() -> Console:
    """A rich console on the current stdout (only used when ``is_terminal()``)."""
    return Console(file=sys.stdout, force_terminal=True, highlight=False)


def output_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output text|json|yaml`` of a list or show command."""
    return click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(OUTPUT_FORMATS),
        default="text",
        show_default=True,
        help="text: for people (plain columns when stdout is not a terminal); "
        "json or yaml: the API's data as it is.",
    )(func)


def emit_data(data: Any, output: str) -> None:
    """``data`` as JSON or YAML on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=False) if output == "json" else to_yaml(data))


def to_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()


# ---------------------------------------------------------------------------- cells


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GB"


def gpu_list(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in indices) or "-"


def age(seconds: float) -> str:
    """A duration as ``kubectl`` shows an age: 45s, 3m20s, 42m, 5h10m, 30h, 2d4h, 12d."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    return f"{d}d"


def when(epoch: float, now: float | None = None) -> str:
    """A Unix time as local time plus how long ago (or from now) it is."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")
    delta = now - epoch
    return f"{stamp} ({age(delta)} ago)" if delta >= 0 else f"{stamp} (in {age(-delta)})"


def readable(record: Any, now: float | None = None) -> Any:
    """``record`` for a reader: empty values (None, "", [], {}) dropped at every level,
    Unix times as local time and age."""
    if isinstance(record, dict):
        out = {}
        for key, value in record.items():
            if _is_time_field(key, value):
                out[key] = when(float(value), now)
                continue
            shown = readable(value, now)
            if shown not in (None, "", [], {}):
                out[key] = shown
        return out
    if isinstance(record, list):
        return [readable(v, now) for v in record]
    return record


def _is_time_field(key: str, value: Any) -> bool:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return numeric and value > 0 and key.endswith(_TIME_SUFFIXES)


# ---------------------------------------------------------------------------- tables


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain-text columns, left-aligned and padded to the widest cell; ``None`` is "-"."""
    table = [list(header)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def state_text(state: str) -> Text:
    try:
        style = STATE_STYLES[EngineState(state)]
    except ValueError:
        style = ""
    return Text(state, style=style)


def rich_table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    state_column: str | None = "STATE",
    title: str | None = None,
) -> Table:
    """A borderless table, as ``kubectl`` prints one; the state column in colour."""
    table = Table(box=None, title=title, title_justify="left", header_style="bold", pad_edge=False)
    for name in header:
        table.add_column(name, no_wrap=name in ("NAME", "ID", "ENGINE", "STATE"))
    index = list(header).index(state_column) if state_column and state_column in header else None
    for row in rows:
        cells: list[Text | str] = [cell(v) for v in row]
        if index is not None:
            cells[index] = state_text(cell(row[index]))
        table.add_row(*cells)
    return table


def print_table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    state_column: str | None = "STATE",
    title: str | None = None,
) -> None:
    """A table on stdout: rich on a terminal, plain columns otherwise (``title`` then
    on a line of its own above the table)."""
    rows = list(rows)
    if is_terminal():
        console().print(rich_table(header, rows, state_column=state_column, title=title))
        return
    if title:
        click.echo(title)
    click.echo(format_table(header, rows))


# ---------------------------------------------------------------------------- engines


EXTERNAL_HOST = "external"  # the HOST column of an engine sagellm did not start


def host_cell(engine: dict[str, Any]) -> Any:
    """The HOST column: the engine's host, or ``external`` for a registered endpoint
    (``external_url`` set: no host, port or GPUs of ours)."""
    return EXTERNAL_HOST if engine.get("external_url") else engine.get("host")


def served_name(engine: dict[str, Any]) -> str:
    spec = engine.get("spec") or {}
    return str(spec.get("served_model_name") or spec.get("model") or "-")


def describe(engine: dict[str, Any]) -> str:
    """One line saying where an engine is in its life, e.g. ``STARTING (pid 1234)``."""
    state = engine.get("state", "?")
    if state == EngineState.DRAINING:
        return "DRAINING (no new request; in-flight ones finish)"
    if state == EngineState.PENDING:
        gpus = [g["index"] for g in engine.get("gpus") or []]
        where = f"GPUs {gpu_list(gpus)}" if gpus else "no GPU"
        return f"PENDING on host {engine.get('host')}, {where}, port {engine.get('port')}"
    if state == EngineState.STARTING:
        pid = engine.get("pid")
        restarts = engine.get("restart_count") or 0
        extra = [f"pid {pid}"] if pid else []
        extra += [f"restart {restarts}"] if restarts else []
        return "STARTING" + (f" ({', '.join(extra)})" if extra else "")
    if state == EngineState.RUNNING:
        external = " (external: not started by sagellm)" if engine.get("external_url") else ""
        return f"RUNNING at {engine.get('base_url')}{external}"
    if state in (EngineState.FAILED, EngineState.UNHEALTHY):
        line = f"{state}: {engine.get('last_error') or 'no error recorded'}"
        retry = engine.get("next_restart_at")
        if retry is not None:
            line += f" (restart in {max(0.0, retry - time.time()):.0f}s)"
        return line
    if state == EngineState.STOPPED:
        code = engine.get("exit_code")
        return "STOPPED" + (f" (exit code {code})" if code is not None else "")
    if state == EngineState.LOST:
        return f"LOST (host {engine.get('host')}'s heartbeat expired)"
    return str(state)


def progress_key(engine: dict[str, Any]) -> tuple[Any, ...]:
    # A restart shows as a new pid or count even when the state name repeats.
    return (engine.get("state"), engine.get("pid"), engine.get("restart_count"))


def elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:5.1f}s"


class EngineProgress:
    """State changes of engines while a start or an apply is in flight.

    On a terminal: a live table (ENGINE, ID, STATE, DETAIL) rewritten in place. Otherwise:
    one line per change, ``<elapsed> <line(engine)>``. Use as a context manager; call
    ``update`` with the engines' latest records after each poll.
    """

    def __init__(
        self,
        title: str,
        *,
        line: Callable[[dict[str, Any]], str] = describe,
        name: Callable[[dict[str, Any]], str] = served_name,
    ) -> None:
        self.title = title
        self.t0 = time.monotonic()
        self._line = line
        self._name = name
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._shown: dict[str, dict[str, Any]] = {}
        self._live: Live | None = None

    def baseline(self, engines: Iterable[dict[str, Any]]) -> None:
        """Engines already there: shown only once they change."""
        for e in engines:
            self._seen[e["id"]] = progress_key(e)

    def update(self, engines: Iterable[dict[str, Any]]) -> None:
        for e in engines:
            key = progress_key(e)
            if self._seen.get(e["id"]) == key:
                if e["id"] in self._shown:
                    self._shown[e["id"]] = e
                continue
            self._seen[e["id"]] = key
            self._shown[e["id"]] = e
            if self._live is None:
                click.echo(f"{elapsed(self.t0)} {self._line(e)}")
        if self._live is not None:
            self._live.update(self._table())

    def _table(self) -> Table:
        rows = []
        for e in self._shown.values():
            text = describe(e)
            detail = text[len(e.get("state", "")) :].lstrip(" :") if text else ""
            rows.append((self._name(e), e["id"], e.get("state"), detail or "-"))
        return rich_table(
            ("ENGINE", "ID", "STATE", "DETAIL"),
            rows,
            title=f"{self.title} ({time.monotonic() - self.t0:.1f}s)",
        )

    def __enter__(self) -> EngineProgress:
        if is_terminal():
            self._live = Live(self._table(), console=console(), refresh_per_second=4)
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None
