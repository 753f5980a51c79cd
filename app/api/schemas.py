"""Request and response schemas, declared once: validation, OpenAPI docs and dumps."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from app.core.external import API_KEY_MAX, BASE_URL_MAX
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


class EngineRegisterSchema(ma.Schema):
    """An external engine: an OpenAI-compatible endpoint sagellm did not start
    (``app.core.external``)."""

    base_url = fields.String(
        required=True,
        validate=validate.Length(1, BASE_URL_MAX),
        metadata={
            "description": "http(s)://host[:port][/prefix], with or without a trailing /v1 "
            "(stored without it: the gateway appends /v1/chat/completions, /v1/embeddings). "
            "No credentials, query or fragment: pass the key as api_key."
        },
    )
    served_model_name = fields.String(
        required=True,
        validate=_NAME,
        metadata={"description": "The model name the endpoint serves (its /v1/models lists it)"},
    )
    kind = fields.String(load_default="llm", validate=validate.OneOf(KINDS))
    api_key = fields.String(
        load_default=None,
        allow_none=True,
        load_only=True,
        validate=validate.Length(1, API_KEY_MAX),
        metadata={
            "description": "Sent to this endpoint only, as 'Authorization: Bearer <key>'. "
            "Kept apart from the record, never answered: records show api_key_set."
        },
    )


class WaitArgsSchema(ma.Schema):
    wait = fields.Boolean(
        load_default=False, metadata={"description": "Answer when RUNNING or FAILED"}
    )
    timeout = fields.Float(load_default=600.0, validate=validate.Range(0, 3600))


# A long-poll answers at the latest after this long: proxies cut idle requests near 60 s.
LONG_POLL_MAX_S = 55.0
LONG_POLL_DEFAULT_S = 30.0
SEQ_HEADER = "X-Sagellm-Seq"  # the write number a list of records is as of
SEQ_HEADER_DOC = {
    SEQ_HEADER: {
        "description": "The write number this list is as of: give it as changed_after "
        "to wait for the next change",
        "schema": {"type": "integer"},
    }
}


def _long_poll_timeout(what: str) -> fields.Float:
    return fields.Float(
        validate=validate.Range(0, LONG_POLL_MAX_S),
        metadata={
            "description": f"Seconds to wait for a change (with {what}; default "
            f"{LONG_POLL_DEFAULT_S:g}, at most {LONG_POLL_MAX_S:g})"
        },
    )


class _LongPoll(ma.Schema):
    _version_field = ""

    @ma.validates_schema
    def _timeout_needs_a_version(self, data: dict[str, Any], **_: Any) -> None:
        if "timeout" in data and self._version_field not in data:
            raise ma.ValidationError(f"only with {self._version_field}", field_name="timeout")


class EngineListArgsSchema(_LongPoll):
    _version_field = "changed_after"

    state = fields.String(validate=validate.OneOf(STATES))
    host = fields.String(validate=_NAME)
    kind = fields.String(validate=validate.OneOf(KINDS))
    label = fields.String(validate=_NAME)
    changed_after = fields.Integer(
        validate=validate.Range(min=0),
        metadata={
            "description": "Long-poll: the X-Sagellm-Seq of the list you have; the answer "
            "comes as soon as a record was written since, else after timeout seconds"
        },
    )
    timeout = _long_poll_timeout("changed_after")


class EngineReadArgsSchema(_LongPoll):
    _version_field = "changed_from"

    changed_from = fields.Float(
        metadata={
            "description": "Long-poll: the updated_at of the record you have; the answer "
            "comes as soon as the record differs from it, else after timeout seconds"
        },
    )
    timeout = _long_poll_timeout("changed_from")


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
    external_url = fields.String(
        allow_none=True,
        metadata={
            "description": "Set for an external engine (registered, not started by sagellm): "
            "its base URL. It has no host, port, GPUs or process."
        },
    )
    api_key_set = fields.Boolean(
        metadata={"description": "An external engine has an API key (never shown)."}
    )
    last_request_at = fields.Float(
        allow_none=True,
        metadata={"description": "When the gateway last sent it a request (idle stops)."},
    )
    idle_stops_at = fields.Float(
        allow_none=True,
        metadata={"description": "When it is stopped for idleness (spec.idle_timeout_s)."},
    )
    standby_after_stop = fields.Boolean(
        metadata={"description": "Its stop (an idle stop or an eviction) ends in STANDBY."}
    )
    cold_start_at = fields.Float(
        allow_none=True, metadata={"description": "When its cold start under way began."}
    )
    cold_start_s = fields.Float(
        allow_none=True,
        metadata={"description": "How long its last cold start took, wake to RUNNING."},
    )
    evicted_for = fields.String(
        allow_none=True,
        metadata={"description": "Evicted: the engine its GPU memory was handed to."},
    )
    waits_for = fields.List(
        fields.String(),
        metadata={"description": "Engines it evicted, whose processes must end before it spawns."},
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
