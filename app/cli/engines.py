"""``sagellm engine ...``: start, list, show, stop, restart, logs, prune (``register``,
of external engines, is ``app.cli.external``).

An engine is named on the command line by its id, a unique prefix of it, its label or
its served name (``resolve_engine``): the list endpoint is read and the match made
here, so the API keeps one way of naming an engine (its id).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Any, NoReturn

import click

from app.cli.client import (
    ENGINES,
    EXIT_INTERRUPTED,
    ApiClient,
    ApiError,
    CliError,
    Follow,
    Interrupted,
    InvalidInput,
    connect,
)
from app.cli.options import idle_cell, parse_env, parse_gpu_ids
from app.cli.render import (
    EngineProgress,
    age,
    describe,
    emit_data,
    gpu_list,
    host_cell,
    output_option,
    print_table,
    readable,
    served_name,
    to_yaml,
)
from app.core.models import LIVE_STATES, TERMINAL_STATES, EngineRecord, EngineState
from app.core.placement import POLICIES
from app.core.spec import KINDS, RUNTIMES_BY_KIND, EngineSpec

# A live display is redrawn this often while nothing changes (no request is sent:
# changes come from a long-poll, ``app.cli.client.Follow``).
REDRAW_S = 0.25
LOG_POLL_S = 1.0
# Lines read per poll while following a log: the overlap with the previous read shows
# which lines are new, so more than this many in one poll interval cannot all be shown.
LOG_FOLLOW_WINDOW = 1000

RUNTIMES = list(dict.fromkeys(r for runtimes in RUNTIMES_BY_KIND.values() for r in runtimes))
STATES = [s.value for s in EngineState]
_LIVE = {s.value for s in LIVE_STATES}
_ENDED = {s.value for s in TERMINAL_STATES}


def settled(engine: dict[str, Any]) -> bool:
    """A start has an outcome (``EngineRecord.settled``: RUNNING, or nothing held)."""
    return EngineRecord.from_dict(engine).settled


def owns_nothing(engine: dict[str, Any]) -> bool:
    """STOPPED, or FAILED with no restart pending (``EngineRecord.owns_nothing``)."""
    return EngineRecord.from_dict(engine).owns_nothing


# ---------------------------------------------------------------------------- naming


def resolve_engine(api: ApiClient, ref: str) -> dict[str, Any]:
    """The engine ``ref`` names: its id, else a unique id prefix, label or served name.

    Several engines may share a label or a served name over time (a stopped one and its
    replacement): then the one still live is meant, if exactly one is. Anything else
    that matches more than one engine is refused, listing them (exit code 2); no match
    is "not found" (exit code 1).
    """
    engines: list[dict[str, Any]] = api.get(ENGINES)
    for e in engines:
        if e["id"] == ref:
            return e
    by_name = [e for e in engines if ref in ((e.get("spec") or {}).get("label"), served_name(e))]
    live = [e for e in by_name if e["state"] in _LIVE]
    if len(by_name) > 1 and live:
        by_name = live
    by_prefix = [e for e in engines if e["id"].startswith(ref)]
    found = {e["id"]: e for e in by_prefix + by_name}
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise CliError(
            f"no engine {ref!r}: no id, id prefix, label or served name matches "
            "(see `sagellm engine list`)"
        )
    raise InvalidInput(
        f"{ref!r} names {len(found)} engines; give one of their ids:",
        reasons=[
            f"{e['id']}  {e['state']}  label {(e.get('spec') or {}).get('label') or '-'}  "
            f"model {served_name(e)}"
            for e in found.values()
        ],
    )


ENGINE_REF = "ENGINE"
REF_HELP = "ENGINE is an id, a unique id prefix, a label or a served name."


# ---------------------------------------------------------------------------- following


@contextmanager
def interruptible(what_goes_on: str) -> Iterator[None]:
    """Ctrl-C while following ends the CLI (exit code 130), not the API's work."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {what_goes_on}") from None


