"""Presets: a YAML (or JSON) file that names a whole set of engines, started in one go.

* ``schema``: text -> ``Preset`` (strict YAML, each engine through the one spec schema);
* ``variables``: ``${NAME}`` (the client's) and the API's model locations;
* ``plan``: the dry run, ``plan_preset``.

Pure. Finding the built-in files and the model locations on this machine is
``app.services.preset_files``'; applying a preset is ``app.services.presets``'.
"""

from __future__ import annotations

from app.core.presets.plan import ACTIVE_STATES, PlannedEngine, PresetPlan, plan_preset
from app.core.presets.schema import PRESET_VERSION, Preset, PresetEngine, SpecCheck, parse_preset
from app.core.presets.variables import (
    DEMO_LLM_VAR,
    LOCATION_NAMES,
    MINILM_VAR,
    expand_variables,
    resolve_locations,
)

__all__ = [
    "ACTIVE_STATES",
    "DEMO_LLM_VAR",
    "LOCATION_NAMES",
    "MINILM_VAR",
    "PRESET_VERSION",
    "PlannedEngine",
    "Preset",
    "PresetEngine",
    "PresetPlan",
    "SpecCheck",
    "expand_variables",
    "parse_preset",
    "plan_preset",
    "resolve_locations",
]
