"""The start form, read into the REST API's request body and checked by its schema.

An HTML form sends text; the API's schema (``app.api.schemas.EngineCreateSchema``, the
one spec schema of ``app.core.spec``) wants JSON types. ``start_body`` only converts
(``"2"`` -> ``2``, ``"0,1"`` -> ``[0, 1]``, extra args split as a shell would) and
leaves what does not convert as it is, so the schema's own message names the field
and the reason. Empty fields are left out (the schema's defaults apply).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import marshmallow as ma

from app.api.errors import field_errors
from app.api.schemas import EngineCreateSchema
from app.core.errors import ValidationError
from app.core.spec import EngineSpec

TEXT_FIELDS = (
    "model",
    "kind",
    "runtime",
    "label",
    "served_model_name",
    "host",
    "dtype",
    "quantization",
    "policy",
)
INT_FIELDS = ("tensor_parallel", "pipeline_parallel", "max_model_len", "port")
FLOAT_FIELDS = ("required_memory_gb",)
BOOL_FIELDS = ("use_gpu",)


def _converted(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        return text  # the schema says why ("must be an integer, got '2x'")


def start_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The JSON body ``POST /v1/management/engines`` would get for this form."""
    body: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = form.get(name, "").strip()
        if value:
            body[name] = value
    for name in INT_FIELDS:
        value = form.get(name, "").strip()
        if value:
            body[name] = _converted(value, int)
    for name in FLOAT_FIELDS:
        value = form.get(name, "").strip()
        if value:
            body[name] = _converted(value, float)
    for name in BOOL_FIELDS:
        value = form.get(name, "").strip().lower()
        if value in ("true", "false"):
            body[name] = value == "true"
        elif value:
            body[name] = value
    gpu_ids = form.get("gpu_ids", "").strip()
    if gpu_ids:
        parts = [p.strip() for p in gpu_ids.replace(" ", ",").split(",") if p.strip()]
        body["gpu_ids"] = [_converted(p, int) for p in parts]
    extra = form.get("extra_args", "").strip()
    if extra:
        try:
            body["extra_args"] = shlex.split(extra)
        except ValueError as exc:
            raise ValidationError(f"extra_args: {exc}", field="extra_args") from None
    return body


@dataclass(frozen=True)
class FormProblem:
    """Why a form cannot be used as it is: per field, or one message."""

    message: str
    fields: tuple[tuple[str, str], ...] = ()


def read_start_form(form: Mapping[str, str]) -> tuple[EngineSpec, str | None] | FormProblem:
    """The spec and placement policy of the form, or what is wrong with it."""
    try:
        loaded = EngineCreateSchema().load(start_body(form))
    except ma.ValidationError as exc:
        pairs = tuple(field_errors(exc.messages))  # named as the API names them
        return FormProblem("; ".join(f"{f}: {m}" for f, m in pairs), pairs)
    except ValidationError as exc:
        return FormProblem(exc.message, ((exc.field, exc.message),) if exc.field else ())
    return loaded["spec"], loaded["policy"]
