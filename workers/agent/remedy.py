"""Automatic remediation of an engine that died at start for lack of GPU memory.

``handle_dead`` (``workers.agent.supervise``) classifies every death
(``app.core.failures``); a memory reason while the engine was STARTING comes here:

* ``kv_cache_too_small``: relaunch on the same GPUs with a ``--max-model-len`` that
  fits, the number vLLM printed (never above what was asked). The reservation stays.
* ``insufficient_free_memory`` / ``cuda_oom``: someone else uses the GPU. This host's
  GPUs are measured again and their capacity published at once
  (``heartbeat.publish_capacity_now``), so that placement sees the memory the failed
  start just ran into on every GPU of this host, not the last heartbeat's; other
  hosts' capacity is as of their last heartbeat. Then re-place on that live state
  without the GPU that failed, on any host (``app.state.allocation.allocate``), and
  relaunch there.

Each is bounded by ``SAGELLM_REMEDIATION_ATTEMPTS`` (per engine) and is an event
(``remediated``) on the engine's timeline, written with the record. What the user
pinned is never changed behind their back: a request that named ``max_model_len`` (or
``--max-model-len`` in its flags) or ``gpu_ids`` fails with the reason and the fix.
When nothing can be done the engine is FAILED for good, its room released, and its
``failure`` says why.

The relaunch is an ordinary due restart (``sagellm.restart_engine`` on the engine's
host's queue): spawn, readiness and the watch are the same as for any restart, and it
counts in ``restart_count``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from app.core.errors import IllegalTransition, NotFoundError, PlacementError, SagellmError
from app.core.failures import MEMORY_REASONS, Failure, Reason
from app.core.models import EngineRecord, EngineState
from app.state.allocation import allocate
from app.state.events import encode_event
from app.state.queues import send_to_host
from workers.agent.context import HostContext
from workers.agent.heartbeat import publish_capacity_now
from workers.agent.lifecycle import fail_final, record_failure
from workers.runtimes.base import user_flags

log = logging.getLogger(__name__)
MIN_MAX_MODEL_LEN = 16  # one KV block: below it an engine serves nothing


def attempts_allowed(ctx: HostContext) -> int:
    """``SAGELLM_REMEDIATION_ATTEMPTS`` (default 2; 0 turns remediation off)."""
    return ctx.settings.remediation_attempts


def applies(ctx: HostContext, rec: EngineRecord, failure: Failure) -> bool:
    """Whether this death is remediation's: a memory reason at start (the process never
    became ready), with remediation on."""
    return (
        failure.reason in MEMORY_REASONS
        and rec.state is EngineState.STARTING
        and attempts_allowed(ctx) > 0
    )


def pinned_max_model_len(rec: EngineRecord) -> int | str | None:
    """What the request pinned the max length to: ``max_model_len`` or the flag in its
    ``extra_args``; None when it is ours to choose."""
    if rec.spec.max_model_len is not None:
        return rec.spec.max_model_len
    flags = user_flags(rec.spec.extra_args, underscores_are_dashes=True)
    return "--max-model-len in extra_args" if "--max-model-len" in flags else None


def remediate(
    ctx: HostContext, rec: EngineRecord, failure: Failure, error: str
) -> EngineRecord | None:
    """Act on a memory failure at start (``applies``): relaunch with a shorter max
    length, re-place on another GPU, or fail for good saying why. ``error`` is the
    death's description (``last_error``). Called under the engine's lock."""
    allowed = attempts_allowed(ctx)
    if rec.remediations >= allowed:
        return _give_up(
            ctx, rec, failure, error, f"gave up after {rec.remediations} remediation(s)"
        )
    if failure.reason == Reason.KV_CACHE_TOO_SMALL:
        return _shorten(ctx, rec, failure, error)
    return _replace(ctx, rec, failure, error)


def _give_up(
    ctx: HostContext, rec: EngineRecord, failure: Failure, error: str, why: str
) -> EngineRecord | None:
    message = f"{error}; {failure.reason}, {why}: {failure.advice}"
    return fail_final(ctx, rec.id, message, pid=rec.pid, failure=failure)


def _relaunch(ctx: HostContext, rec: EngineRecord, host: str) -> None:
    send_to_host(ctx.celery, host, "sagellm.restart_engine", (rec.id,), expires_s=60)


def _mark_remediated(r: EngineRecord, pid: int | None, failure: Failure, error: str) -> None:
    """The record's side of a remediation: a restart due now, the failure recorded, one
    more remediation counted."""
    r.pend_restart(
        error, pid=pid, exit_code=failure.exit_code, restart_count=r.restart_count, at=time.time()
    )
    record_failure(r, failure)
    r.remediations += 1


# ----------------------------------------------------------------------------- length


def fitting_max_model_len(rec: EngineRecord, failure: Failure) -> int | None:
    """The max length to relaunch with: the tokens vLLM said its KV cache holds, never
    above what was asked (the launch's, else the model's own that vLLM printed); None
    when no shorter length can help."""
    fits = failure.details.get("kv_cache_tokens")
    asked = rec.launch.get("max_model_len") or failure.details.get("max_model_len")
    if not fits or fits < MIN_MAX_MODEL_LEN:
        return None
    new = int(fits) if asked is None else min(int(fits), int(asked))
    if asked is not None and new >= int(asked):
        return None  # not shorter: vLLM would fail the same way
    return new


def _shorten(
    ctx: HostContext, rec: EngineRecord, failure: Failure, error: str
) -> EngineRecord | None:
    pinned = pinned_max_model_len(rec)
    if pinned is not None:
        return _give_up(
            ctx, rec, failure, error, f"not remediated: the request pinned max_model_len ({pinned})"
        )
    new = fitting_max_model_len(rec, failure)
    if new is None:
        return _give_up(ctx, rec, failure, error, "no shorter max_model_len fits")
    old = rec.launch.get("max_model_len") or failure.details.get("max_model_len")
    n = rec.remediations + 1
    message = (
        f"{failure.reason}: relaunching with max_model_len {new} (was {old or 'the model default'}"
        f"), remediation {n} of {attempts_allowed(ctx)}"
    )

    def mutate(r: EngineRecord) -> None:
        _mark_remediated(r, rec.pid, failure, error)
        r.launch = {**r.launch, "max_model_len": new}

    event = encode_event(
        "remediated",
        message,
        reason=failure.reason,
        action="max_model_len",
        max_model_len=new,
        previous=old,
        attempt=n,
    )
    try:
        updated = ctx.registry.update(rec.id, mutate, events=[event])
    except (NotFoundError, IllegalTransition):
        return None  # stopped or changed meanwhile: its new owner decides
    log.warning("engine %s: %s", rec.id, message)
    _relaunch(ctx, updated, ctx.host)
    return updated


# ----------------------------------------------------------------------------- placement


def failed_gpus(rec: EngineRecord, failure: Failure) -> list[str]:
    """The uuids of the GPUs to leave: the one CUDA named (an index among the engine's
    visible GPUs), else all of the engine's (vLLM's free-memory check does not say
    which of several)."""
    index = failure.details.get("gpu")
    if isinstance(index, int) and 0 <= index < len(rec.gpus):
        return [rec.gpus[index].uuid]
    return [g.uuid for g in rec.gpus]


def _replace(
    ctx: HostContext, rec: EngineRecord, failure: Failure, error: str
) -> EngineRecord | None:
    if rec.spec.gpu_ids is not None:
        return _give_up(
            ctx,
            rec,
            failure,
            error,
            f"not re-placed: the request pinned gpu_ids {list(rec.spec.gpu_ids)}",
        )
    # GPUs left by earlier re-placements of this start stay left (``failure.details``).
    earlier = (rec.failure or {}).get("details", {}).get("excluded_gpus", [])
    exclude = list(
        dict.fromkeys([*(earlier if rec.remediations else []), *failed_gpus(rec, failure)])
    )
    failure = dataclasses.replace(failure, details={**failure.details, "excluded_gpus": exclude})
    before = _where(rec)
    try:
        publish_capacity_now(ctx)  # what the failed start saw, on every GPU of this host
    except Exception:  # NVML or Redis hiccup: place on the last heartbeat's capacity
        log.exception("engine %s: this host's capacity not measured again", rec.id)
    n = rec.remediations + 1
    # The room moves in one atomic write: the new room is taken, the old one given up
    # and the record re-placed together (``ReserveRequest.move``). If nothing fits,
    # nothing changed, and it fails for good (that write releases what it held).
    try:
        _, updated = allocate(
            rec.id,
            rec.spec,
            ctx.registry,
            ctx.ledger,
            policy=ctx.settings.placement_policy,
            margin_mib=ctx.settings.gpu_safety_margin_mib,
            default_max_model_len=ctx.settings.default_max_model_len,
            mutate=lambda r: _mark_remediated(r, rec.pid, failure, error),
            exclude_gpus=exclude,
            move=True,
        )
    except (NotFoundError, IllegalTransition):
        return None
    except (PlacementError, SagellmError) as exc:
        reasons = "; ".join(getattr(exc, "reasons", []) or []) or exc.message
        return _give_up(ctx, rec, failure, error, f"no other GPU has room ({reasons})")
    after = _where(updated)
    message = (
        f"{failure.reason}: re-placed from {before} to {after}, "
        f"remediation {n} of {attempts_allowed(ctx)}"
    )
    ctx.registry.events.add(
        rec.id,
        "remediated",
        message,
        reason=failure.reason,
        action="replaced",
        host=updated.host,
        gpus=[g.index for g in updated.gpus],
        excluded=exclude,
        attempt=n,
    )
    log.warning("engine %s: %s", rec.id, message)
    if updated.host != ctx.host:
        ctx.manifests.remove(rec.id)  # the new host's worker writes its own
    assert updated.host is not None
    _relaunch(ctx, updated, updated.host)
    return updated


def _where(rec: EngineRecord) -> str:
    gpus: Sequence[str] = [str(g.index) for g in rec.gpus]
    return f"host {rec.host} GPU {','.join(gpus) or 'none'}"