def follow_engine(
    api: ApiClient,
    engine: dict[str, Any],
    *,
    until: Callable[[dict[str, Any]], bool],
    timeout_s: float,
    progress: EngineProgress,
) -> tuple[dict[str, Any], bool]:
    """Show each state change of ``engine`` until ``until`` holds or ``timeout_s``
    passes; return the last record and whether ``until`` held. Each change is heard as
    the API hears it (a long-poll on the record, ``Follow``), not at a poll interval."""
    deadline = time.monotonic() + timeout_s
    with (
        interruptible(
            f"engine {engine['id']} goes on; follow it with `sagellm engine show {engine['id']}`"
        ),
        Follow(ApiClient.engine_changed, engine, api.base_url) as changes,
    ):
        news = [engine]
        while True:
            for engine in news:  # every version the API answered, in order
                progress.update([engine])
                if until(engine):
                    return engine, True
            progress.update([])  # a live display's clock
            left = deadline - time.monotonic()
            if left <= 0:
                return engine, False
            news = changes.wait(min(REDRAW_S, left))


def _fail(message: str, *, reasons: tuple[str, ...] = ()) -> NoReturn:
    raise CliError(message, reasons=reasons)


def report_start(rec: dict[str, Any], done: bool, timeout: float) -> None:
    """The outcome of a start or restart: a line when RUNNING, else a ``CliError``."""
    eid = rec["id"]
    if not done:
        _fail(
            f"engine {eid} is still {rec['state']} after {timeout:g}s; it goes on in the "
            f"background: follow it with `sagellm engine logs {eid} -f` or `sagellm engine list`"
        )
    if rec["state"] == EngineState.RUNNING:
        click.echo(f"engine {eid} is RUNNING at {rec.get('base_url')} as {served_name(rec)}")
        return
    if rec["state"] == EngineState.FAILED:
        _fail(
            f"engine {eid} FAILED: {rec.get('last_error') or 'no error recorded'} "
            f"(log: `sagellm engine logs {eid}`)"
        )
    _fail(f"engine {eid} is {rec['state']}: it was stopped before it became ready")


# ---------------------------------------------------------------------------- commands


@click.group()
def engine() -> None:
    """Start, list, stop, restart engines; read their logs."""


@engine.command("list")
@click.option("--state", type=click.Choice(STATES, case_sensitive=False), help="Only this state.")
@click.option("--host", help="Only engines on this host.")
@click.option("--kind", type=click.Choice(KINDS), help="Only this kind.")
@click.option("--label", help="Only engines with this label.")
@output_option
def engine_list(
    state: str | None, host: str | None, kind: str | None, label: str | None, output: str
) -> None:
    """Engines as a table: NAME (id), LABEL, STATE, MODEL (served name), HOST (`external`
    for a registered endpoint), GPUS, URL, AGE, RESTARTS, IDLE-STOP (the idle countdown
    of an engine with an idle timeout; `on demand` for one on STANDBY)."""
    engines = connect().get(ENGINES, state=state, host=host, kind=kind, label=label)
    if output != "text":
        emit_data(engines, output)
        return
    if not engines:
        click.echo("no engines")
        return
    now = time.time()
    print_table(
        ("NAME", "LABEL", "STATE", "MODEL", "HOST", "GPUS", "URL", "AGE", "RESTARTS", "IDLE-STOP"),
        (
            (
                e["id"],
                (e.get("spec") or {}).get("label"),
                e["state"],
                served_name(e),
                host_cell(e),
                gpu_list(g["index"] for g in e.get("gpus") or []),
                e.get("base_url") if e["state"] not in _ENDED else None,
                age(now - e["created_at"]) if e.get("created_at") else None,
                e.get("restart_count", 0),
                idle_cell(e, now),
            )
            for e in engines
        ),
    )


@engine.command("show")
@click.argument("ref", metavar=ENGINE_REF)
@output_option
def engine_show(ref: str, output: str) -> None:
    """One engine's record: times as local time and age, empty fields left out
    (``-o json`` / ``-o yaml``: the API's record as it is)."""
    rec = resolve_engine(connect(), ref)
    if output != "text":
        emit_data(rec, output)
        return
    click.echo(f"{rec['id']}: {describe(rec)}")
    failure = rec.get("failure") or {}
    if failure.get("reason"):
        # Why its last process ended, and what to do, before the details.
        click.echo(f"why: {failure['reason']}: {failure.get('evidence') or '-'}")
        if failure.get("advice"):
            click.echo(f"what to do: {failure['advice']}")
    shown = readable(rec)
    # A reader wants who and where first, the full spec and launch flags last.
    first = ("id", "state", "host", "base_url", "failure")
    last = ("spec", "launch")
    order = [k for k in first if k in shown]
    order += [k for k in shown if k not in first and k not in last]
    order += [k for k in last if k in shown]
    click.echo(to_yaml({k: shown[k] for k in order}))


