"""What a user asks for: ``EngineSpec``, and the one schema that reads it.

``EngineSpecSchema`` (marshmallow) is the single validation of a spec, used by the REST
API (``app.api.schemas`` derives from it), presets (file, API body, built-ins) and the
CLI (which takes its choices from here). It checks in two layers:

* each field alone: type, range, choices (``KINDS``, ``RUNTIME_NAMES``, ``DTYPES``,
  ``QUANTIZATIONS``), name syntax: a marshmallow error (the API answers 422);
* ``post_load`` builds the ``EngineSpec`` and applies the rules that read a value's
  meaning or relate fields (model syntax, runtime by kind, GPU ids by parallelism, the
  env allow-list of ``app.core.engine_policy``): a ``ValidationError`` (400).

``load_spec`` runs both and turns a marshmallow error into a ``ValidationError`` naming
the field; ``EngineSpec.validate`` runs them on a spec built in code. The settings-bound
checks (model roots, unsafe flags, the runtime's own flags) are ``app.services.admission``.
No Redis, Flask or Celery here.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import marshmallow as ma
from marshmallow import fields

from app.core.engine_policy import check_env
from app.core.errors import ValidationError
from app.core.runtimes import DEFAULT_RUNTIME, RUNTIME_NAMES, RUNTIMES_BY_KIND, EngineKind

__all__ = [
    "DEFAULT_RUNTIME",
    "DTYPES",
    "KINDS",
    "NAME_RE",
    "QUANTIZATIONS",
    "RUNTIMES_BY_KIND",
    "RUNTIME_NAMES",
    "SPEC_FIELDS",
    "EngineKind",
    "EngineSpec",
    "EngineSpecSchema",
    "load_spec",
    "shown",
]

KINDS: tuple[str, ...] = tuple(k.value for k in EngineKind)
DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "bf16", "fp16")
QUANTIZATIONS = ("awq", "gptq", "fp8", "int8", "int4")

# A model is a HF repo id ("Qwen/Qwen2.5-7B-Instruct") or a local path. Argv is never
# built through a shell, but a model string with shell metacharacters is still refused:
# it is always a mistake and would be dangerous in logs copied into a terminal.
_MODEL_RE = re.compile(r"^[A-Za-z0-9_./~+-][A-Za-z0-9_./~+:@=-]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")


@dataclass(frozen=True)
class EngineSpec:
    """What a user asks for. Read from user input by ``load_spec`` (or the schema)."""

    model: str
    kind: EngineKind = EngineKind.LLM
    runtime: str | None = None
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    use_gpu: bool | None = None
    required_memory_gb: float | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    quantization: str | None = None
    port: int | None = None
    host: str | None = None
    gpu_ids: tuple[int, ...] | None = None
    label: str | None = None
    served_model_name: str | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # On demand: recorded STANDBY (nothing held, no process) and started by the first
    # gateway request for it. ``idle_timeout_s``: stopped (back to STANDBY when on
    # demand, else STOPPED) after that long without a gateway request.
    on_demand: bool = False
    idle_timeout_s: float | None = None
    preset: str | None = None
    preset_engine: str | None = None

    @property
    def gpu_count(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel if self.wants_gpu else 0

    @property
    def wants_gpu(self) -> bool:
        if self.use_gpu is None:
            return self.kind is EngineKind.LLM
        return self.use_gpu

    @property
    def effective_runtime(self) -> str:
        return self.runtime or DEFAULT_RUNTIME[self.kind]

    @property
    def name(self) -> str:
        """The name clients use: served name, else the model id."""
        return self.served_model_name or self.model

    def validate(self) -> EngineSpec:
        """The schema's every check on a spec built in code; ``ValidationError`` naming
        the field, self when valid."""
        data = self.to_dict()
        del data["preset"], data["preset_engine"]  # the loader's, not the user's
        load_spec(data)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["gpu_ids"] = list(self.gpu_ids) if self.gpu_ids is not None else None
        d["extra_args"] = list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineSpec:
        """Trusting: a spec this control plane wrote (a Redis record, a manifest), read
        back without checks (the settings may have changed since; admission re-checks a
        spec before anything is reserved for it). User input goes through ``load_spec``."""
        data = dict(d)
        data["kind"] = EngineKind(data.get("kind", EngineKind.LLM))
        if data.get("gpu_ids") is not None:
            data["gpu_ids"] = tuple(data["gpu_ids"])
        data["extra_args"] = tuple(data.get("extra_args") or ())
        data["env"] = dict(data.get("env") or {})
        return cls(**data)


# ---------------------------------------------------------------------------- messages

# Error messages quote the user's value, but never all of it: a 300-byte YAML alias
# bomb expands to millions of items, and a message holding them would take gigabytes.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 80
_SHORT.maxother = 80


def shown(value: Any) -> str:
    """``repr(value)``, cut short (nesting, items and length bounded)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int too long to convert to text
        return f"<{kind_of(value)} too long to show>"


