"""The ``sagellm`` command group (also ``flask sagellm``): every command, registered here.

Commands live by subject: ``cluster`` (status, gpu, backends, host), ``engines``
(engine ...), ``presets`` (preset ...), ``stack`` (worker, beat, flower, up, down).
The REST commands talk to the API at ``SAGELLM_API_URL`` through ``client`` and print
through ``render``; each is thin: build one request, send it, show the answer. Rules
(validation, placement, presets) live in the API and ``app.core``; the CLI never decides
anything the API would decide differently, and takes its choices (kinds, runtimes,
states, policies) from ``app.core``.

Output: tables and a live per-engine status on a terminal; plain columns and one line
per state change when stdout is not a terminal; ``-o json`` (or ``-o yaml``) on every
list and show command prints the API's data unchanged. Errors go to stderr as the
API's ``message``, then its ``reasons`` indented.

Exit codes:

===  ======================================================================================
 0   done.
 1   failed: the API is unreachable or answered an error (no worker alive, a 5xx); nothing
     fits now (409: every GPU too full, no host up, an unknown ``--host``); no engine
     matches the name given; an engine ended FAILED or STOPPED, or a restart was refused
     because it is stopped; a wait timed out; a confirmation was declined.
 2   invalid input, nothing was reserved or started: a bad option or argument (click's
     usage errors); a request the API rejected as invalid (400/422: a bad field, more
     GPUs than any host has, a port outside every host's range); an unknown preset; a
     malformed preset file; an engine name that matches several engines.
130  interrupted (Ctrl-C) while following: what the API was doing goes on.
===  ======================================================================================
"""

from __future__ import annotations

import click

from app.cli.cluster import backends, gpu, host, models, status
from app.cli.engines import engine
from app.cli.external import register
from app.cli.presets import preset
from app.cli.stack import FLOWER_OPEN_API_VAR, beat, down, flower, flower_argv, up, worker

__all__ = ["FLOWER_OPEN_API_VAR", "flower", "flower_argv", "main", "sagellm"]


@click.group(name="sagellm", help="sagellm: control plane for LLM and embedding engines.")
def sagellm() -> None:
    pass


for _command in (
    # the stack's processes
    up,
    down,
    worker,
    beat,
    flower,
    # the cluster
    status,
    gpu,
    backends,
    models,
    host,
    # engines and presets
    engine,
    preset,
):
    sagellm.add_command(_command)
engine.add_command(register)  # external engines: app/cli/external.py


def main() -> None:
    """Entry point of the ``sagellm`` console script."""
    sagellm(prog_name="sagellm")
