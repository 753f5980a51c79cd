"""The host heartbeat: inventory, capacity and engines, published with a TTL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import psutil

from app.core.models import LIVE_STATES, EngineState
from app.state.registry import HostRecord
from workers.agent.context import HostContext
from workers.host.gpu_inventory import engine_pids, gpu_capacities, read_inventory

log = logging.getLogger(__name__)
WORKER_VERSION = "sagellm-worker/0.1.0"


_WILDCARDS = {"0.0.0.0", "::", ""}


def busy_ports(port_range: tuple[int, int], address: str | None = None) -> list[int]:
    """Ports in our range that something listens on at ``address`` (or on every
    address). Listeners on other addresses do not block ours: engines bind to the
    host's address."""
    lo, hi = port_range
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):  # pragma: no cover - platform dependent
        return []
    ports = set()
    for c in conns:
        port = getattr(c.laddr, "port", None)
        ip = getattr(c.laddr, "ip", "")
        if address is not None and ip not in _WILDCARDS and ip != address:
            continue
        if c.status == psutil.CONN_LISTEN and port is not None and lo <= port <= hi:
            ports.add(int(port))
    return sorted(ports)


def publish_heartbeat(ctx: HostContext, *, held_by: Iterable[str] = ()) -> list[str]:
    """Measure the host and publish its record (TTL) and GPU capacity for the ledger.

    Outside memory counts our engines' use only up to what each holds in the ledger.
    Callers hold ``ctx.reclaim_lock`` or know the capacity is there: capacity is
    offered only once this host's running engines hold their reservations (see
    ``rediscovery``): with ``held_by``, nothing is published unless each of those
    engines holds its reservation, and the engines that do not are returned.
    """
    s = ctx.settings
    inventory = read_inventory(s)
    reserved = ctx.ledger.gpu_reservations(ctx.host, [g.uuid for g in inventory.gpus])
    missing = ctx.ledger.publish_capacity(
        ctx.host, gpu_capacities(inventory, ctx.host, engine_pids(), reserved), held_by=held_by
    )
    if missing:
        return missing
    engines = ctx.registry.engines(host=ctx.host, state=LIVE_STATES | {EngineState.LOST})
    ours = set(ctx.ledger.ports(ctx.host))
    record = HostRecord(
        name=ctx.host,
        address=s.host_address,
        port_range=s.port_range,
        gpus=list(inventory.gpus),
        gpu_source=inventory.source,
        engines=[e.id for e in engines],
        busy_ports=[p for p in busy_ports(s.port_range, s.host_address) if p not in ours],
        worker_version=WORKER_VERSION,
    )
    ctx.registry.put_host(record, ttl_s=s.heartbeat_ttl_s)
    return []


class HeartbeatThread(threading.Thread):
    """Publishes every ``SAGELLM_HEARTBEAT_INTERVAL_S`` in the worker's main process,
    so the heartbeat keeps going while tasks run; survives Redis outages."""

    def __init__(self, ctx: HostContext) -> None:
        super().__init__(name="sagellm-heartbeat", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        from workers.agent.reconcile import heartbeat_or_rediscover

        while not self.stopped.is_set():
            try:
                heartbeat_or_rediscover(self.ctx)
            except Exception:  # Redis down, NVML hiccup: try again next beat
                log.exception("heartbeat failed")
            self.stopped.wait(self.ctx.settings.heartbeat_interval_s)

    def stop(self) -> None:
        self.stopped.set()
