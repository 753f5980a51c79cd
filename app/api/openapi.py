"""What the OpenAPI document says beyond the flask-smorest blueprints: the bearer
security schemes, and the gateway's OpenAI-style routes (plain WSGI in
``app.gateway.proxy`` and a plain Flask route, so no blueprint documents them)."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from werkzeug.routing import Rule

GATEWAY_TAG = "gateway"
OPENAI_ERROR = "OpenAIError"

_ERROR_REF = {"$ref": f"#/components/schemas/{OPENAI_ERROR}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _request(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": required,
        "properties": {
            "model": {
                "type": "string",
                "description": "Served name, model id or label of a RUNNING engine",
            },
            **properties,
        },
        # The body goes to the engine as it is (model rewritten): any OpenAI field.
        "additionalProperties": True,
    }
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ANSWER = {
    "description": "The engine's answer, relayed (a text/event-stream when stream=true)",
    "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}


def _proxied(summary: str, body: dict[str, Any], security: list[dict[str, list[str]]]) -> Any:
    return {
        "post": {
            "tags": [GATEWAY_TAG],
            "summary": summary,
            "security": security,
            "requestBody": body,
            "responses": {
                "200": _ANSWER,
                "400": _error("Not JSON, or a model of the other kind"),
                "404": _error(
                    "No engine serves the model (model_not_found; the message lists "
                    "the served models)"
                ),
                "401": _error("SAGELLM_API_KEYS is set and the request has none of them"),
                "502": _error("The engine failed (retried once on another replica)"),
                "503": _error("The model's engines are starting or unhealthy (Retry-After)"),
            },
        }
    }


def _path(spec: APISpec, path: str, operations: dict[str, Any]) -> None:
    # flask-smorest's apispec plugin reads the path from a werkzeug rule.
    spec.path(rule=Rule(path), operations=operations)


def document_security_and_gateway(
    spec: APISpec, admin_scheme: str, gateway_scheme: str, *, gateway_open: bool
) -> None:
    """Add the bearer schemes and the gateway's paths to ``spec``; ``gateway_open``:
    no API keys are set, so the gateway's routes need none."""
    spec.components.security_scheme(
        admin_scheme,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "SAGELLM_ADMIN_TOKEN (`sagellm up` keeps a generated one in "
            "$SAGELLM_DATA_DIR/admin-token): required by /v1/management",
        },
    )
    spec.components.security_scheme(
        gateway_scheme,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "One of SAGELLM_API_KEYS (or the admin token) for the OpenAI-style "
            "routes; when SAGELLM_API_KEYS is unset they are open",
        },
    )
    spec.components.schema(
        OPENAI_ERROR,
        {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": "string", "nullable": True},
                        "code": {"type": "string", "nullable": True},
                    },
                }
            },
        },
    )
    spec.tag({"name": GATEWAY_TAG, "description": "OpenAI-compatible routes to the engines"})
    # Open when no API keys are set: the empty requirement says so.
    security: list[dict[str, list[str]]] = [{gateway_scheme: []}]
    if gateway_open:
        security.append({})
    messages = {"type": "array", "items": {"type": "object", "additionalProperties": True}}
    text = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    stream = {"type": "boolean"}
    _path(
        spec,
        "/v1/models",
        {
            "get": {
                "tags": [GATEWAY_TAG],
                "summary": "Models served by RUNNING engines",
                "security": security,
                "responses": {
                    "200": {
                        "description": "OpenAI's model list",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "object": {"type": "string"},
                                        "data": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "additionalProperties": True,
                                            },
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "401": _error("SAGELLM_API_KEYS is set and the request has none of them"),
                },
            }
        },
    )
    _path(
        spec,
        "/v1/chat/completions",
        _proxied(
            "Chat completion from an LLM engine",
            _request(["messages"], {"messages": messages, "stream": stream}),
            security,
        ),
    )
    _path(
        spec,
        "/v1/completions",
        _proxied(
            "Text completion from an LLM engine",
            _request(["prompt"], {"prompt": text, "stream": stream}),
            security,
        ),
    )
    _path(
        spec,
        "/v1/embeddings",
        _proxied(
            "Embeddings from an embedding engine",
            _request(["input"], {"input": text}),
            security,
        ),
    )
