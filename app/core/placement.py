"""Where an engine runs: host, GPUs and port. Pure; the one file that answers
"why did this engine land on GPU 1".

Candidates flow through small filters (host pinned and up, enough GPUs, pinned
``gpu_ids``, memory fit per GPU, a free port) and the survivors are ranked by a named
policy. Every rejection carries a sentence a person can act on, e.g.
``host a, GPU 0: 21.9 GB free, 33.0 GB needed``. The same function serves a dry run
(plan only) and a real start (the caller then reserves the result in the ledger, which
re-checks atomically).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from app.core.errors import PlacementError, UnknownPolicyError, ValidationError
from app.core.gpus import GpuCapacity, mib_to_gb
from app.core.memory import ModelFacts


@dataclass(frozen=True)
class PlacementHost:
    """A host as placement sees it: live GPU capacity, ledger state, port range, and
    the models on its disk (by id or path) with the facts its worker measured."""

    name: str
    address: str
    gpus: tuple[GpuCapacity, ...]
    port_range: tuple[int, int]
    ports_taken: frozenset[int] = frozenset()
    engine_count: int = 0
    up: bool = True
    # GPUs its heartbeat reports; ``gpus`` can be empty for a moment while the host
    # re-takes its engines' room after a lost Redis (a full cluster, not bad input).
    inventory_gpus: int = 0
    models: Mapping[str, ModelFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementRequest:
    """What one engine needs, after its memory estimate."""

    gpu_count: int
    memory_mib_per_gpu: int
    host: str | None = None
    gpu_ids: tuple[int, ...] | None = None
    port: int | None = None
    label: str = "engine"
    # Only these hosts may take it (they have the model's files), and what the others lack.
    only_hosts: frozenset[str] | None = None
    only_hosts_reason: str = "does not have the model's files"

    def __post_init__(self) -> None:
        if self.gpu_count < 0:
            raise ValidationError("gpu count must be >= 0", field="tensor_parallel")
        if self.memory_mib_per_gpu < 0:
            raise ValidationError(
                f"required_memory_gb: must be >= 0, got {self.memory_mib_per_gpu} MiB",
                field="required_memory_gb",
            )


@dataclass(frozen=True)
class Placement:
    host: str
    address: str
    gpus: tuple[GpuCapacity, ...]
    memory_mib_per_gpu: int
    port: int

    def describe(self) -> str:
        gpus = ",".join(str(g.index) for g in self.gpus) or "none"
        mem = f", {mib_to_gb(self.memory_mib_per_gpu)} GB/GPU" if self.gpus else ""
        return f"host {self.host}, GPUs {gpus}, port {self.port}{mem}"


# ----------------------------------------------------------------------------- policies


class PlacementPolicy:
    """Ranks GPUs within a host and hosts against each other. Lower keys win."""

    name = ""

    def gpu_key(self, gpu: GpuCapacity, margin_mib: int) -> tuple[float, ...]:
        raise NotImplementedError

    def host_key(
        self, host: PlacementHost, chosen: Sequence[GpuCapacity], margin_mib: int
    ) -> tuple[float, ...]:
        raise NotImplementedError


class BinpackPolicy(PlacementPolicy):
    """Fill the fullest GPU that still fits: keeps whole GPUs free for big models."""

    name = "binpack"

    def gpu_key(self, gpu: GpuCapacity, margin_mib: int) -> tuple[float, ...]:
        return (gpu.available_mib(margin_mib), gpu.index)

    def host_key(
        self, host: PlacementHost, chosen: Sequence[GpuCapacity], margin_mib: int
    ) -> tuple[float, ...]:
        leftover = sum(g.available_mib(margin_mib) for g in chosen)
        # CPU-only engines (no GPUs chosen): pack onto the busiest host.
        return (leftover, -host.engine_count, 0)


class SpreadPolicy(PlacementPolicy):
    """Use the emptiest GPU and host: spreads load and memory bandwidth."""

    name = "spread"

    def gpu_key(self, gpu: GpuCapacity, margin_mib: int) -> tuple[float, ...]:
        return (-gpu.available_mib(margin_mib), gpu.index)

    def host_key(
        self, host: PlacementHost, chosen: Sequence[GpuCapacity], margin_mib: int
    ) -> tuple[float, ...]:
        worst = min((g.available_mib(margin_mib) for g in chosen), default=0)
        return (-worst, host.engine_count, 0)


POLICIES: dict[str, type[PlacementPolicy]] = {p.name: p for p in (BinpackPolicy, SpreadPolicy)}
DEFAULT_POLICY = BinpackPolicy.name


def make_policy(name: str) -> PlacementPolicy:
    """The policy registered under ``name``; an unknown name is an error, not a fallback."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise UnknownPolicyError(
            f"policy: unknown placement policy {name!r}; known: {', '.join(sorted(POLICIES))}",
            field="policy",
        ) from None


