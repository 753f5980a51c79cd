"""Request and response schemas, declared once: validation, OpenAPI docs and dumps."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from app.core.placement import POLICIES

_NAME = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$", error="1-128 letters, digits or ._:/-"
)
STATES = ["PENDING", "STARTING", "RUNNING", "UNHEALTHY", "STOPPING", "STOPPED", "FAILED", "LOST"]


class EngineSpecSchema(ma.Schema):
    """What to run. Unknown fields are rejected."""

    model = fields.String(
        required=True,
        validate=validate.Length(1, 512),
        metadata={"description": "Hugging Face repo id or local path"},
    )
    kind = fields.String(load_default="llm", validate=validate.OneOf(["llm", "embedding"]))
    runtime = fields.String(
        allow_none=True,
        load_default=None,
        validate=validate.OneOf(["vllm", "transformers", "embedding"]),
        metadata={"description": "Default: vllm for llm, embedding for embedding"},
    )
    tensor_parallel = fields.Integer(load_default=1, validate=validate.Range(1, 64))
    pipeline_parallel = fields.Integer(load_default=1, validate=validate.Range(1, 64))
    use_gpu = fields.Boolean(
        allow_none=True, load_default=None, metadata={"description": "null: LLM yes, embedding no"}
    )
    required_memory_gb = fields.Float(
        allow_none=True,
        load_default=None,
        validate=validate.Range(min=0, min_inclusive=False, max=4096),
        metadata={"description": "Overrides the memory estimate (GB per GPU)"},
    )
    max_model_len = fields.Integer(
        allow_none=True, load_default=None, validate=validate.Range(16, 10_000_000)
    )
    dtype = fields.String(
        load_default="auto",
        validate=validate.OneOf(["auto", "bfloat16", "float16", "float32", "half", "bf16", "fp16"]),
    )
    quantization = fields.String(
        allow_none=True,
        load_default=None,
        validate=validate.OneOf(["awq", "gptq", "fp8", "int8", "int4"]),
    )
    port = fields.Integer(allow_none=True, load_default=None, validate=validate.Range(1, 65535))
    host = fields.String(allow_none=True, load_default=None, validate=_NAME)
    gpu_ids = fields.List(
        fields.Integer(validate=validate.Range(0, 1023)), allow_none=True, load_default=None
    )
    label = fields.String(allow_none=True, load_default=None, validate=_NAME)
    served_model_name = fields.String(allow_none=True, load_default=None, validate=_NAME)
    extra_args = fields.List(fields.String(validate=validate.Length(max=4096)), load_default=list)
    env = fields.Dict(
        keys=fields.String(validate=validate.Length(1, 256)),
        values=fields.String(validate=validate.Length(max=8192)),
        load_default=dict,
    )


class EngineCreateSchema(EngineSpecSchema):
    policy = fields.String(
        allow_none=True, load_default=None, validate=validate.OneOf(sorted(POLICIES))
    )


class WaitArgsSchema(ma.Schema):
    wait = fields.Boolean(
        load_default=False, metadata={"description": "Answer when RUNNING or FAILED"}
    )
    timeout = fields.Float(load_default=600.0, validate=validate.Range(0, 3600))


class EngineListArgsSchema(ma.Schema):
    state = fields.String(validate=validate.OneOf(STATES))
    host = fields.String(validate=_NAME)
    kind = fields.String(validate=validate.OneOf(["llm", "embedding"]))
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
