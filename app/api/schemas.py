"""Request and response schemas, declared once: validation, OpenAPI docs and dumps."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from app.core.models import EngineState
from app.core.placement import POLICIES
from app.core.spec import KINDS, NAME_RE, EngineSpecSchema

_NAME = validate.Regexp(NAME_RE, error="1-128 letters, digits or ._:/-")
STATES = [s.value for s in EngineState]


class EngineCreateSchema(EngineSpecSchema):
    """An engine start: the spec (``app.core.spec``'s one schema), and the placement
    policy to use for it."""

    policy = fields.String(
        allow_none=True, load_default=None, validate=validate.OneOf(sorted(POLICIES))
    )

    @ma.post_load
    def make_spec(self, data: dict[str, Any], **kw: Any) -> Any:
        """``{"spec": EngineSpec, "policy": str | None}``."""
        data = dict(data)
        policy = data.pop("policy", None)
        return {"spec": super().make_spec(data, **kw), "policy": policy}


class WaitArgsSchema(ma.Schema):
    wait = fields.Boolean(
        load_default=False, metadata={"description": "Answer when RUNNING or FAILED"}
    )
    timeout = fields.Float(load_default=600.0, validate=validate.Range(0, 3600))


class EngineListArgsSchema(ma.Schema):
    state = fields.String(validate=validate.OneOf(STATES))
    host = fields.String(validate=_NAME)
    kind = fields.String(validate=validate.OneOf(KINDS))
    label = fields.String(validate=_NAME)


class LogArgsSchema(ma.Schema):
    tail = fields.Integer(load_default=100, validate=validate.Range(1, 10000))


class PruneArgsSchema(ma.Schema):
    older_than_s = fields.Float(
        load_default=None,
        allow_none=True,
        validate=validate.Range(0, 10 * 365 * 86400),
        metadata={"description": "Default: SAGELLM_PRUNE_AFTER_S"},
    )


class GpuAssignmentSchema(ma.Schema):
    index = fields.Integer()
    uuid = fields.String()
    memory_mib = fields.Integer()


class EngineFailureSchema(ma.Schema):
    reason = fields.String(
        metadata={
            "description": "kv_cache_too_small, insufficient_free_memory, cuda_oom, "
            "port_in_use, model_not_found, missing_runtime, start_timeout, unresponsive, "
            "killed_by_signal or unknown"
        }
    )
    evidence = fields.String(metadata={"description": "The log line it was read from."})
    advice = fields.String(metadata={"description": "What to do about it."})
    exit_code = fields.Integer(allow_none=True)
    signal = fields.Integer(allow_none=True)
    details = fields.Dict()
    at = fields.Float(allow_none=True)


class EngineSchema(ma.Schema):
    id = fields.String()
    spec = fields.Dict()
    state = fields.String(validate=validate.OneOf(STATES))
    host = fields.String(allow_none=True)
    address = fields.String(allow_none=True)
    port = fields.Integer(allow_none=True)
    base_url = fields.String(allow_none=True)
    gpus = fields.List(fields.Nested(GpuAssignmentSchema))
    memory_per_gpu_mib = fields.Integer()
    launch = fields.Dict()
    pid = fields.Integer(allow_none=True)
    process_create_time = fields.Float(allow_none=True)
    created_at = fields.Float()
    updated_at = fields.Float()
    state_changed_at = fields.Float()
    restart_count = fields.Integer()
    last_error = fields.String(allow_none=True)
    task_id = fields.String(allow_none=True)
    exit_code = fields.Integer(allow_none=True)
    log_path = fields.String(allow_none=True)
    start_deadline = fields.Float(allow_none=True)
    next_restart_at = fields.Float(allow_none=True)
    health_failures = fields.Integer()
    last_health_at = fields.Float(allow_none=True)
    running_since = fields.Float(
        allow_none=True, metadata={"description": "When this process became ready."}
    )
    failure = fields.Nested(
        EngineFailureSchema,
        allow_none=True,
        metadata={"description": "Why its last process ended, and what to do."},
    )
    failure_counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    remediations = fields.Integer(
        metadata={"description": "Automatic remediations so far (SAGELLM_REMEDIATION_ATTEMPTS)."}
    )
    drain_deadline = fields.Float(
        allow_none=True, metadata={"description": "When a DRAINING engine is stopped anyway."}
    )
    reservation_error = fields.String(
        allow_none=True,
        metadata={
            "description": "Set while a running engine could not re-take its GPU memory or "
            "port after a lost Redis (someone else took the room): the engine is UNHEALTHY "
            "and not routed to until it can."
        },
    )


class EngineAcceptedSchema(ma.Schema):
    engine = fields.Nested(EngineSchema)
    task_id = fields.String(allow_none=True)
    placement = fields.Dict(allow_none=True)


class LogsSchema(ma.Schema):
    engine_id = fields.String()
    host = fields.String(allow_none=True)
    lines = fields.List(fields.String())


class PrunedSchema(ma.Schema):
    pruned = fields.List(fields.String())


class TaskSchema(ma.Schema):
    id = fields.String()
    state = fields.String()
    name = fields.String(allow_none=True)
    ready = fields.Boolean()
    result = fields.Raw(allow_none=True)
    error = fields.String(allow_none=True)
    progress = fields.Dict(allow_none=True)


class EngineEventSchema(ma.Schema):
    at = fields.Float(metadata={"description": "Unix time"})
    kind = fields.String(
        metadata={
            "description": "placed, spawned, ready, probe_failed, crashed, remediated, "
            "draining, drain_timeout, stopped, failed, restarting, or state (a state "
            "change: data has from, to and last_error when set)"
        }
    )
    message = fields.String()
    data = fields.Dict(metadata={"description": "What the event carries besides its message"})


class EngineEventsSchema(ma.Schema):
    engine_id = fields.String()
    events = fields.List(fields.Nested(EngineEventSchema), metadata={"description": "Oldest first"})