# ----------------------------------------------------------------------------- pipeline


def _gb(mib: int) -> str:
    return f"{mib_to_gb(mib):.1f} GB"


def _fits_host(
    req: PlacementRequest, host: PlacementHost, policy: PlacementPolicy, margin_mib: int
) -> tuple[list[GpuCapacity] | None, list[str]]:
    """Choose GPUs on one host, or return the reasons it cannot take the engine."""
    if not host.up:
        return None, [f"host {host.name}: down (no heartbeat)"]
    if req.only_hosts is not None and host.name not in req.only_hosts:
        return None, [f"host {host.name}: {req.only_hosts_reason}"]
    if req.gpu_count == 0:
        return [], []
    if len(host.gpus) < req.gpu_count:
        return None, [
            f"host {host.name}: {len(host.gpus)} GPU(s), {req.gpu_count} needed "
            "(tensor_parallel x pipeline_parallel; all on one host)"
        ]
    by_index = {g.index: g for g in host.gpus}
    if req.gpu_ids is not None:
        missing = [i for i in req.gpu_ids if i not in by_index]
        if missing:
            return None, [f"host {host.name}: no GPU {missing[0]} (has {sorted(by_index)})"]
        pool = [by_index[i] for i in req.gpu_ids]
    else:
        pool = list(host.gpus)
    reasons = []
    fitting = []
    for gpu in pool:
        free = gpu.available_mib(margin_mib)
        if free >= req.memory_mib_per_gpu:
            fitting.append(gpu)
        else:
            reasons.append(
                f"host {host.name}, GPU {gpu.index}: {_gb(max(free, 0))} free, "
                f"{_gb(req.memory_mib_per_gpu)} needed"
            )
    if len(fitting) < req.gpu_count:
        if not reasons:  # pragma: no cover - defensive, pool >= gpu_count here
            reasons.append(f"host {host.name}: not enough GPUs fit")
        return None, reasons
    fitting.sort(key=lambda g: policy.gpu_key(g, margin_mib))
    return fitting[: req.gpu_count], []


def _pick_port(req: PlacementRequest, host: PlacementHost) -> tuple[int | None, str | None]:
    lo, hi = host.port_range
    if req.port is not None:
        if not lo <= req.port <= hi:
            return None, f"host {host.name}: port {req.port} is outside its range {lo}-{hi}"
        if req.port in host.ports_taken:
            return None, f"host {host.name}: port {req.port} is already reserved"
        return req.port, None
    for port in range(lo, hi + 1):
        if port not in host.ports_taken:
            return port, None
    return None, f"host {host.name}: every port in {lo}-{hi} is reserved"


