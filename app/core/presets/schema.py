"""A preset's text -> ``Preset``: strict YAML (or JSON), its own few fields, and each
engine through the one spec schema (``app.core.spec.load_spec``).

Schema, version 1::

    version: 1                      # required; the only version there is
    name: my-stack                  # required; [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
    description: what it is for     # optional
    engines:                        # required, non-empty
      - name: chat                  # required, unique in the preset, same charset
        model: Qwen/Qwen2.5-1.5B-Instruct   # required
        # any other field of an engine start request (app.core.spec.SPEC_FIELDS);
        # null means the field's default

Unknown keys anywhere are errors, and every error is a ``ValidationError`` whose
message names the file, the engine and the field, e.g.
``presets/x.yaml: engine 'chat': tensor_parallel: must be an integer >= 1, got 0``; its
``field`` is a dotted path, always by index: ``engines[0].tensor_parallel``.
Variables (``${NAME}``) are ``app.core.presets.variables``'.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from app.core.errors import NotFoundError, ValidationError
from app.core.presets.variables import resolve_locations
from app.core.spec import SPEC_FIELDS, EngineSpec, did_you_mean, kind_of, load_spec, shown

PRESET_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOP_FIELDS = ("version", "name", "description", "engines")
_ENGINE_FIELDS = ("name", *SPEC_FIELDS)

# A check of each engine's spec beyond the schema (the API passes admission: the engine
# policy of its settings and the runtime's flags, which live outside app.core).
SpecCheck = Callable[[EngineSpec], object]


@dataclass(frozen=True)
class PresetEngine:
    """One engine of a preset: its name in the preset and its validated spec."""

    name: str
    spec: EngineSpec


@dataclass(frozen=True)
class Preset:
    """A parsed, validated preset. ``source`` is the file (or label) it came from."""

    version: int
    name: str
    description: str
    engines: tuple[PresetEngine, ...]
    source: str

    def engine(self, name: str) -> PresetEngine:
        """The engine called ``name``; ``NotFoundError`` listing the known ones."""
        for eng in self.engines:
            if eng.name == name:
                return eng
        known = ", ".join(e.name for e in self.engines)
        raise NotFoundError(f"preset {self.name!r} has no engine {name!r} (it has: {known})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the preset and each engine's full spec."""
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "engines": [{"name": e.name, "spec": e.spec.to_dict()} for e in self.engines],
        }


# ---------------------------------------------------------------------------- YAML


