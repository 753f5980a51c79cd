"""/v1/management/presets: list, show, apply (built-in or in the body), with dry run."""

from __future__ import annotations

import json
from typing import Any

import marshmallow as ma
from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.context import cluster
from app.core.errors import ValidationError
from app.core.placement import POLICIES
from app.core.presets import Preset, parse_preset
from app.core.spec import EngineSpec
from app.services.admission import admit
from app.services.preset_files import builtin_preset_files, get_builtin, server_locations
from app.services.presets import apply_preset

blp = Blueprint(
    "presets",
    __name__,
    url_prefix="/v1/management/presets",
    description="Presets: start a whole set of engines in one call",
)


class PresetSummarySchema(ma.Schema):
    name = ma.fields.String()
    description = ma.fields.String(allow_none=True)
    engines = ma.fields.List(ma.fields.String())
    source = ma.fields.String()
    error = ma.fields.String(allow_none=True)


class PresetSchema(ma.Schema):
    version = ma.fields.Integer()
    name = ma.fields.String()
    description = ma.fields.String(allow_none=True)
    source = ma.fields.String()
    engines = ma.fields.List(ma.fields.Dict())


class ApplyArgsSchema(ma.Schema):
    dry_run = ma.fields.Boolean(
        load_default=False, metadata={"description": "Plan only; reserve nothing"}
    )
    rollback = ma.fields.Boolean(
        load_default=True, metadata={"description": "Stop what was started on failure"}
    )
    timeout = ma.fields.Float(load_default=900.0, validate=ma.validate.Range(0, 3600))
    policy = ma.fields.String(
        load_default=None, allow_none=True, validate=ma.validate.OneOf(sorted(POLICIES))
    )


class PresetBodySchema(ma.Schema):
    yaml = ma.fields.String(metadata={"description": "The preset as YAML (or JSON) text"})
    preset = ma.fields.Dict(metadata={"description": "The preset as an object"})

    @ma.validates_schema
    def _exactly_one(self, data: dict[str, Any], **_: Any) -> None:
        if ("yaml" in data) == ("preset" in data):
            raise ma.ValidationError("give exactly one of 'yaml' or 'preset'", field_name="yaml")


class ApplyResultSchema(ma.Schema):
    preset = ma.fields.String()
    dry_run = ma.fields.Boolean()
    ok = ma.fields.Boolean()
    plan = ma.fields.List(ma.fields.Dict())
    engines = ma.fields.List(ma.fields.Dict())
    skipped = ma.fields.List(ma.fields.String())
    rolled_back = ma.fields.List(ma.fields.String())


def _admit(spec: EngineSpec) -> EngineSpec:
    # The same admission as a direct start (a model path no host has included): a
    # refused field is a 400 when the preset is read, naming the engine, before anything
    # is reserved; not a 409 from the apply.
    c = cluster()
    return admit(c.settings, spec, c.registry)


def _locations() -> dict[str, str]:
    # From the API's settings, never its environment: a preset must not read secrets.
    return server_locations(cluster().settings.data_dir)


def read_builtin(name: str) -> Preset:
    """A built-in preset as this API reads it: its model locations filled in from the
    API's settings, and each engine admitted as a direct start would be (a refused
    field names the engine, before anything is reserved). Also the dashboard's read."""
    return get_builtin(name, locations=_locations(), validate_spec=_admit)


def read_preset_text(text: str, source: str) -> Preset:
    """A preset given as YAML (or JSON) text, read as ``read_builtin`` reads a file;
    ``source`` names it in errors."""
    return parse_preset(text, source, locations=_locations(), validate_spec=_admit)


def _apply(preset: Preset, args: dict[str, Any]) -> dict[str, Any]:
    result = apply_preset(
        cluster(),
        preset,
        dry_run=args["dry_run"],
        rollback=args["rollback"],
        timeout_s=args["timeout"],
        policy=args["policy"],
    )
    return result.to_dict()


@blp.route("")
class Presets(MethodView):
    @blp.response(200, PresetSummarySchema(many=True))
    def get(self) -> list[dict[str, Any]]:
        """Built-in presets (files in presets/)."""
        out = []
        for name, path in sorted(builtin_preset_files().items()):
            try:
                p = read_builtin(name)
                out.append(
                    {
                        "name": name,
                        "description": p.description,
                        "engines": [e.name for e in p.engines],
                        "source": str(path),
                        "error": None,
                    }
                )
            except ValidationError as exc:
                out.append(
                    {
                        "name": name,
                        "description": None,
                        "engines": [],
                        "source": str(path),
                        "error": exc.message,
                    }
                )
        return out


@blp.route("/<name>")
class PresetOne(MethodView):
    @blp.response(200, PresetSchema)
    @blp.doc(responses={"404": {"description": "Unknown preset"}})
    def get(self, name: str) -> dict[str, Any]:
        """One built-in preset, its model locations filled in."""
        return read_builtin(name).to_dict()


@blp.route("/<name>/apply")
class PresetApply(MethodView):
    @blp.arguments(ApplyArgsSchema, location="query")
    @blp.response(200, ApplyResultSchema)
    @blp.doc(
        responses={
            "404": {"description": "Unknown preset"},
            "409": {"description": "An engine cannot be placed; nothing started"},
            "502": {"description": "An engine failed to start; rolled back"},
        }
    )
    def post(self, args: dict[str, Any], name: str) -> dict[str, Any]:
        """Apply a built-in preset: place all, start all, wait for RUNNING, roll back on
        failure. Engines of the preset that already run are left alone."""
        return _apply(read_builtin(name), args)


@blp.route("/apply")
class PresetApplyBody(MethodView):
    @blp.arguments(PresetBodySchema)
    @blp.arguments(ApplyArgsSchema, location="query")
    @blp.response(200, ApplyResultSchema)
    @blp.doc(
        responses={
            "400": {
                "description": "Invalid preset (file, engine and field named), or a "
                "${VAR} the client did not expand (line named)"
            },
            "409": {"description": "An engine cannot be placed; nothing started"},
            "502": {"description": "An engine failed to start; rolled back"},
        }
    )
    def post(self, body: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Apply a preset given in the body (``yaml`` text or a ``preset`` object).

        ``${VAR}`` must already be expanded by the client (``sagellm preset apply
        --file`` does it from the user's environment): this API never reads its own
        environment for a preset, and text that still holds ``${VAR}`` is a 400. Only
        ``${SAGELLM_MINILM_PATH}`` and ``${SAGELLM_DEMO_LLM_PATH}``, model locations on
        the API's side, are filled here."""
        text = body["yaml"] if "yaml" in body else json.dumps(body["preset"])
        source = request.headers.get("X-Preset-Source", "request body")[:200]
        return _apply(read_preset_text(text, source), args)
