"""``${VAR}``, ``${VAR:-default}`` and nested defaults (``${A:-${B}}``) in policy values.

Only values are substituted, never mapping keys: a model, route or tenant name is what clients,
keys and metrics call it by, so it stays as written (``gateway.config.loader`` notes a ``${`` in one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACES = re.compile(r"\$\{|\}")

MAX_NESTING = 16
"""How deep ``${...}`` may nest in defaults: :func:`substitute` and :func:`malformed` recurse once a
level, and 500 levels ran out of Python's stack (t164); a policy needs two or three."""


class MissingVariable(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def substitute(value: str, environ: Mapping[str, str], used: list[str] | None = None) -> str:
    """Replace each reference; an unset variable without a default raises :class:`MissingVariable`.

    ``${VAR:-default}`` uses the default when VAR is unset or empty, as the shell does; a
    default may hold references itself, resolved only when the default is used. Text
    that is not a well-formed reference is kept as it is. ``used`` gathers the variables whose
    values went in (t66: a problem with such a value names its variable, not only its line).
    """
    if "${" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        name = _NAME.match(value, i + 2) if value.startswith("${", i) else None
        if name is not None:
            end = name.end()
            if value.startswith("}", end):
                out.append(_lookup(name.group(), None, environ, used))
                i = end + 1
                continue
            close = _closing_brace(value, end + 2) if value.startswith(":-", end) else -1
            if close >= 0:
                out.append(_lookup(name.group(), value[end + 2 : close], environ, used))
                i = close + 1
                continue
        out.append(value[i])
        i += 1
    return "".join(out)


def nesting(value: str) -> int:
    """How deep ``${`` nest in ``value`` (1: references with none in their defaults); one not
    closed stays open to the end, as :func:`_closing_brace` reads it."""
    depth = deepest = 0
    for brace in _BRACES.finditer(value):
        if brace.group() == "${":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


def malformed(value: str) -> list[str]:
    """What in ``value`` looks meant as a reference but is not one, so stays text (t63).

    ``${NAME:-x`` without its ``}`` or ``$NAME`` without braces was used as written (a model
    named ``${SMALL_MODEL_NAME:-small`` was asked for upstream) with no word said. Only the
    variable's name is quoted back: the rest of the value may be anything.
    """
    out: list[str] = []
    i = value.find("$")
    while i >= 0:
        if not value.startswith("${", i):
            bare = _NAME.match(value, i + 1)
            if bare is not None:
                out.append(f"`${bare.group()}` is not a reference (write `${{{bare.group()}}}`)")
            i = value.find("$", i + 1)
            continue
        name = _NAME.match(value, i + 2)
        if name is None:
            out.append("`${` is not followed by a variable name (letters, digits and _)")
            i = value.find("$", i + 2)
            continue
        end = name.end()
        if value.startswith("}", end):
            i = value.find("$", end + 1)
            continue
        close = _closing_brace(value, end + 2) if value.startswith(":-", end) else -1
        if close >= 0:
            out += malformed(value[end + 2 : close])
            i = value.find("$", close + 1)
            continue
        out.append(_unclosed(name.group(), value[end : end + 2]))
        i = value.find("$", end)
    return out


def _unclosed(name: str, after: str) -> str:
    if after == ":-":
        return f"`${{{name}:-` has no closing `}}`"
    if not after:
        return f"`${{{name}` has no closing `}}`"
    return f"`${{{name}` is followed by {after[0]!r}: a reference is ${{{name}}} or ${{{name}:-default}}"


def _closing_brace(text: str, start: int) -> int:
    """The index of the ``}`` that closes a default starting at ``start`` (nested ``${...}`` skipped), or -1."""
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


def _lookup(name: str, default: str | None, environ: Mapping[str, str], used: list[str] | None) -> str:
    found = environ.get(name)
    if found or (found is not None and default is None):
        if used is not None and name not in used:
            used.append(name)
        return found
    if default is not None:
        return substitute(default, environ, used)
    raise MissingVariable(name)
