"""The state store's Lua scripts, kept as files in ``app/state/lua`` (package data,
shipped with the package) so that each reads as Lua, with its arguments described at
its top: the commit (one atomic record write), its numbering and notice
(``finish_write``), capacity publishing, the status snapshot and the event append."""

from __future__ import annotations

from importlib import resources


def lua_script(name: str) -> str:
    """The source of ``app/state/lua/<name>``."""
    return (resources.files("app.state") / "lua" / name).read_text(encoding="utf-8")