def kind_of(value: Any) -> str:
    """``null``, ``list``, ``str``...: the type of a value as a user would name it."""
    return "null" if value is None else type(value).__name__


def did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------- fields


def _scalar_error(value: Any, wanted: str) -> ma.ValidationError:
    if isinstance(value, list | tuple | dict | set):
        return ma.ValidationError(f"must be a single value, got {kind_of(value)}")
    return ma.ValidationError(f"must be {wanted}, got {shown(value)}")


class _Str(fields.String):
    """A string and nothing else (not bytes, not a number: ``quote it``)."""

    default_error_messages = {"null": "must be a string, got null"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> str:
        if not isinstance(value, str):
            if isinstance(value, int | float) and not isinstance(value, bool):
                raise ma.ValidationError(f"must be a string, got {shown(value)}; quote it")
            raise _scalar_error(value, "a string")
        return value


class _EnvValue(fields.String):
    """An environment value: a string; a number is taken as its text (``OMP_NUM_THREADS:
    4``), but true, null or a list are surely mistakes."""

    default_error_messages = {"null": "value must be a string, got null"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() <= 64:
            return str(value)
        if isinstance(value, float) and math.isfinite(value):
            return str(value)
        raise ma.ValidationError(f"value must be a string, got {shown(value)}")


class _Int(fields.Integer):
    """An integer: not a bool, a float or a numeric string; at most 64 bits."""

    default_error_messages = {"null": "must be an integer, got null"}

    def __init__(self, **kw: Any) -> None:
        super().__init__(strict=True, **kw)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _scalar_error(value, "an integer")
        if value.bit_length() > 64:
            raise ma.ValidationError(f"a number of {value.bit_length()} bits is too large")
        return value


class _Float(fields.Float):
    """A finite number: an int or a float, not a bool or a numeric string."""

    default_error_messages = {"null": "must be a number, got null"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _scalar_error(value, "a number")
        if isinstance(value, int) and value.bit_length() > 64:
            raise ma.ValidationError(f"a number of {value.bit_length()} bits is too large")
        if not math.isfinite(value):
            raise ma.ValidationError(f"must be a finite number, got {value}")
        return value


class _Bool(fields.Boolean):
    """``true`` or ``false``; not ``"yes"``, ``1`` or ``"on"``."""

    default_error_messages = {"null": "must be true or false, got null"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> bool:
        if not isinstance(value, bool):
            raise _scalar_error(value, "true or false")
        return value


class _OneOf(ma.validate.OneOf):
    """``OneOf`` (documented as an enum), its message quoting the value."""

    def __call__(self, value: Any) -> Any:
        if value not in self.choices:
            raise ma.ValidationError(f"{shown(value)} is not one of {self.choices_text}")
        return value


class _Between(ma.validate.Range):
    """``Range`` (documented as minimum and maximum), its message quoting the value."""

    def __init__(self, low: float, high: float, *, what: str, low_open: bool = False) -> None:
        super().__init__(low, high, min_inclusive=not low_open)
        self.what = what

    def __call__(self, value: Any) -> Any:
        assert self.min is not None and self.max is not None
        if value < self.min or (not self.min_inclusive and value == self.min):
            bound = f">= {self.min:g}" if self.min_inclusive else f"> {self.min:g}"
            raise ma.ValidationError(f"must be {self.what} {bound}, got {shown(value)}")
        if value > self.max:
            raise ma.ValidationError(f"must be {self.what} <= {self.max:g}, got {shown(value)}")
        return value


class _Name(ma.validate.Regexp):
    """A label, host or served name (documented as its pattern)."""

    def __init__(self) -> None:
        super().__init__(NAME_RE)

    def __call__(self, value: Any) -> Any:
        if not self.regex.match(value):
            raise ma.ValidationError(f"{shown(value)} must be 1-128 letters, digits or ._:/-")
        return value


_NULL: dict[str, str | list[Any] | dict[Any, Any]] = {"required": "required", "null": "required"}


# ---------------------------------------------------------------------------- schema


class EngineSpecSchema(ma.Schema):
    """What to run. Unknown fields are rejected; ``load`` returns an ``EngineSpec``."""

    class Meta:
        unknown = ma.RAISE

    model = _Str(
        required=True,
        validate=ma.validate.Length(1, 512, error="must be 1-512 characters"),
        error_messages=_NULL,
        metadata={"description": "Hugging Face repo id or local path"},
    )
    kind = _Str(load_default=EngineKind.LLM.value, validate=_OneOf(KINDS))
    runtime = _Str(
        allow_none=True,
        load_default=None,
        validate=_OneOf(RUNTIME_NAMES),
        metadata={
            "description": "Default: "
            + ", ".join(f"{r} for {k.value}" for k, r in DEFAULT_RUNTIME.items())
        },
    )
    tensor_parallel = _Int(load_default=1, validate=_Between(1, 64, what="an integer"))
    pipeline_parallel = _Int(load_default=1, validate=_Between(1, 64, what="an integer"))
    use_gpu = _Bool(
        allow_none=True, load_default=None, metadata={"description": "null: LLM yes, embedding no"}
    )
    required_memory_gb = _Float(
        allow_none=True,
        load_default=None,
        validate=_Between(0, 4096, what="a number", low_open=True),
        metadata={"description": "Overrides the memory estimate (GB per GPU)"},
    )
    max_model_len = _Int(
        allow_none=True, load_default=None, validate=_Between(16, 10_000_000, what="an integer")
    )
    dtype = _Str(load_default="auto", validate=_OneOf(DTYPES))
    quantization = _Str(allow_none=True, load_default=None, validate=_OneOf(QUANTIZATIONS))
    port = _Int(allow_none=True, load_default=None, validate=_Between(1, 65535, what="a TCP port"))
    host = _Str(allow_none=True, load_default=None, validate=_Name())
    gpu_ids = fields.List(
        _Int(validate=_Between(0, 1023, what="a GPU index")),
        allow_none=True,
        load_default=None,
        error_messages={"invalid": "must be a list of GPU indices, e.g. [0, 1]"},
    )
    label = _Str(allow_none=True, load_default=None, validate=_Name())
    served_model_name = _Str(allow_none=True, load_default=None, validate=_Name())
    extra_args = fields.List(
        _Str(validate=ma.validate.Length(max=4096, error="longer than 4096 characters")),
        load_default=list,
        error_messages={"invalid": "must be a list of strings", "null": "must be a list"},
    )
    env = fields.Dict(
        keys=_Str(validate=ma.validate.Length(1, 256, error="a name is 1-256 characters")),
        values=_EnvValue(validate=ma.validate.Length(max=8192, error="longer than 8192")),
        load_default=dict,
        error_messages={"invalid": "must be a mapping of names to strings"},
    )
    on_demand = _Bool(
        load_default=False,
        metadata={"description": "Recorded STANDBY; the first gateway request starts it"},
    )
    idle_timeout_s = _Float(
        allow_none=True,
        load_default=None,
        validate=_Between(0, 30 * 86400, what="a number of seconds", low_open=True),
        metadata={"description": "Stop (to STANDBY when on demand) after this long idle"},
    )
    # Set by the preset loader, never by a user (on load, they are unknown fields).
    preset = fields.String(dump_only=True, allow_none=True)
    preset_engine = fields.String(dump_only=True, allow_none=True)

    @ma.post_load
    def make_spec(self, data: dict[str, Any], **_: Any) -> Any:
        """The ``EngineSpec``, after the rules that read meanings or relate fields."""
        data = dict(data)
        data["kind"] = EngineKind(data["kind"])
        if data.get("gpu_ids") is not None:
            data["gpu_ids"] = tuple(data["gpu_ids"])
        data["extra_args"] = tuple(data.get("extra_args") or ())
        data["env"] = dict(data.get("env") or {})
        return _check_rules(EngineSpec(**data))


SPEC_FIELDS: tuple[str, ...] = tuple(EngineSpecSchema().load_fields)
_SCHEMA = EngineSpecSchema()


def _check_rules(spec: EngineSpec) -> EngineSpec:
    """The rules over a typed spec: ``ValidationError`` naming the field."""
    if not spec.model.strip():
        raise ValidationError("model: required", field="model")
    if not _MODEL_RE.match(spec.model):
        raise ValidationError(
            f"model: {shown(spec.model)} is not a Hugging Face repo id or a path "
            "(letters, digits and ._-/~+:@= only)",
            field="model",
        )
    if spec.runtime is not None and spec.runtime not in RUNTIMES_BY_KIND[spec.kind]:
        raise ValidationError(
            f"runtime: {spec.runtime!r} cannot serve kind {spec.kind.value!r}; "
            f"use one of {', '.join(RUNTIMES_BY_KIND[spec.kind])}",
            field="runtime",
        )
    if spec.gpu_ids is not None:
        if not spec.wants_gpu:
            raise ValidationError("gpu_ids: given but the engine uses no GPU", field="gpu_ids")
        if len(set(spec.gpu_ids)) != len(spec.gpu_ids):
            raise ValidationError(
                f"gpu_ids: must be distinct indices, got {list(spec.gpu_ids)}", field="gpu_ids"
            )
        if len(spec.gpu_ids) != spec.gpu_count:
            raise ValidationError(
                f"gpu_ids: {len(spec.gpu_ids)} given, tensor_parallel x pipeline_parallel "
                f"= {spec.gpu_count} needed",
                field="gpu_ids",
            )
    check_env(spec.env)  # the allow-list: app.core.engine_policy
    return spec


def _first_error(messages: Any, path: str = "") -> tuple[str, str]:
    """The first (path, message) of marshmallow's nested messages:
    ``{'extra_args': {1: ['must be a string']}}`` -> ``('extra_args[1]', 'must be...')``."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        if isinstance(key, int):
            sub = f"{path}[{key}]"
        elif path and key in ("key", "value"):  # a Dict field's key or value
            sub = path
        elif path:
            sub = f"{path}[{shown(key)}]"
        else:
            sub = str(key)
        return _first_error(value, sub)
    if isinstance(messages, list) and messages:
        return _first_error(messages[0], path)
    return path, str(messages)


def load_spec(
    data: Any, *, preset: str | None = None, preset_engine: str | None = None
) -> EngineSpec:
    """``data`` (user input: a JSON body, a preset's engine) through the schema, as an
    ``EngineSpec``; ``ValidationError`` naming the field (``field`` is the top-level
    name; the message may point inside it, e.g. ``extra_args[1]: ...``)."""
    try:
        spec: EngineSpec = _SCHEMA.load(data)
    except ma.ValidationError as exc:
        path, message = _first_error(exc.messages)
        top = path.split("[", 1)[0]
        if top == "_schema":
            raise ValidationError(
                f"an engine must be a mapping of fields, got {kind_of(data)}"
            ) from None
        if message == "Unknown field.":
            top = path = path[:100]
            message = f"unknown field{did_you_mean(top, SPEC_FIELDS)}"
        raise ValidationError(f"{path}: {message}", field=top) from None
    if preset is not None or preset_engine is not None:
        spec = replace(spec, preset=preset, preset_engine=preset_engine)
    return spec
