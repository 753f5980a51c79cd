"""CLI commands that talk to the REST API at ``SAGELLM_API_URL``.

``status``, ``gpu``, ``backends``, ``engine ...`` and ``preset ...`` are registered on
the ``sagellm`` group of ``app.cli`` (so they run as ``sagellm ...`` and as
``flask --app app sagellm ...``). Each one is thin: build one request, send it, format
the answer. Rules (validation, placement, presets) live in the API and ``app.core``;
the CLI never decides anything the API would decide differently.

The API is found at ``SAGELLM_API_URL`` (default from ``app.settings.SETTINGS_DOC``),
read straight from the environment: ``Settings.from_env`` would also validate worker
settings a CLI user has no reason to set. ``SAGELLM_ADMIN_TOKEN`` (else the token
``sagellm up`` generated on this machine) is sent as ``Authorization: Bearer <token>``.

Exit codes:

* 0: done.
* 1: failed: the API is unreachable or refused the request for a reason other than
  invalid input (unknown engine or preset 404, nothing fits 409, no worker 503, an
  engine that did not start 502), an engine ended FAILED or STOPPED, a wait timed out,
  or a confirmation was declined.
* 2: invalid input: a bad option (click's usage errors), a request the API rejected as
  invalid (400 or 422: nothing was reserved or started), or a malformed preset file.

Errors go to stderr as the API's ``message``, then its ``reasons`` indented.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import click
import httpx

from app.cli import sagellm
from app.settings import SETTINGS_DOC

API_URL_VAR = "SAGELLM_API_URL"
TOKEN_VAR = "SAGELLM_ADMIN_TOKEN"
ENGINES = "/v1/management/engines"
PRESETS = "/v1/management/presets"

EXIT_FAILED = 1
EXIT_INVALID = 2

# Short requests answer from Redis; logs are read on the engine's host (up to 15 s).
REQUEST_TIMEOUT_S = 30.0
# A preset apply is one long request: the API answers when every engine is RUNNING.
APPLY_TIMEOUT_MARGIN_S = 60.0
ENGINE_POLL_S = 0.5
PRESET_POLL_S = 1.0

TERMINAL = ("STOPPED", "FAILED")


# ---------------------------------------------------------------------------- errors


class CliError(click.ClickException):
    """A failure shown as ``Error: message`` plus indented reasons; exit code 1."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        # A placement error's message already lists its reasons: do not repeat them.
        self.reasons = [r for r in reasons if r not in message]

    def format_message(self) -> str:
        return "\n".join([self.message, *(f"  {r}" for r in self.reasons)])


class InvalidInput(CliError):
    """Input refused before anything was done: exit code 2."""

    exit_code = EXIT_INVALID


class Interrupted(CliError):
    exit_code = 130  # as a shell reports SIGINT


class ApiError(CliError):
    """The API answered with its error shape ``{code, status, message, ...}``."""

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        message = str(body.get("message") or body.get("status") or f"HTTP {status_code}")
        if status_code == 401:
            message += f" (set {TOKEN_VAR} to the API's admin token)"
        super().__init__(message, reasons=[str(r) for r in body.get("reasons") or []])
        self.status_code = status_code
        self.body = body


class ApiInvalidInput(ApiError):
    """400/422: the API rejected the request as invalid; nothing was reserved."""

    exit_code = EXIT_INVALID


def api_error(status_code: int, body: dict[str, Any]) -> ApiError:
    """The ``ApiError`` for an error answer, by the exit-code convention above."""
    cls = ApiInvalidInput if status_code in (400, 422) else ApiError
    return cls(status_code, body)


# ---------------------------------------------------------------------------- HTTP


def api_url() -> str:
    """``SAGELLM_API_URL`` from the environment, else its documented default."""
    raw = os.environ.get(API_URL_VAR, "").strip() or SETTINGS_DOC[API_URL_VAR][0]
    return raw.rstrip("/")


def admin_token() -> str:
    """``SAGELLM_ADMIN_TOKEN``, else the token ``sagellm up`` generated on this machine
    (``$SAGELLM_DATA_DIR/admin-token``), else ``""``."""
    from pathlib import Path

    from app.api.auth import read_admin_token

    token = os.environ.get(TOKEN_VAR, "").strip()
    if token:
        return token
    data_dir = os.environ.get("SAGELLM_DATA_DIR", "").strip() or SETTINGS_DOC["SAGELLM_DATA_DIR"][0]
    return read_admin_token(Path(data_dir).expanduser())