# Flow collections (``[`` / ``{``) nested deeper than this are refused as they are
# scanned. A preset needs 4 (engines, an engine, its env or extra_args); PyYAML's scanner
# costs O(depth) per token, so 3000 ``[`` cost a second of CPU before the composer's
# RecursionError: a hostile body must be refused before that.
MAX_FLOW_NESTING = 32


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error, not last-one-wins,
    and flow collections nest at most ``MAX_FLOW_NESTING`` deep."""

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_FLOW_NESTING:
            raise yaml.scanner.ScannerError(
                None, None, f"nested deeper than {MAX_FLOW_NESTING} levels", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: the constructor below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {shown(key)} appears twice", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, source: str) -> Any:
    try:
        # _StrictLoader is a SafeLoader: no arbitrary Python objects.
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "unreadable"
        col = f", column {mark.column + 1}" if mark is not None else ""
        raise ValidationError(f"{source}: {where}invalid YAML ({problem}{col})") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{source}: invalid YAML ({exc})") from None
    except RecursionError:
        raise ValidationError(f"{source}: invalid YAML (nested too deep)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValidationError(f"{source}: invalid YAML ({shown(str(exc))})") from None


# ---------------------------------------------------------------------------- parsing


def _unknown(keys: Any, known: tuple[str, ...]) -> str | None:
    """The first key not in ``known``, as text (cut to 100 characters), or None."""
    for key in keys:
        if key not in known:
            return str(key)[:100]
    return None


def _name_error(name: Any) -> str:
    return (
        f"name: {shown(name)} must be 1-64 letters, digits or ._- (starting with a letter or digit)"
    )


def _parse_engine(
    raw: Any,
    index: int,
    preset_name: str,
    source: str,
    seen: dict[str, int],
    validate_spec: SpecCheck | None,
) -> PresetEngine:
    where = f"engines[{index}]"
    if not isinstance(raw, dict):
        raise ValidationError(
            f"{source}: {where}: must be a mapping with name and model, got {kind_of(raw)}",
            field=where,
        )
    name = raw.get("name")
    label = f"engine {shown(name)}" if isinstance(name, str) and name else where

    def error(message: str, field: str | None) -> ValidationError:
        return ValidationError(
            f"{source}: {label}: {message}", field=where + (f".{field}" if field else "")
        )

    key = _unknown(raw, _ENGINE_FIELDS)
    if key is not None:
        raise error(f"unknown field {shown(key)}{did_you_mean(key, _ENGINE_FIELDS)}", key)
    if name is None:
        raise error("name: required", "name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise error(_name_error(name), "name")
    if name in seen:
        raise error(
            f"name: {shown(name)} is used twice (engines[{seen[name]}] and engines[{index}])",
            "name",
        )
    seen[name] = index
    # null means the field's default.
    data = {k: v for k, v in raw.items() if k != "name" and v is not None}
    try:
        spec = load_spec(data, preset=preset_name, preset_engine=name)
        if validate_spec is not None:
            validate_spec(spec)
    except ValidationError as exc:
        raise error(exc.message, exc.field) from None
    return PresetEngine(name=name, spec=spec)


def parse_preset(
    text: str,
    source: str,
    *,
    locations: Mapping[str, str] | None = None,
    validate_spec: SpecCheck | None = None,
) -> Preset:
    """Parse and validate a preset from YAML or JSON ``text`` whose variables the
    client has expanded (``expand_variables``).

    ``source`` names the file in every error. ``locations`` fills the API's model
    locations (``server_locations``; none when not given); any other ``${NAME}`` is an
    error. ``validate_spec``, when given, is called on each engine's spec (e.g.
    admission, which lives outside ``app.core``); its ``ValidationError`` is reported
    with the file and engine like any other.
    """
    data = _load_yaml(resolve_locations(text, source, locations or {}), source)
    if data is None:
        raise ValidationError(f"{source}: empty preset; needs version, name and engines")
    if not isinstance(data, dict):
        raise ValidationError(
            f"{source}: a preset must be a mapping with version, name and engines, "
            f"got {kind_of(data)}"
        )
    key = _unknown(data, _TOP_FIELDS)
    if key is not None:
        raise ValidationError(
            f"{source}: unknown field {shown(key)}{did_you_mean(key, _TOP_FIELDS)}", field=key
        )

    version = data.get("version")
    if version is None:
        raise ValidationError(
            f"{source}: version: required (use {PRESET_VERSION})", field="version"
        )
    if isinstance(version, bool) or version != PRESET_VERSION:
        raise ValidationError(
            f"{source}: version: must be {PRESET_VERSION}, got {shown(version)} (this sagellm "
            f"reads preset version {PRESET_VERSION} only)",
            field="version",
        )

    name = data.get("name")
    if name is None:
        raise ValidationError(f"{source}: name: required", field="name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationError(f"{source}: {_name_error(name)}", field="name")

    description = data.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ValidationError(
            f"{source}: description: must be a string, got {kind_of(description)}",
            field="description",
        )

    engines = data.get("engines")
    if engines is None:
        raise ValidationError(f"{source}: engines: required (a list of engines)", field="engines")
    if not isinstance(engines, list) or not engines:
        raise ValidationError(
            f"{source}: engines: must be a non-empty list of engines, got "
            f"{'an empty list' if engines == [] else kind_of(engines)}",
            field="engines",
        )
    seen: dict[str, int] = {}
    parsed = tuple(
        _parse_engine(raw, i, name, source, seen, validate_spec) for i, raw in enumerate(engines)
    )
    return Preset(PRESET_VERSION, name, description, parsed, source)