engine_show.help = f"{engine_show.help}\n\n{REF_HELP}"


@engine.command("start")
@click.argument("model")
@click.option("--kind", type=click.Choice(KINDS), help="Default: llm.")
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    help="Default: vllm for llm, embedding for embedding.",
)
@click.option("--tp", "--tensor-parallel", "tensor_parallel", type=int, help="GPUs per stage.")
@click.option("--pp", "--pipeline-parallel", "pipeline_parallel", type=int, help="Stages.")
@click.option("--gpu/--no-gpu", "use_gpu", default=None, help="Default: llm yes, embedding no.")
@click.option("--memory-gb", "required_memory_gb", type=float, help="GB per GPU (no estimate).")
@click.option("--max-model-len", type=int, help="Context length to reserve for.")
@click.option("--dtype", help="Weights dtype (default: auto); the API names the allowed ones.")
@click.option("--quantization", help="Quantization method; the API names the allowed ones.")
@click.option("--port", type=int, help="A port in the host's range (default: the first free).")
@click.option("--host", help="Place on this host only.")
@click.option("--gpu-ids", callback=parse_gpu_ids, help="GPU indices on the host, e.g. 0,1.")
@click.option("--label", help="A name to route and filter by.")
@click.option("--served-model-name", help="The name clients use (default: MODEL).")
@click.option(
    "--policy", type=click.Choice(sorted(POLICIES)), help="Placement policy (default: the API's)."
)
@click.option(
    "--on-demand",
    is_flag=True,
    default=None,
    help="STANDBY until the first gateway request for it starts it.",
)
@click.option(
    "--idle-timeout",
    "idle_timeout_s",
    type=float,
    help="Stop it (back to STANDBY when on demand) after this many seconds idle.",
)
@click.option("--env", "env", multiple=True, callback=parse_env, help="NAME=VALUE, repeatable.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow until RUNNING.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait.")
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED)
def engine_start(
    model: str,
    wait: bool,
    timeout: float,
    extra_args: tuple[str, ...],
    env: dict[str, str],
    **options: Any,
) -> None:
    """Start an engine for MODEL (a Hugging Face id or a local path).

    Arguments after a literal `--` go to the engine's command line verbatim, e.g.
    `sagellm engine start Qwen/Qwen2.5-1.5B-Instruct -- --enforce-eager`.
    """
    body: dict[str, Any] = {"model": model}
    body.update({k: v for k, v in options.items() if v is not None})
    if extra_args:
        body["extra_args"] = list(extra_args)
    if env:
        body["env"] = env
    api = connect()
    progress = EngineProgress("starting")
    # Never wait server-side: the CLI polls, so it can show each step as it happens.
    accepted = api.request("POST", ENGINES, params={"wait": False}, json=body)
    rec = accepted["engine"]
    eid = rec["id"]
    if rec["state"] == "STANDBY":
        click.echo(
            f"engine {eid} is on STANDBY: the first request for {served_name(rec)} "
            "through the gateway starts it"
        )
        return
    if not wait:
        click.echo(f"engine {eid} accepted: {describe(rec)}")
        click.echo(f"follow it: sagellm engine show {eid} / sagellm engine logs {eid} -f")
        return
    click.echo(f"engine {eid} ({served_name(rec)})")
    with progress:
        rec, done = follow_engine(api, rec, until=settled, timeout_s=timeout, progress=progress)
    report_start(rec, done, timeout)


def start_command(spec: dict[str, Any]) -> str:
    """The ``sagellm engine start`` line that asks for ``spec`` again: every field that
    differs from ``EngineSpec``'s default, spelt as ``engine start``'s own option."""
    defaults = {f.name: f.default for f in fields(EngineSpec) if f.default is not MISSING}
    argv = ["sagellm", "engine", "start", str(spec["model"])]
    for param in engine_start.params:
        name = param.name
        if not isinstance(param, click.Option) or name not in spec or name == "env":
            continue
        value = spec[name]
        if value is None or value == defaults.get(name):
            continue
        if param.secondary_opts:  # --gpu/--no-gpu
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, list | tuple):
            argv += [param.opts[0], ",".join(str(v) for v in value)]
        else:
            argv += [param.opts[0], str(value)]
    for key, val in (spec.get("env") or {}).items():
        argv += ["--env", f"{key}={val}"]
    if spec.get("extra_args"):
        argv += ["--", *spec["extra_args"]]
    return shlex.join(argv)