class ApiClient:
    """A small JSON client of the management API; every failure becomes a ``CliError``."""

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url or api_url()
        headers = {"User-Agent": "sagellm-cli", "Accept": "application/json"}
        token = admin_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.base_url, headers=headers)

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> Any:
        """Send one request; return the decoded JSON body of a 2xx answer."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._client.request(
                method, path, params=query, json=json, headers=headers, timeout=timeout_s
            )
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot reach the sagellm API at {self.base_url}: {exc} (start it with "
                f"`make up` / `flask sagellm up`, or set {API_URL_VAR})"
            ) from None
        except httpx.TimeoutException:
            raise CliError(
                f"the sagellm API at {self.base_url} did not answer {method} {path} "
                f"within {timeout_s:g}s"
            ) from None
        except (httpx.RequestError, httpx.InvalidURL) as exc:
            raise CliError(
                f"request to the sagellm API at {self.base_url} failed: {exc} (check {API_URL_VAR})"
            ) from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.is_success:
            return body
        if not isinstance(body, dict):
            # Not our error shape: a proxy or something else answers at that address.
            text = resp.text.strip().replace("\n", " ")[:200]
            body = {"message": f"HTTP {resp.status_code} from {self.base_url}{path}: {text}"}
        raise api_error(resp.status_code, body)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)


def _client() -> ApiClient:
    return ApiClient()


# ---------------------------------------------------------------------------- formatting


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain-text columns, left-aligned and padded to the widest cell; ``None`` is "-"."""
    table = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GB"


def _gpu_list(indices: Iterable[int]) -> str:
    out = ",".join(str(i) for i in indices)
    return out or "-"


def _served_name(engine: dict[str, Any]) -> str:
    spec = engine.get("spec") or {}
    return str(spec.get("served_model_name") or spec.get("model") or "-")


def describe(engine: dict[str, Any]) -> str:
    """One line saying where an engine is in its life, e.g. ``STARTING (pid 1234)``."""
    state = engine.get("state", "?")
    if state == "PENDING":
        gpus = [g["index"] for g in engine.get("gpus") or []]
        where = f"GPUs {_gpu_list(gpus)}" if gpus else "no GPU"
        return f"PENDING on host {engine.get('host')}, {where}, port {engine.get('port')}"
    if state == "STARTING":
        pid = engine.get("pid")
        restarts = engine.get("restart_count") or 0
        extra = [f"pid {pid}"] if pid else []
        extra += [f"restart {restarts}"] if restarts else []
        return "STARTING" + (f" ({', '.join(extra)})" if extra else "")
    if state == "RUNNING":
        return f"RUNNING at {engine.get('base_url')}"
    if state in ("FAILED", "UNHEALTHY"):
        line = f"{state}: {engine.get('last_error') or 'no error recorded'}"
        retry = engine.get("next_restart_at")
        if retry is not None:
            line += f" (restart in {max(0.0, retry - time.time()):.0f}s)"
        return line
    if state == "STOPPED":
        code = engine.get("exit_code")
        return "STOPPED" + (f" (exit code {code})" if code is not None else "")
    if state == "LOST":
        return f"LOST (host {engine.get('host')}'s heartbeat expired)"
    return str(state)


def _progress_key(engine: dict[str, Any]) -> tuple[Any, ...]:
    # A restart shows as a new pid or count even when the state name repeats.
    return (engine.get("state"), engine.get("pid"), engine.get("restart_count"))


def _elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:5.1f}s"


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()


def _settled(engine: dict[str, Any]) -> bool:
    """A start has an outcome: RUNNING, STOPPED, or FAILED with no restart pending."""
    state = engine.get("state")
    return state in ("RUNNING", "STOPPED") or (
        state == "FAILED" and engine.get("next_restart_at") is None
    )


