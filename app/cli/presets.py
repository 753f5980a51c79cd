"""``sagellm preset ...``: list, show, and apply a whole set of engines in one go."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from app.cli.client import (
    ENGINES,
    PRESETS,
    REQUEST_TIMEOUT_S,
    ApiClient,
    ApiError,
    CliError,
    Follow,
    InvalidInput,
    connect,
)
from app.cli.engines import REDRAW_S, interruptible
from app.cli.render import (
    EngineProgress,
    describe,
    emit_data,
    gb,
    gpu_list,
    output_option,
    print_table,
    served_name,
    to_yaml,
)
from app.core.placement import POLICIES

# A preset apply is one long request: the API answers when every engine is RUNNING.
APPLY_TIMEOUT_MARGIN_S = 60.0


@contextmanager
def known_preset() -> Iterator[None]:
    """An unknown preset name is invalid input (exit code 2), like a bad option: the
    API's 404 lists the known ones."""
    try:
        yield
    except ApiError as exc:
        if exc.status_code == 404:
            raise InvalidInput(exc.message, reasons=exc.reasons) from None
        raise


@click.group()
def preset() -> None:
    """Start a whole set of engines in one go (built-in presets or a YAML file)."""


@preset.command("list")
@output_option
def preset_list(output: str) -> None:
    """Built-in presets: name, engines, description (and why one cannot load)."""
    presets = connect().get(PRESETS)
    if output != "text":
        emit_data(presets, output)
        return
    if not presets:
        click.echo("no built-in presets")
        return
    print_table(
        ("NAME", "ENGINES", "DESCRIPTION"),
        (
            (
                p["name"],
                ",".join(p.get("engines") or []) or "-",
                "(invalid, see below)" if p.get("error") else p.get("description") or "",
            )
            for p in presets
        ),
        state_column=None,
    )
    for p in presets:
        if p.get("error"):
            click.echo(f"\n{p['name']}: {p['error']}")


@preset.command("show")
@click.argument("name")
@output_option
def preset_show(name: str, output: str) -> None:
    """A built-in preset, its model locations filled in by the API, with every engine's
    full spec."""
    with known_preset():
        data = connect().get(f"{PRESETS}/{name}")
    if output != "text":
        emit_data(data, output)
        return
    for eng in data.get("engines") or []:
        # Unset fields and the preset's own bookkeeping say nothing to a reader.
        spec = eng.get("spec") or {}
        eng["spec"] = {
            k: v for k, v in spec.items() if v is not None and k not in ("preset", "preset_engine")
        }
    # The API sorts keys; a reader wants the preset's identity before its engines.
    order = ("name", "description", "version", "source", "engines")
    click.echo(to_yaml({k: data[k] for k in order if k in data}))


PLAN_HEADER = ("ENGINE", "MODEL", "HOST", "GPUS", "PORT", "MEM/GPU", "ACTION")


def print_plan(plan: list[dict[str, Any]]) -> None:
    """The plan as ENGINE, MODEL, HOST, GPUS, PORT, MEM/GPU, ACTION, then the error and
    reasons of every engine that has any."""
    print_table(
        PLAN_HEADER,
        (
            (
                e["name"],
                e.get("model"),
                e.get("host"),
                gpu_list(e.get("gpus") or []),
                e.get("port"),
                gb(e.get("memory_per_gpu_gb")),
                "already running" if e.get("action") == "skip" else e.get("action"),
            )
            for e in plan
        ),
        state_column=None,
    )
    for e in plan:
        if e.get("error") or e.get("reasons"):
            click.echo(f"\n{e['name']}: {e.get('error') or ''}".rstrip())
            for r in e.get("reasons") or []:
                click.echo(f"  {r}")


def _local_preset(path: str) -> tuple[str, str]:
    """(text to send, preset name) of the file at ``path``: ``${VAR}`` expanded here
    from the user's environment (the API never expands them), then parsed so that a
    malformed file fails at once with the file, engine and field named."""
    from app.core.errors import ValidationError
    from app.core.presets import LOCATION_NAMES, expand_variables, parse_preset

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise InvalidInput(f"{path}: cannot read: {why}") from None
    # The API fills its model locations; any path stands in for them in this check.
    stand_ins = {name: f"/{name}" for name in LOCATION_NAMES}
    try:
        expanded = expand_variables(text, path, os.environ)
        return expanded, parse_preset(expanded, path, locations=stand_ins).name
    except ValidationError as exc:
        raise InvalidInput(exc.message) from None


def _of_preset(engines: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in engines if (e.get("spec") or {}).get("preset") == name}


def _preset_engines(api: ApiClient, name: str) -> dict[str, dict[str, Any]]:
    return _of_preset(api.get(ENGINES), name)


class _ApplyCall(threading.Thread):
    """The long apply request, run beside the progress loop; ``done`` when it ended
    (``on_done`` is called then)."""

    def __init__(self, send: Callable[[ApiClient], Any], on_done: Callable[[], None]) -> None:
        super().__init__(daemon=True, name="preset-apply")
        self._send = send
        self._on_done = on_done
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        api = ApiClient()  # its own connection pool: the main thread follows meanwhile
        try:
            self.result = self._send(api)
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc
        finally:
            api.close()
            self.done.set()
            self._on_done()


NOTHING_RESERVED = "dry run: nothing was reserved or started"


