"""Every Redis key the control plane uses. Nothing else spells a key name.

All keys share one prefix so a shared Redis can host other data, and so that a
``FLUSHALL`` drill can be told apart from another application's keys.
"""

from __future__ import annotations

PREFIX = "sagellm:"


# Ledger ---------------------------------------------------------------------------
# hash uuid -> JSON {"index", "total_mib", "outside_mib"}: what the host's worker last
# measured. Reservations are checked against it atomically.
def gpu_capacity(host: str) -> str:
    return f"{PREFIX}ledger:gpus:{host}"


# string, set whenever a host's capacity is published (also for a host with no GPU):
# absent means Redis lost it, and the host must re-take its engines' room first.
def capacity_published(host: str) -> str:
    return f"{PREFIX}ledger:published:{host}"


# Lua builds the per-GPU and port keys from these prefixes (it must, to release what a
# record names), as the two functions below do.
GPU_RESERVATIONS_PREFIX = f"{PREFIX}ledger:gpu:"
PORT_RESERVATIONS_PREFIX = f"{PREFIX}ledger:ports:"


# hash engine_id -> MiB reserved on that GPU
def gpu_reservations(host: str, uuid: str) -> str:
    return f"{GPU_RESERVATIONS_PREFIX}{host}:{uuid}"


# hash port -> engine_id
def port_reservations(host: str) -> str:
    return f"{PORT_RESERVATIONS_PREFIX}{host}"


# hash {host, port, gpus(JSON [[uuid, mib], ...])}: what to release, exactly once
def engine_reservation(engine_id: str) -> str:
    return f"{PREFIX}ledger:engine:{engine_id}"


# set of engine ids holding a reservation
RESERVED_ENGINES = f"{PREFIX}ledger:engines"

# Registry -------------------------------------------------------------------------
ENGINES = f"{PREFIX}engines"  # set of engine ids


def engine(engine_id: str) -> str:
    return f"{PREFIX}engine:{engine_id}"


# pub/sub channel: JSON {"id", "state", "seq"} published by the record write script on
# every write of a record ("DELETED" when it is deleted), so waiters need not poll
ENGINE_CHANGES = f"{PREFIX}engine-changes"

# Write sequence (``app.state.ledger``'s commit script): a counter bumped by every write
# of a record or a reservation; started from Redis' clock in microseconds when absent,
# so a number is never handed out twice, even after Redis lost everything.
WRITE_SEQ = f"{PREFIX}seq"
# sorted set engine id -> the write sequence number of its record's last write
RECORD_SEQS = f"{PREFIX}seq:records"
# string: the write sequence number of the last change of any reservation
LEDGER_SEQ = f"{PREFIX}seq:ledger"


def engine_events(engine_id: str) -> str:
    """List of JSON events of one engine, oldest first, bounded; deleted with the record."""
    return f"{PREFIX}events:{engine_id}"


def external_api_key(engine_id: str) -> str:
    """String: the API key of an external engine, never in its record; deleted with the
    record (``ledger._COMMIT``)."""
    return f"{PREFIX}external-key:{engine_id}"


HOSTS = f"{PREFIX}hosts"  # set of host names ever seen


def host(name: str) -> str:
    """Heartbeat record of a host, with a TTL: absent means DOWN."""
    return f"{PREFIX}host:{name}"


def host_last_seen(name: str) -> str:
    """Last heartbeat record of a host, without TTL: what a DOWN host looked like."""
    return f"{PREFIX}host-last:{name}"


# Gateway ---------------------------------------------------------------------------
def gateway_report(process_id: str) -> str:
    """JSON report of one gateway process (in flight, write number heard, request ages:
    app.state.gateway_report), with a TTL."""
    return f"{PREFIX}gateway:report:{process_id}"


# Counters of the on-demand lifecycle (HINCRBY): cold starts, idle stops, evictions,
# and the cold-start duration histogram's buckets, sum and count.
ON_DEMAND_COUNTERS = f"{PREFIX}counters:on_demand"


# Metrics ---------------------------------------------------------------------------
# hash "<task>|count" / "<task>|seconds" / "<task>|failures" -> number, written by workers
TASK_STATS = f"{PREFIX}metrics:tasks"

# Beat ------------------------------------------------------------------------------
# string: the token of the one running beat, with a TTL it keeps renewing (Lua CAS)
BEAT_LOCK = f"{PREFIX}beat:lock"


# Model facts ---------------------------------------------------------------------
# hash model id or path -> JSON ModelFacts: the models a host's worker found on its
# disk, replaced as a whole whenever its scan changes (app.state.model_facts)
def model_facts(host: str) -> str:
    return f"{PREFIX}models:{host}"
