"""The host heartbeat: inventory, capacity and engines, published with a TTL; and the
facts of the models on this host's disk, published when they change."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

import psutil

from app.core.gpus import GpuCapacity
from app.core.memory import ModelFacts, hub_cache_dir, is_path_like
from app.core.models import LIVE_STATES, STOPPING_STATES, EngineState, HostRecord
from app.settings import Settings
from app.state.model_facts import model_facts_published, publish_model_facts
from workers.agent.context import HostContext
from workers.host.gpu_inventory import Inventory, engine_pids, gpu_capacities, read_inventory
from workers.host.model_facts import ModelScanner

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
    inventory, capacity, _ = measure_capacity(ctx)
    missing = ctx.ledger.publish_capacity(ctx.host, capacity, held_by=held_by)
    if missing:
        return missing
    engines = ctx.registry.engines(host=ctx.host, state=LIVE_STATES | {EngineState.LOST})
    # Before the host record: a host is seen up only with its models' facts in place.
    try:
        model_facts_of(ctx).publish(ctx, [e.spec.model for e in engines])
    except Exception:  # a disk or parse surprise must not stop the heartbeat
        log.exception("model facts of %s not published", ctx.host)
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


def measure_capacity(ctx: HostContext) -> tuple[Inventory, list[GpuCapacity], list[str]]:
    """This host's GPUs now (NVML, or the mock spec), their capacity as placement sees
    it (outside memory counts our engines' use only up to what each holds), and the
    engines that hold GPU memory on this host in the ledger."""
    inventory = read_inventory(ctx.settings)
    reserved = ctx.ledger.gpu_reservations(ctx.host, [g.uuid for g in inventory.gpus])
    holders = sorted({eid for held in reserved.values() for eid in held})
    # An evicted engine handed its room to another while its process still runs: that
    # memory is ours (the new engine spawns after it is gone), not outside.
    for victim in ctx.registry.engines(host=ctx.host, state=STOPPING_STATES):
        if victim.evicted_for is not None:
            for g in victim.gpus:
                reserved.setdefault(g.uuid, {})[victim.id] = g.memory_mib
    return inventory, gpu_capacities(inventory, ctx.host, engine_pids(), reserved), holders


def publish_capacity_now(ctx: HostContext) -> bool:
    """Measure this host's GPUs and publish their capacity at once, between
    heartbeats (a start just failed for lack of memory: placement must see what it
    saw). Only while the capacity is offered: if Redis lost it (or loses it meanwhile:
    the engines holding room here must still hold it, checked in the same atomic step
    as the publish), rediscovery re-takes their room first and publishes then. Returns
    whether it published. It takes no lock: its caller may hold an engine's, which
    rediscovery takes under ``ctx.reclaim_lock``; a heartbeat racing it publishes a
    measurement as recent."""
    if not ctx.ledger.has_capacity(ctx.host):
        return False
    _, capacity, holders = measure_capacity(ctx)
    return not ctx.ledger.publish_capacity(ctx.host, capacity, held_by=holders)


# Directories are walked again at most this often; engines' new paths are read at once.
MODEL_SCAN_INTERVAL_S = 10.0


class ModelFactsPublisher:
    """Scans this host's models now and then (``workers.host.model_facts``) and
    publishes their facts when the scan changed, or when Redis lost them."""

    def __init__(self, scanner: ModelScanner, interval_s: float = MODEL_SCAN_INTERVAL_S) -> None:
        self.scanner = scanner
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._scanned_at: float | None = None
        self._engine_paths: frozenset[str] = frozenset()
        self._facts: dict[str, ModelFacts] = {}
        self._published: dict[str, ModelFacts] | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> ModelFactsPublisher:
        """Scanning the model roots (``SAGELLM_MODEL_ROOTS``, else the defaults) and
        this process's Hugging Face hub cache."""
        roots = settings.engine_policy(os.environ).model_roots
        return cls(ModelScanner(roots, hub_cache_dir(os.environ)))

    def publish(self, ctx: HostContext, engine_models: Iterable[str] = ()) -> bool:
        """Scan when due, publish when changed; True when something was published."""
        paths = frozenset(m for m in engine_models if is_path_like(m))
        with self._lock:
            now = time.monotonic()
            due = self._scanned_at is None or now - self._scanned_at >= self.interval_s
            if due or not paths <= self._engine_paths:
                self._facts = self.scanner.scan(paths)
                self._scanned_at, self._engine_paths = now, paths
            r = ctx.registry.r
            lost = bool(self._facts) and not model_facts_published(r, ctx.host)
            if self._facts == self._published and not lost:
                return False
            publish_model_facts(r, ctx.host, self._facts)
            self._published = dict(self._facts)
            return True


_publishers_lock = threading.Lock()


def model_facts_of(ctx: HostContext) -> ModelFactsPublisher:
    """This host's publisher, one per worker (``ctx``)."""
    with _publishers_lock:
        if not isinstance(ctx.model_facts, ModelFactsPublisher):
            ctx.model_facts = ModelFactsPublisher.for_settings(ctx.settings)
        return ctx.model_facts