@preset.command("apply")
@click.option("-n", "--name", help="A built-in preset (see `sagellm preset list`).")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False),
    help="A preset YAML file (see presets/ for examples).",
)
@click.option("--dry-run", is_flag=True, help="Show the plan only; reserve nothing.")
@click.option("--no-rollback", is_flag=True, help="On failure, leave started engines running.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds.")
@click.option(
    "--policy", type=click.Choice(sorted(POLICIES)), help="Placement policy (default: the API's)."
)
def preset_apply(
    name: str | None,
    path: str | None,
    dry_run: bool,
    no_rollback: bool,
    yes: bool,
    timeout: float,
    policy: str | None,
) -> None:
    """Plan a preset, then (after confirmation) start all its engines or none.

    Engines of the preset that already run are left alone.
    """
    if (name is None) == (path is None):
        raise click.UsageError("give exactly one of -n/--name NAME or --file PATH")
    if path is not None:
        text, preset_name = _local_preset(path)
        route = f"{PRESETS}/apply"
        body: Any = {"yaml": text}
        # The API names this source in its validation errors instead of "request body".
        headers: dict[str, str] | None = {"X-Preset-Source": path}
    else:
        assert name is not None
        preset_name, route, body, headers = name, f"{PRESETS}/{name}/apply", None, None

    def send(api: ApiClient, *, plan_only: bool) -> Any:
        with known_preset():
            return api.request(
                "POST",
                route,
                params={
                    "dry_run": plan_only,
                    "rollback": not no_rollback,
                    "timeout": timeout,
                    "policy": policy,
                },
                json=body,
                headers=headers,
                timeout_s=REQUEST_TIMEOUT_S if plan_only else timeout + APPLY_TIMEOUT_MARGIN_S,
            )

    api = connect()
    planned = send(api, plan_only=True)
    preset_name = planned.get("preset") or preset_name
    plan = planned.get("plan") or []
    click.echo(f"plan of preset {preset_name}:")
    print_plan(plan)
    if dry_run:
        if not planned.get("ok"):
            raise CliError(
                f"preset {preset_name}: some engines cannot be placed (see the plan above); "
                f"{NOTHING_RESERVED}"
            )
        click.echo(NOTHING_RESERVED)
        return
    if not planned.get("ok"):
        raise CliError(
            f"preset {preset_name}: some engines cannot be placed; nothing was reserved or started"
        )
    to_start = [e["name"] for e in plan if e.get("action") == "start"]
    if not to_start:
        click.echo(f"nothing to start: every engine of {preset_name} already runs")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise CliError(
                "not applying: confirmation needed but stdin is not a terminal; pass --yes"
            )
        click.confirm(
            f"start {len(to_start)} engine(s) of {preset_name} ({', '.join(to_start)})?",
            abort=True,
        )
    _apply_with_progress(api, preset_name, lambda a: send(a, plan_only=False))


def _apply_with_progress(
    api: ApiClient, preset_name: str, send: Callable[[ApiClient], Any]
) -> None:
    """Run the apply request in a thread; meanwhile show the state changes of the
    preset's engines (live on a terminal); then print the outcome."""
    progress = EngineProgress(
        f"applying {preset_name}",
        line=lambda e: f"{_who(e)} ({e['id']}): {describe(e)}",
        name=_who,
    )
    # Records the preset already had (skipped engines, old STOPPED ones) only show
    # when they change.
    first = api.engines_changed()
    progress.baseline(_of_preset(first[0], preset_name).values())
    # Each change of a record is heard as the API hears it (a long-poll on the list,
    # ``Follow``); the end of the apply call wakes the loop at once.
    with (
        interruptible(
            f"the apply of {preset_name} goes on in the API; follow it with `sagellm engine list`"
        ),
        Follow(lambda a, last: a.engines_changed(last[1]), first, api.base_url) as changes,
        progress,
    ):
        call = _ApplyCall(send, on_done=changes.wake)
        call.start()
        while not call.done.is_set():
            for listed, _ in changes.wait(REDRAW_S):
                progress.update(_of_preset(listed, preset_name).values())
            progress.update([])  # a live display's clock
        engines = _preset_engines(api, preset_name)  # read after it ended: final
        progress.update(engines.values())
    if call.error is not None:
        if isinstance(call.error, ApiError):
            rolled = call.error.body.get("rolled_back") or []
            if rolled:
                call.error.reasons.append(f"rolled back: {', '.join(rolled)}")
        raise call.error
    result = call.result or {}
    started = {e["spec"].get("preset_engine"): e for e in result.get("engines") or []}
    rows = []
    for e in result.get("plan") or []:
        if e["name"] in started:
            rec = started[e["name"]]
            rows.append((e["name"], rec["id"], rec["state"], rec.get("base_url")))
        elif e.get("action") == "skip":
            rec = engines.get(e.get("engine_id") or "", {})
            rows.append((e["name"], e.get("engine_id"), "already running", rec.get("base_url")))
    click.echo(f"preset {preset_name} applied in {time.monotonic() - progress.t0:.1f}s:")
    print_table(("ENGINE", "ID", "STATE", "URL"), rows)


def _who(engine: dict[str, Any]) -> str:
    return str((engine.get("spec") or {}).get("preset_engine") or served_name(engine))
