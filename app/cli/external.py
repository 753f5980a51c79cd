"""``sagellm engine register``: an external engine, an OpenAI-compatible endpoint that
sagellm did not start (``app.core.external``), routed to by the gateway.

The endpoint's API key is never an option value: arguments are readable by every user
of the machine (``ps``, ``/proc/<pid>/cmdline``) and stay in shell history. It is read
from an environment variable named with ``--api-key-env`` or from standard input with
``--api-key-stdin`` (a hidden prompt on a terminal), sent once in the request body, and
never printed: the API answers ``api_key_set``. ``sagellm engine stop`` forgets it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from app.cli.client import ENGINES, CliError, InvalidInput, connect
from app.cli.render import describe, emit_data, output_option, served_name
from app.core.external import probed
from app.core.models import EngineRecord
from app.core.spec import KINDS

# Seconds the API waits for the first probe; the request may take that long and more.
REQUEST_SLACK_S = 10.0


def read_api_key(env_var: str | None, from_stdin: bool) -> str | None:
    """The key from the environment variable ``env_var`` or from stdin (one line; a
    hidden prompt on a terminal); None when neither is asked for."""
    if env_var and from_stdin:
        raise InvalidInput("give --api-key-env or --api-key-stdin, not both")
    if env_var:
        key = os.environ.get(env_var, "")
        if not key:
            raise InvalidInput(f"--api-key-env {env_var}: that environment variable is not set")
        return key
    if not from_stdin:
        return None
    if sys.stdin.isatty():
        key = click.prompt("API key", hide_input=True, err=True)
    else:
        key = sys.stdin.readline()
    key = str(key).strip()
    if not key:
        raise InvalidInput("--api-key-stdin: no key was read from standard input")
    return key


@click.command("register")
@click.option(
    "--url",
    "base_url",
    required=True,
    help="The endpoint's base URL, http(s)://host[:port][/prefix], with or without /v1.",
)
@click.option(
    "--served-model-name", required=True, help="The model name it serves (its /v1/models)."
)
@click.option("--kind", type=click.Choice(KINDS), default="llm", show_default=True)
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="Read the endpoint's API key from this environment variable.",
)
@click.option(
    "--api-key-stdin",
    is_flag=True,
    help="Read the endpoint's API key from standard input (a hidden prompt on a terminal).",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the first probe.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait.")
@output_option
def register(
    base_url: str,
    served_model_name: str,
    kind: str,
    api_key_env: str | None,
    api_key_stdin: bool,
    wait: bool,
    timeout: float,
    output: str,
) -> None:
    """Register an external engine: an OpenAI-compatible endpoint that sagellm did not
    start. The gateway routes the served model name to it while its probe (GET
    <url>/v1/models, every health interval) passes. Nothing is reserved, started or
    stopped for it; `sagellm engine stop` forgets it.

    The API key is never taken on the command line (arguments are visible to every user
    of the machine and stay in shell history): use --api-key-env VAR or --api-key-stdin.
    """
    body: dict[str, Any] = {
        "base_url": base_url,
        "served_model_name": served_model_name,
        "kind": kind,
    }
    key = read_api_key(api_key_env, api_key_stdin)
    if key is not None:
        body["api_key"] = key
    rec = connect().request(
        "POST",
        f"{ENGINES}/register",
        params={"wait": wait, "timeout": timeout if wait else None},
        json=body,
        timeout_s=timeout + REQUEST_SLACK_S,
    )
    if output != "text":
        emit_data(rec, output)
        return
    eid = rec["id"]
    click.echo(
        f"engine {eid}: external {kind} endpoint {rec.get('external_url')} as "
        f"{served_name(rec)} (API key {'set' if rec.get('api_key_set') else 'none'})"
    )
    if wait and not probed(EngineRecord.from_dict(rec)):
        raise CliError(
            f"engine {eid} is registered, but no worker probed it within {timeout:g}s: "
            "the gateway routes to it once a probe passes (is a worker running? "
            "`sagellm status`)"
        )
    click.echo(f"engine {eid}: {describe(rec)}")