def candidates(
    req: PlacementRequest,
    hosts: Iterable[PlacementHost],
    policy: PlacementPolicy,
    margin_mib: int,
) -> tuple[list[Placement], list[str]]:
    """All hosts that can take the engine, best first, and the reasons for the others."""
    if req.host is not None and not any(h.name == req.host for h in hosts):
        known = ", ".join(sorted(h.name for h in hosts)) or "none"
        raise PlacementError(f"host {req.host!r} is not known (known hosts: {known})")
    ranked: list[tuple[tuple[float, ...], Placement]] = []
    reasons: list[str] = []
    for host in sorted(hosts, key=lambda h: h.name):
        if req.host is not None and host.name != req.host:
            continue
        chosen, why = _fits_host(req, host, policy, margin_mib)
        if chosen is None:
            reasons.extend(why)
            continue
        port, port_why = _pick_port(req, host)
        if port is None:
            reasons.append(port_why or f"host {host.name}: no port")
            continue
        placement = Placement(
            host=host.name,
            address=host.address,
            gpus=tuple(chosen),
            memory_mib_per_gpu=req.memory_mib_per_gpu if chosen else 0,
            port=port,
        )
        ranked.append((policy.host_key(host, chosen, margin_mib), placement))
    ranked.sort(key=lambda kp: (kp[0], kp[1].host))
    return [p for _, p in ranked], reasons


def _check_request_fits_cluster(req: PlacementRequest, hosts: Sequence[PlacementHost]) -> None:
    """Bad input, as opposed to a full cluster: no host could ever take this engine."""
    pool = [h for h in hosts if req.host is None or h.name == req.host]
    if not pool:
        return  # unknown pinned host: reported by ``candidates``
    where = f"host {req.host}" if req.host else "the largest host"
    if req.gpu_count > 0:
        most = max(max(len(h.gpus), h.inventory_gpus) for h in pool)
        if req.gpu_count > most:
            raise ValidationError(
                f"tensor_parallel: {req.gpu_count} GPUs needed on one host (tensor_parallel x "
                f"pipeline_parallel) but {where} has {most}",
                field="tensor_parallel",
            )
    if req.port is not None and not any(
        h.port_range[0] <= req.port <= h.port_range[1] for h in pool
    ):
        ranges = ", ".join(f"{h.name}: {h.port_range[0]}-{h.port_range[1]}" for h in pool)
        raise ValidationError(
            f"port: {req.port} is outside the engine port range ({ranges})", field="port"
        )


def place(
    req: PlacementRequest,
    hosts: Iterable[PlacementHost],
    policy: PlacementPolicy | str,
    margin_mib: int,
) -> Placement:
    """The best placement for ``req``, or ``PlacementError`` explaining every rejection."""
    hosts = list(hosts)
    if isinstance(policy, str):
        policy = make_policy(policy)
    if not hosts:
        raise PlacementError("no host is up: start a worker (flask sagellm worker)")
    _check_request_fits_cluster(req, hosts)
    found, reasons = candidates(req, hosts, policy, margin_mib)
    if not found:
        what = (
            f"{req.gpu_count} GPU(s) with {_gb(req.memory_mib_per_gpu)} each"
            if req.gpu_count
            else "a host with a free port"
        )
        raise PlacementError(f"no room for {req.label}: needs {what}", reasons)
    return found[0]


def explain(
    req: PlacementRequest,
    hosts: Iterable[PlacementHost],
    policy: PlacementPolicy | str,
    margin_mib: int,
) -> list[str]:
    """Human-readable lines: the ranked candidates, then why the others were rejected."""
    if isinstance(policy, str):
        policy = make_policy(policy)
    found, reasons = candidates(req, list(hosts), policy, margin_mib)
    lines = [f"candidate {i + 1}: {p.describe()}" for i, p in enumerate(found)]
    return lines + [f"rejected: {r}" for r in reasons]


def apply_placement(hosts: Sequence[PlacementHost], p: Placement) -> list[PlacementHost]:
    """Hosts as they would be after ``p`` is reserved: lets a dry run plan several engines."""
    out = []
    for host in hosts:
        if host.name != p.host:
            out.append(host)
            continue
        chosen = {g.uuid for g in p.gpus}
        gpus = tuple(
            replace(g, reserved_mib=g.reserved_mib + p.memory_mib_per_gpu)
            if g.uuid in chosen
            else g
            for g in host.gpus
        )
        out.append(
            replace(
                host,
                gpus=gpus,
                ports_taken=host.ports_taken | {p.port},
                engine_count=host.engine_count + 1,
            )
        )
    return out
