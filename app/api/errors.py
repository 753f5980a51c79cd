"""One JSON error shape everywhere: ``{code, status, message, field?, reasons?, errors?}``.

Domain errors (``SagellmError``) map to their ``status_code`` here, and request
validation errors get a message that names the field and the reason.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Flask
from flask_smorest import Api
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from app.core.errors import SagellmError


class ErrorSchema(ma.Schema):
    code = ma.fields.Integer(metadata={"description": "HTTP status code"})
    status = ma.fields.String(metadata={"description": "HTTP status name"})
    message = ma.fields.String(metadata={"description": "What went wrong and how to act"})
    field = ma.fields.String(metadata={"description": "The input field at fault"})
    reasons = ma.fields.List(
        ma.fields.String(), metadata={"description": "Per host and GPU: why nothing fits"}
    )
    errors = ma.fields.Dict(metadata={"description": "Validation errors by location"})
    error = ma.fields.String(metadata={"description": "Error type"})


def field_errors(errors: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Marshmallow's nested error messages as ``(field, message)`` pairs, in order.

    ``{'json': {'model': ['Missing data']}}`` -> ``[('model', 'Missing data')]``:
    webargs' location keys (``json``, ``query``, ...) are dropped, nested fields are
    joined with dots (``gpu_ids.0``), and a message with no field gets ``""``. The
    API's error answers and the dashboard's start form both name fields this way.
    """
    out: list[tuple[str, str]] = []
    if isinstance(errors, dict):
        for key, value in errors.items():
            name = str(key) if key not in ("json", "query", "form", "path", "headers") else ""
            path = f"{prefix}.{name}" if prefix and name else (name or prefix)
            out.extend(field_errors(value, path))
    elif isinstance(errors, list):
        for item in errors:
            out.extend(field_errors(item, prefix))
    else:
        out.append((prefix, str(errors)))
    return out


class SagellmApi(Api):
    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> Any:
        payload, code, headers = super().handle_http_exception(error)
        if "errors" in payload:
            flat = field_errors(payload["errors"])
            if flat:
                payload["field"] = flat[0][0]
                payload["message"] = "; ".join(f"{f}: {m}" if f else m for f, m in flat[:10])
        payload.setdefault("message", error.description or payload.get("status", ""))
        return payload, code, headers


def register_domain_errors(app: Flask) -> None:
    @app.errorhandler(SagellmError)
    def _domain_error(exc: SagellmError) -> tuple[dict[str, Any], int]:
        code = exc.status_code
        body: dict[str, Any] = {"code": code, "status": HTTP_STATUS_CODES.get(code, "Error")}
        body.update(exc.to_dict())
        return body, code
