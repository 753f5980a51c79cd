"""The state store: the only code that knows Redis key names and Lua scripts."""