@engine.command("stop")
@click.argument("ref", metavar=ENGINE_REF)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow until STOPPED.")
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait (+ the drain)."
)
@click.option(
    "--no-drain", is_flag=True, help="Stop at once: requests in flight to it are cut off."
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0, 3600),
    default=None,
    metavar="S",
    help="Drain at most S seconds (default: the API's SAGELLM_DRAIN_TIMEOUT_S; 0: no drain).",
)
def engine_stop(
    ref: str, wait: bool, timeout: float, no_drain: bool, drain_timeout: float | None
) -> None:
    """Stop an engine gracefully: a serving engine is DRAINING first (the gateway sends
    it no new request; those in flight finish), then SIGTERM, grace period, SIGKILL;
    release what it holds. Prints the state it ends in."""
    api = connect()
    eid = resolve_engine(api, ref)["id"]
    progress = EngineProgress("stopping", line=_stop_line)
    params = {"drain": "false" if no_drain else None, "drain_timeout": drain_timeout}
    rec = api.request("DELETE", f"{ENGINES}/{eid}", params=params)
    if rec.get("external_url"):  # deleted at once: nothing of it ran here
        click.echo(f"engine {eid}: forgotten (external, at {rec['external_url']})")
        return
    if wait and rec["state"] not in _ENDED:
        if rec["state"] == EngineState.DRAINING and rec.get("drain_deadline"):
            timeout += max(0.0, float(rec["drain_deadline"]) - time.time())
        with progress:
            rec, done = follow_engine(
                api, rec, until=lambda r: r["state"] in _ENDED, timeout_s=timeout, progress=progress
            )
        if not done:
            _fail(
                f"engine {eid} is still {rec['state']} after {timeout:g}s; its host's "
                "worker stops it when it can (is the worker running? `sagellm status`)"
            )
    click.echo(f"engine {eid}: {_stop_line(rec)}")


def _stop_line(rec: dict[str, Any]) -> str:
    """``describe``, with what a DRAINING engine waits for."""
    if rec.get("state") == EngineState.DRAINING:
        left = max(0.0, float(rec.get("drain_deadline") or 0.0) - time.time())
        return f"DRAINING: no new request; stops once none is in flight (in {left:.0f}s at most)"
    return describe(rec)


engine_stop.help = f"{engine_stop.help}\n\n{REF_HELP}"


@engine.command("restart")
@click.argument("ref", metavar=ENGINE_REF)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow until RUNNING.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait.")
def engine_restart(ref: str, wait: bool, timeout: float) -> None:
    """Restart an engine in place (same id); a FAILED engine is placed again. A stopped
    engine is not restarted: the error gives the command that starts a new one."""
    api = connect()
    before = resolve_engine(api, ref)
    eid = before["id"]
    if before["state"] in (EngineState.STOPPING, EngineState.STOPPED):
        _refuse_restart_of_stopped(before)
    progress = EngineProgress("restarting")
    rec = api.request("POST", f"{ENGINES}/{eid}/restart")
    if not wait:
        click.echo(f"engine {eid}: restart queued ({describe(rec)})")
        return
    seen_other = False

    def restarted(r: dict[str, Any]) -> bool:
        # The old process may still answer RUNNING until the worker acts: only a new
        # pid, or a state in between, shows that the restart happened.
        nonlocal seen_other
        seen_other = seen_other or r["state"] != before["state"]
        fresh = seen_other or r.get("pid") != before.get("pid")
        return fresh and settled(r)

    with progress:
        rec, done = follow_engine(api, rec, until=restarted, timeout_s=timeout, progress=progress)
    report_start(rec, done, timeout)


engine_restart.help = f"{engine_restart.help}\n\n{REF_HELP}"