def follow_engine(
    api: ApiClient,
    engine: dict[str, Any],
    *,
    until: Callable[[dict[str, Any]], bool],
    timeout_s: float,
    t0: float,
) -> tuple[dict[str, Any], bool]:
    """Print each state change of ``engine`` (elapsed since ``t0``) until ``until`` holds
    or ``timeout_s`` passes; return the last record and whether ``until`` held."""
    deadline = time.monotonic() + timeout_s
    last: tuple[Any, ...] | None = None
    while True:
        key = _progress_key(engine)
        if key != last:
            click.echo(f"{_elapsed(t0)} {describe(engine)}")
            last = key
        if until(engine):
            return engine, True
        if time.monotonic() >= deadline:
            return engine, False
        time.sleep(min(ENGINE_POLL_S, max(0.0, deadline - time.monotonic())))
        engine = api.get(f"{ENGINES}/{engine['id']}")


def _fail(message: str, *, reasons: Sequence[str] = ()) -> NoReturn:
    raise CliError(message, reasons=reasons)


# ---------------------------------------------------------------------------- cluster


def _gpu_table(gpus: list[dict[str, Any]]) -> str:
    return format_table(
        ("HOST", "IDX", "NAME", "TOTAL", "OUTSIDE", "RESERVED", "AVAILABLE"),
        (
            (
                g["host"] + ("" if g.get("host_up", True) else " (down)"),
                g["index"],
                g.get("name"),
                _gb(g.get("total_gb")),
                _gb(g.get("outside_gb")),
                _gb(g.get("reserved_gb")),
                _gb(g.get("available_gb")),
            )
            for g in gpus
        ),
    )


@sagellm.command()
def status() -> None:
    """Hosts (up, heartbeat age), GPUs and engine counts."""
    st = _client().get("/v1/management/status")
    live: dict[str, int] = {}
    for e in st["engines"]:
        if e.get("host") and e["state"] not in TERMINAL:
            live[e["host"]] = live.get(e["host"], 0) + 1
    click.echo("HOSTS")
    if st["hosts"]:
        click.echo(
            format_table(
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
            )
        )
    else:
        click.echo("none: start a worker on each GPU host (`flask sagellm worker`)")
    click.echo("\nGPUS")
    click.echo(_gpu_table(st["gpus"]) if st["gpus"] else "none")
    counts = st.get("counts") or {}
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    click.echo(f"\nENGINES: {summary or 'none'}")


@sagellm.command()
def gpu() -> None:
    """Every GPU: total, held by outside processes, reserved by sagellm, available."""
    gpus = _client().get("/v1/management/gpus")
    click.echo(_gpu_table(gpus) if gpus else "no GPUs known (is a worker running?)")


@sagellm.command()
def backends() -> None:
    """Engines the gateway routes to, LLM and embedding, with in-flight requests."""
    data = _client().get("/v1/management/backends")
    for title, key in (
        ("LLM BACKENDS", "llm_backends"),
        ("EMBEDDING BACKENDS", "embedding_backends"),
    ):
        rows = data.get(key) or []
        click.echo(title)
        if not rows:
            click.echo("none")
        else:
            click.echo(
                format_table(
                    ("ENGINE", "MODEL", "SERVED NAME", "URL", "HEALTHY", "IN-FLIGHT"),
                    (
                        (
                            b["engine_id"],
                            b.get("model"),
                            b.get("served_model_name"),
                            b.get("base_url"),
                            b.get("healthy"),
                            b.get("in_flight", 0),
                        )
                        for b in rows
                    ),
                )
            )
        if key == "llm_backends":
            click.echo()


# ---------------------------------------------------------------------------- engines


@sagellm.group()
def engine() -> None:
    """Start, list, stop, restart engines; read their logs."""


@engine.command("list")
@click.option("--state", help="PENDING, STARTING, RUNNING, UNHEALTHY, STOPPING, STOPPED, ...")
@click.option("--host", help="Only engines on this host.")
@click.option("--kind", type=click.Choice(["llm", "embedding"]), help="Only this kind.")
@click.option("--label", help="Only engines with this label.")
def engine_list(state: str | None, host: str | None, kind: str | None, label: str | None) -> None:
    """Engines as a table: ID, STATE, KIND, MODEL (served name), HOST, GPUS, PORT."""
    engines = _client().get(
        ENGINES, state=state.upper() if state else None, host=host, kind=kind, label=label
    )
    if not engines:
        click.echo("no engines")
        return
    click.echo(
        format_table(
            ("ID", "STATE", "KIND", "MODEL", "HOST", "GPUS", "PORT", "RESTARTS"),
            (
                (
                    e["id"],
                    e["state"],
                    (e.get("spec") or {}).get("kind"),
                    _served_name(e),
                    e.get("host"),
                    _gpu_list(g["index"] for g in e.get("gpus") or []),
                    e.get("port"),
                    e.get("restart_count", 0),
                )
                for e in engines
            ),
        )
    )


