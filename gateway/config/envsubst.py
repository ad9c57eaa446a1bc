"""``${VAR}`` and ``${VAR:-default}`` in policy values."""

from __future__ import annotations

import re
from collections.abc import Mapping

_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MissingVariable(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def substitute(value: str, environ: Mapping[str, str]) -> str:
    """Replace each reference; an unset variable without a default raises :class:`MissingVariable`.

    ``${VAR:-default}`` uses the default when VAR is unset or empty, as the shell does.
    """
    if "${" not in value:
        return value

    def _replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found
        raise MissingVariable(name)

    return _PATTERN.sub(_replace, value)