def _refuse_restart_of_stopped(rec: dict[str, Any]) -> NoReturn:
    spec = rec.get("spec") or {}
    commands = [start_command(spec)]
    if spec.get("preset"):
        commands.insert(0, f"sagellm preset apply -n {shlex.quote(spec['preset'])}")
    when = "once it is STOPPED, " if rec["state"] == EngineState.STOPPING else ""
    raise CliError(
        f"engine {rec['id']} is {rec['state']}: a stopped engine is not restarted; "
        f"{when}start a new one with"
        + (" its preset (or on its own):" if spec.get("preset") else ":"),
        reasons=commands,
    )


def new_lines(before: list[str], now: list[str]) -> list[str]:
    """The lines of ``now`` (a log's last lines) that ``before`` (an earlier read) did
    not show: what follows the longest end of ``before`` that ``now`` starts with."""
    if not now:
        return []
    for i in range(max(0, len(before) - len(now)), len(before)):
        overlap = len(before) - i
        if before[i] == now[0] and before[i:] == now[:overlap]:
            return now[overlap:]
    return now


@engine.command("logs")
@click.argument("ref", metavar=ENGINE_REF)
@click.option("--tail", type=int, default=100, show_default=True, help="Last N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the engine ends.")
def engine_logs(ref: str, tail: int, follow: bool) -> None:
    """The last lines of an engine's log (read on its host by the worker); with -f,
    new lines as they come (polled), until the engine is STOPPED or FAILED or Ctrl-C."""
    api = connect()
    eid = resolve_engine(api, ref)["id"]
    path = f"{ENGINES}/{eid}/logs"
    window = max(tail, LOG_FOLLOW_WINDOW) if follow else tail
    lines = _log_lines(api.get(path, tail=window))
    shown = lines[-tail:] if tail > 0 else []
    if not shown and not follow:
        click.echo(f"engine {eid}: no log lines yet", err=True)
    _echo_lines(shown)
    if follow:
        _follow_log(api, eid, path, lines, window)


engine_logs.help = f"{engine_logs.help}\n\n{REF_HELP}"


def _log_lines(data: dict[str, Any]) -> list[str]:
    return [str(line).rstrip("\n") for line in data.get("lines") or []]


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def _follow_log(api: ApiClient, eid: str, path: str, before: list[str], window: int) -> None:
    try:
        while True:
            time.sleep(LOG_POLL_S)
            try:
                rec = api.get(f"{ENGINES}/{eid}")
            except ApiError as exc:
                if exc.status_code == 404:
                    click.echo(f"engine {eid} was pruned", err=True)
                    return
                raise
            now = _log_lines(api.get(path, tail=window))
            fresh = new_lines(before, now)
            if before and fresh is now and len(now) >= window:
                click.echo(f"[more than {window} lines in {LOG_POLL_S:g}s: some skipped]", err=True)
            _echo_lines(fresh)
            before = now
            if owns_nothing(rec):
                click.echo(f"engine {eid}: {describe(rec)}", err=True)
                return
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


@engine.command("prune")
@click.option(
    "--older-than",
    "older_than",
    type=float,
    help="Seconds since they ended (default: the API's SAGELLM_PRUNE_AFTER_S).",
)
def engine_prune(older_than: float | None) -> None:
    """Delete STOPPED and FAILED engine records older than --older-than seconds."""
    data = connect().request("POST", f"{ENGINES}/prune", params={"older_than_s": older_than})
    pruned = data.get("pruned") or []
    click.echo(f"pruned {len(pruned)} record(s)" + (f": {', '.join(pruned)}" if pruned else ""))


@engine.command("events")
@click.argument("ref", metavar=ENGINE_REF)
@output_option
def engine_events(ref: str, output: str) -> None:
    """The engine's timeline, oldest first: TIME (local), KIND, MESSAGE (placed,
    spawned, ready, probe failures, crashes and their reason, remediation, draining,
    stopped, every state change)."""
    api = connect()
    eid = resolve_engine(api, ref)["id"]
    events = api.get(f"{ENGINES}/{eid}/events").get("events") or []
    if output != "text":
        emit_data(events, output)
        return
    if not events:
        click.echo(f"engine {eid}: no events")
        return
    print_table(
        ("TIME", "KIND", "MESSAGE"),
        (
            (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
                + f".{int(e['at'] % 1 * 1000):03d}",
                e["kind"],
                e["message"],
            )
            for e in events
        ),
        state_column=None,
    )


engine_events.help = f"{engine_events.help}\n\n{REF_HELP}"