@engine.command("show")
@click.argument("engine_id")
def engine_show(engine_id: str) -> None:
    """One engine's full record."""
    click.echo(_yaml(_client().get(f"{ENGINES}/{engine_id}")))


def _parse_gpu_ids(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected GPU indices like 0,1") from None


def _parse_env(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    env: dict[str, str] = {}
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE")
        env[key] = val
    return env


@engine.command("start")
@click.argument("model")
@click.option("--kind", type=click.Choice(["llm", "embedding"]), help="Default: llm.")
@click.option(
    "--runtime",
    type=click.Choice(["vllm", "transformers", "embedding"]),
    help="Default: vllm for llm, embedding for embedding.",
)
@click.option("--tp", "--tensor-parallel", "tensor_parallel", type=int, help="GPUs per stage.")
@click.option("--pp", "--pipeline-parallel", "pipeline_parallel", type=int, help="Stages.")
@click.option("--gpu/--no-gpu", "use_gpu", default=None, help="Default: llm yes, embedding no.")
@click.option("--memory-gb", "required_memory_gb", type=float, help="GB per GPU (no estimate).")
@click.option("--max-model-len", type=int, help="Context length to reserve for.")
@click.option("--dtype", help="auto, bfloat16, float16, float32, ...")
@click.option("--quantization", help="awq, gptq, fp8, int8, int4.")
@click.option("--port", type=int, help="A port in the host's range (default: the first free).")
@click.option("--host", help="Place on this host only.")
@click.option("--gpu-ids", callback=_parse_gpu_ids, help="GPU indices on the host, e.g. 0,1.")
@click.option("--label", help="A name to route and filter by.")
@click.option("--served-model-name", help="The name clients use (default: MODEL).")
@click.option("--policy", help="Placement policy: binpack or spread (default: the API's).")
@click.option("--env", "env", multiple=True, callback=_parse_env, help="NAME=VALUE, repeatable.")
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
    api = _client()
    t0 = time.monotonic()
    # Never wait server-side: the CLI polls, so it can show each step as it happens.
    accepted = api.request("POST", ENGINES, params={"wait": False}, json=body)
    rec = accepted["engine"]
    eid = rec["id"]
    if not wait:
        click.echo(f"engine {eid} accepted: {describe(rec)}")
        click.echo(f"follow it: sagellm engine show {eid} / sagellm engine logs {eid}")
        return
    click.echo(f"engine {eid} ({_served_name(rec)})")
    rec, done = follow_engine(api, rec, until=_settled, timeout_s=timeout, t0=t0)
    _report_start(rec, done, timeout)


def _report_start(rec: dict[str, Any], done: bool, timeout: float) -> None:
    eid = rec["id"]
    if not done:
        _fail(
            f"engine {eid} is still {rec['state']} after {timeout:g}s; it goes on in the "
            f"background: follow it with `sagellm engine logs {eid}` or `sagellm engine list`"
        )
    if rec["state"] == "RUNNING":
        click.echo(f"engine {eid} is RUNNING at {rec.get('base_url')} as {_served_name(rec)}")
        return
    if rec["state"] == "FAILED":
        _fail(
            f"engine {eid} FAILED: {rec.get('last_error') or 'no error recorded'} "
            f"(log: `sagellm engine logs {eid}`)"
        )
    _fail(f"engine {eid} is {rec['state']}: it was stopped before it became ready")


@engine.command("stop")
@click.argument("engine_id")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow until STOPPED.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait.")
def engine_stop(engine_id: str, wait: bool, timeout: float) -> None:
    """Stop an engine gracefully (SIGTERM, grace period, SIGKILL); release what it holds."""
    api = _client()
    t0 = time.monotonic()
    rec = api.request("DELETE", f"{ENGINES}/{engine_id}")
    if not wait or rec["state"] in TERMINAL:
        click.echo(f"engine {engine_id}: {describe(rec)}")
        return
    rec, done = follow_engine(
        api, rec, until=lambda r: r["state"] in TERMINAL, timeout_s=timeout, t0=t0
    )
    if not done:
        _fail(
            f"engine {engine_id} is still {rec['state']} after {timeout:g}s; its host's "
            "worker stops it when it can (is the worker running? `sagellm status`)"
        )


@engine.command("restart")
@click.argument("engine_id")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow until RUNNING.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait.")
def engine_restart(engine_id: str, wait: bool, timeout: float) -> None:
    """Restart an engine in place (same id); a FAILED engine is placed again."""
    api = _client()
    t0 = time.monotonic()
    before = api.get(f"{ENGINES}/{engine_id}")
    rec = api.request("POST", f"{ENGINES}/{engine_id}/restart")
    if not wait:
        click.echo(f"engine {engine_id}: restart queued ({describe(rec)})")
        return
    seen_other = False

    def restarted(r: dict[str, Any]) -> bool:
        # The old process may still answer RUNNING until the worker acts: only a new
        # pid, or a state in between, shows that the restart happened.
        nonlocal seen_other
        seen_other = seen_other or r["state"] != before["state"]
        fresh = seen_other or r.get("pid") != before.get("pid")
        return fresh and _settled(r)

    rec, done = follow_engine(api, rec, until=restarted, timeout_s=timeout, t0=t0)
    _report_start(rec, done, timeout)


@engine.command("logs")
@click.argument("engine_id")
@click.option("--tail", type=int, default=100, show_default=True, help="Last N lines.")
def engine_logs(engine_id: str, tail: int) -> None:
    """The last lines of an engine's log (read on its host by the worker)."""
    data = _client().get(f"{ENGINES}/{engine_id}/logs", tail=tail)
    lines = data.get("lines") or []
    if not lines:
        click.echo(f"engine {engine_id}: no log lines yet", err=True)
    for line in lines:
        click.echo(line.rstrip("\n"))


@engine.command("prune")
@click.option(
    "--older-than",
    "older_than",
    type=float,
    help="Seconds since they ended (default: the API's SAGELLM_PRUNE_AFTER_S).",
)
def engine_prune(older_than: float | None) -> None:
    """Delete STOPPED and FAILED engine records older than --older-than seconds."""
    data = _client().request("POST", f"{ENGINES}/prune", params={"older_than_s": older_than})
    pruned = data.get("pruned") or []
    click.echo(f"pruned {len(pruned)} record(s)" + (f": {', '.join(pruned)}" if pruned else ""))


# ---------------------------------------------------------------------------- hosts


@sagellm.group()
def host() -> None:
    """Hosts of the cluster."""


@host.command("forget")
@click.argument("name")
def host_forget(name: str) -> None:
    """Forget a DOWN host: its engines end FAILED and their reservations are released."""
    data = _client().request("DELETE", f"/v1/management/hosts/{name}")
    ended = data.get("engines") or []
    click.echo(
        f"host {name} forgotten; {len(ended)} engine(s) ended"
        + (f": {', '.join(ended)}" if ended else "")
    )


# ---------------------------------------------------------------------------- presets


@sagellm.group()
def preset() -> None:
    """Start a whole set of engines in one go (built-in presets or a YAML file)."""


@preset.command("list")
def preset_list() -> None:
    """Built-in presets: name, engines, description (and why one cannot load)."""
    presets = _client().get(PRESETS)
    if not presets:
        click.echo("no built-in presets")
        return
    click.echo(
        format_table(
            ("NAME", "ENGINES", "DESCRIPTION"),
            (
                (
                    p["name"],
                    ",".join(p.get("engines") or []) or "-",
                    "(invalid, see below)" if p.get("error") else p.get("description") or "",
                )
                for p in presets
            ),
        )
    )
    for p in presets:
        if p.get("error"):
            click.echo(f"\n{p['name']}: {p['error']}")


@preset.command("show")
@click.argument("name")
def preset_show(name: str) -> None:
    """A built-in preset, its model locations filled in by the API, with every engine's
    full spec."""
    data = _client().get(f"{PRESETS}/{name}")
    for eng in data.get("engines") or []:
        # Unset fields and the preset's own bookkeeping say nothing to a reader.
        spec = eng.get("spec") or {}
        eng["spec"] = {
            k: v for k, v in spec.items() if v is not None and k not in ("preset", "preset_engine")
        }
    # The API sorts keys; a reader wants the preset's identity before its engines.
    order = ("name", "description", "version", "source", "engines")
    click.echo(_yaml({k: data[k] for k in order if k in data}))


def plan_table(plan: list[dict[str, Any]]) -> str:
    """The plan as ENGINE, MODEL, HOST, GPUS, PORT, MEM/GPU, ACTION, then the error and
    reasons of every engine that has any."""
    lines = [
        format_table(
            ("ENGINE", "MODEL", "HOST", "GPUS", "PORT", "MEM/GPU", "ACTION"),
            (
                (
                    e["name"],
                    e.get("model"),
                    e.get("host"),
                    _gpu_list(e.get("gpus") or []),
                    e.get("port"),
                    _gb(e.get("memory_per_gpu_gb")),
                    "already running" if e.get("action") == "skip" else e.get("action"),
                )
                for e in plan
            ),
        )
    ]
    for e in plan:
        if e.get("error") or e.get("reasons"):
            lines.append(f"\n{e['name']}: {e.get('error') or ''}".rstrip())
            lines.extend(f"  {r}" for r in e.get("reasons") or [])
    return "\n".join(lines)


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


def _preset_engines(api: ApiClient, name: str) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in api.get(ENGINES) if (e.get("spec") or {}).get("preset") == name}


class _ApplyCall(threading.Thread):
    """The long apply request, run beside the progress loop."""

    def __init__(self, send: Callable[[ApiClient], Any]) -> None:
        super().__init__(daemon=True, name="preset-apply")
        self._send = send
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        api = ApiClient()  # its own connection pool: the main thread polls meanwhile
        try:
            self.result = self._send(api)
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc
        finally:
            api.close()


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
@click.option("--policy", help="Placement policy: binpack or spread (default: the API's).")
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

    api = _client()
    planned = send(api, plan_only=True)
    preset_name = planned.get("preset") or preset_name
    plan = planned.get("plan") or []
    click.echo(f"plan of preset {preset_name}:")
    click.echo(plan_table(plan))
    if dry_run:
        if not planned.get("ok"):
            _fail(f"preset {preset_name}: some engines cannot be placed (see the plan above)")
        return
    if not planned.get("ok"):
        _fail(f"preset {preset_name}: some engines cannot be placed; nothing was started")
    to_start = [e["name"] for e in plan if e.get("action") == "start"]
    if not to_start:
        click.echo(f"nothing to start: every engine of {preset_name} already runs")
        return
    if not yes:
        if not sys.stdin.isatty():
            _fail("not applying: confirmation needed but stdin is not a terminal; pass --yes")
        click.confirm(
            f"start {len(to_start)} engine(s) of {preset_name} ({', '.join(to_start)})?",
            abort=True,
        )
    _apply_with_progress(api, preset_name, lambda a: send(a, plan_only=False))


def _apply_with_progress(
    api: ApiClient, preset_name: str, send: Callable[[ApiClient], Any]
) -> None:
    """Run the apply request in a thread; meanwhile print state changes of the preset's
    engines; then print the outcome."""
    t0 = time.monotonic()
    # Records the preset already had (skipped engines, old STOPPED ones) only print
    # when they change.
    seen = {eid: _progress_key(e) for eid, e in _preset_engines(api, preset_name).items()}
    call = _ApplyCall(send)
    call.start()
    engines: dict[str, dict[str, Any]] = {}
    try:
        while True:
            finished = not call.is_alive()  # read before the poll: its last view is final
            engines = _preset_engines(api, preset_name)
            for eid, e in engines.items():
                if seen.get(eid) != _progress_key(e):
                    seen[eid] = _progress_key(e)
                    who = e["spec"].get("preset_engine") or _served_name(e)
                    click.echo(f"{_elapsed(t0)} {who} ({eid}): {describe(e)}")
            if finished:
                break
            call.join(PRESET_POLL_S)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: the apply of {preset_name} goes on in the API; follow it with "
            "`sagellm engine list`"
        ) from None
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
    click.echo(f"preset {preset_name} applied in {time.monotonic() - t0:.1f}s:")
    click.echo(format_table(("ENGINE", "ID", "STATE", "URL"), rows))
