"""Presets on this machine: the built-in preset files, a preset file read from disk, and
the model locations the API fills in a preset (``server_locations``).

Everything here touches the file system or the installed packages; parsing and planning
are ``app.core.presets``' (pure).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from app.core.errors import NotFoundError, ValidationError
from app.core.presets import DEMO_LLM_VAR, MINILM_VAR, Preset, SpecCheck, parse_preset
from app.settings import minilm_dir

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"

__all__ = [
    "PRESETS_DIR",
    "builtin_preset_files",
    "builtin_presets",
    "demo_llm_dir",
    "get_builtin",
    "load_preset_file",
    "minilm_dir",
    "server_locations",
]


def demo_llm_dir(data_dir: Path) -> Path:
    """Where the tiny demo chat model lives: ``<data_dir>/models/tiny-chat``."""
    return data_dir / "models" / "tiny-chat"


def server_locations(data_dir: Path) -> dict[str, str]:
    """The model locations the API fills in a preset (``LOCATION_NAMES``), from its
    settings and installed packages; never from its environment. MiniLM is missing
    when its package is not installed (naming it is then an error that says so)."""
    out = {DEMO_LLM_VAR: str(demo_llm_dir(data_dir))}
    minilm = minilm_dir()
    if minilm is not None:
        out[MINILM_VAR] = str(minilm)
    return out


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
