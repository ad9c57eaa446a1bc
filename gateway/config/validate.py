"""Every check of a policy, in one place, each problem naming its field path and line.

Two steps, both collecting every problem rather than stopping at the first:

* :func:`convert` builds the schema's structs from plain data, walking the schema's
  types itself: the path of each value is known from the walk, and only leaves (a
  number, a string, a literal) go through ``msgspec.convert``, whose message is then
  the reason, never a path to parse back. Ranges and patterns are the schema's own
  ``Meta`` constraints.
* :func:`check_policy` (and :func:`check_auth`, which it calls) holds the rules that
  span several fields or sections: references to models, the pair's tiers, key ids.

A struct with a refused value is refused as a whole; when a file has such problems, the rules run
on a stand-in built by a second, silent pass (:meth:`Problems.unsaid`), in which each refused value
takes its default (or a placeholder), so that they still judge the rest of that model, route or
section (t200: a bad value in ``cache`` hid the checks of its other values until the next run).
A rule that reads a refused value (:attr:`Problems.refused`) is not run: its problem depends on
one already said.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Set
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import tiktoken

from gateway.config.schema import AuthKey, AuthPolicy, Pair, Policy
from gateway.protocols.engine_fields import ENGINE_FIELDS

_ENCODINGS = tuple(sorted(name for name in tiktoken.registry.list_encoding_names() if not name.endswith("_offline")))
"""tiktoken's encodings (the gateway's offline copies carry a suffix of their own)."""

__all__ = [
    "BLOCK_STYLE",
    "ENGINE_FIELDS_TAKEN",
    "Path",
    "Problems",
    "check_auth",
    "check_policy",
    "convert",
    "convert_policy",
    "dotted",
]

Path = tuple[str | int, ...]
T = TypeVar("T")

BLOCK_STYLE = "write that mapping or list in block style, one `key: ${VAR}` or `- ${VAR}` a line"
"""How a ``${VAR}`` that is no text is written where a mapping or list is in flow style
(``{...}``, ``[...]``): there YAML takes it only quoted, which makes it text (t134)."""


class Problems:
    """Problem lines, each ``<field path> (line N): <reason>``; siblings share one list across files."""

    def __init__(self, messages: list[str] | None = None, *, file: str = "") -> None:
        self.line_at: Callable[[Path], int | None] = lambda path: None
        """The line of a path, or of the nearest enclosing value read from the file (set as it is read)."""
        self.messages = [] if messages is None else messages
        self._prefix = f"{file}: " if file else ""
        self.standing_in: set[Path] = set()
        """Paths whose value is a placeholder for an unset ``${VAR}`` (``gateway check``): what is
        wrong with it is the placeholder's, not the file's, and is not said."""
        self.from_env: dict[Path, list[str]] = {}
        """The variables whose values a path's value holds (its ``${VAR}``): a problem with the
        value names them, and does not show it (t66: the line named held only ``${...}``)."""
        self.malformed: dict[Path, list[str]] = {}
        """What in a path's value looks meant as a ``${VAR}`` but is none: said with a problem of
        the value (t66: only a valid value's warning said it)."""
        self.exponents: set[Path] = set()
        """Paths whose value is a number with an exponent that PyYAML's YAML 1.1 resolvers leave as
        text (``2e-6``, ``1.5e3``), written plain (or a plain ``${VAR}``'s value): a field that takes a
        number reads it as one, as YAML 1.2 does (t41). Quoted, it is text, as ``"2"`` is (t164)."""
        self.quoted_in_flow: set[Path] = set()
        """Paths whose value is a quoted ``${VAR}`` inside ``{...}`` or ``[...]``, where YAML takes
        none bare: a value that is no text is then written in block style, not without the quotes."""
        self.refused: set[Path] = set()
        """Paths whose value :func:`convert` refused (a problem said of it, or of a part of it)."""
        self.for_rules = False
        """A silent pass that builds what the rules run on (:meth:`unsaid`)."""

    def unsaid(self) -> Problems:
        """A pass over the same file that says nothing and builds, where :func:`convert` refuses a
        struct, a stand-in for the rules only: each refused value at its default, or, where it has
        none, at a placeholder (:func:`_placeholder`). None is built for a struct that is no
        mapping or lacks a required field, nor for one whose refused value has no placeholder."""
        unsaid = _Unsaid()
        unsaid.line_at = self.line_at
        unsaid.standing_in, unsaid.from_env, unsaid.malformed = self.standing_in, self.from_env, self.malformed
        unsaid.exponents, unsaid.quoted_in_flow = self.exponents, self.quoted_in_flow
        unsaid.for_rules = True
        return unsaid

    def sibling(self, file: str) -> Problems:
        """Problems of another file (the key file), added to the same list and naming that file."""
        return Problems(self.messages, file=file)

    def add(self, path: Path, reason: str, *, line: int | None = None, in_file: bool = True) -> None:
        """``line``: where it is, when not where ``path`` starts; ``in_file``: False when ``path`` is not written at all."""
        if path in self.standing_in:
            return
        line = (line or self.line_of(path)) if in_file else None
        where = [f"line {line}"] if line else []
        if path in self.from_env:
            where.append(f"from {' and '.join('$' + name for name in self.from_env[path])}")
        if path in self.malformed:
            reason += f" ({'; '.join(self.malformed[path])}: used as written)"
        at = f" ({', '.join(where)})" if where else ""
        self.messages.append(f"{self._prefix}{dotted(path) or '(top level)'}{at}: {reason}")

    def line_of(self, path: Path) -> int | None:
        """The line of ``path``, or of the nearest enclosing value read from the file."""
        return self.line_at(path)

    def __len__(self) -> int:
        return len(self.messages)


class _Unsaid(Problems):
    """:meth:`Problems.unsaid`: every problem is already said by the first pass."""

    def add(self, path: Path, reason: str, *, line: int | None = None, in_file: bool = True) -> None:
        return


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ------------------------------------------------------------------ conversion


class _Invalid:
    """What :func:`_convert` returns for a value it reported as a problem."""


_INVALID = _Invalid()


def convert(data: Any, cls: type[T], path: Path, problems: Problems) -> T | None:
    """``data`` as ``cls``, or None when it is not (every reason is added to ``problems``)."""
    value = _convert(data, cls, path, problems)
    return None if value is _INVALID else typing.cast(T, value)


def convert_policy(data: Mapping[str, Any], problems: Problems) -> tuple[Policy, dict[str, set[str]], frozenset[str]]:
    """The top level of policies.yaml, section by section.

    An optional section that is invalid is reported, a model or route that is invalid is
    reported and left out; a required section that is missing or invalid is reported and named
    in the third value. Where any value was refused, the policy returned is only for
    :func:`check_policy` to run the rules on (t134: an invalid `auth` hid an unknown fallback
    model): built again by :meth:`Problems.unsaid`, each refused value at its default (t200), and
    a required section none can be built for replaced by a stand-in. Also returns, per section,
    the names of the entries left out (a reference to one is not "unknown").
    """
    sections = _sections(data, problems)
    if problems:  # said as it was read too (t201: a value YAML cannot build, which is refused unsaid)
        sections = _sections(data, problems.unsaid())
    fields = _fields(Policy)
    broken = frozenset(field.name for field in fields.values() if _required(field) and field.name not in sections)
    dropped = {
        name: {str(key) for key in value} - set(sections.get(name, ()))
        for name, value in data.items()
        if isinstance(value, dict) and name in ("models", "routes", "tenants")
    }
    stand_ins = {"pair": Pair(small="", large=""), "models": {}, "routes": {}, "auth": AuthPolicy(mode="none")}
    return Policy(**{**{name: stand_ins[name] for name in broken}, **sections}), dropped, broken


def _sections(data: Mapping[str, Any], problems: Problems) -> dict[str, Any]:
    """The sections of the policy that convert, by their attribute names."""
    fields = _fields(Policy)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        field = fields.get(name)
        if field is None:
            shown = _shown_key(name)
            problems.add(
                (shown,), f"unknown section; sections are: {', '.join(fields)}", line=problems.line_of((name,))
            )
            continue
        converted = _convert(value, field.type, (name,), problems)
        if converted is not _INVALID:
            sections[field.name] = converted
    for name, field in fields.items():
        if _required(field) and name not in data:
            problems.add((name,), "required section is missing", in_file=False)
    return sections


def _convert(data: Any, tp: Any, path: Path, problems: Problems) -> Any:
    value = _converted(data, tp, path, problems)
    if value is _INVALID:
        problems.refused.add(path)
    return value


def _converted(data: Any, tp: Any, path: Path, problems: Problems) -> Any:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _struct(data, tp, path, problems)
    origin = typing.get_origin(tp)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(data, dict):
            problems.add(path, f"expected a mapping, got {_kind(data)}")
            return _INVALID
        entries = {}
        for key, value in data.items():
            name = _convert(key, key_type, (*path, str(key)), problems)
            converted = _convert(value, value_type, (*path, str(key)), problems)
            if name is not _INVALID and converted is not _INVALID:
                entries[name] = converted  # an invalid entry is left out, the others kept
        return entries
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(data, list):
            problems.add(path, f"expected a list, got {_kind(data)}")
            return _INVALID
        items = [_convert(item, item_type, (*path, i), problems) for i, item in enumerate(data)]
        if problems.for_rules:  # a refused item's placeholder keeps each other item at its index
            items = [_placeholder(item_type) if item is _INVALID else item for item in items]
        return _INVALID if any(item is _INVALID for item in items) else items
    if origin in (typing.Union, types.UnionType):
        structs = [arg for arg in typing.get_args(tp) if isinstance(arg, type) and issubclass(arg, msgspec.Struct)]
        if structs and data is not None:  # ``RetryPolicy | None``: the struct, walked field by field
            return _convert(data, structs[0], path, problems)
    return _leaf(data, tp, path, problems)


_FIELD_LIKE = re.compile(r"[a-z]+(?:_[a-z0-9]+)*")
"""What a mistyped field name looks like: lowercase words joined by ``_``. Any other key is not
shown (a secret pasted as a key would reach the log): its line says where it is."""


def _shown_key(key: Any) -> str:
    text = str(key)
    digits = sum(char.isdigit() for char in text)
    if len(text) <= 40 and digits <= 3 and _FIELD_LIKE.fullmatch(text):
        return text
    return "(a key that is no field name)"


def _struct(data: Any, cls: type[msgspec.Struct], path: Path, problems: Problems) -> Any:
    fields = _fields(cls)
    if not isinstance(data, dict):
        problems.add(path, f"expected a mapping (of {', '.join(fields)}), got {_kind(data)}")
        return _INVALID
    values: dict[str, Any] = {}
    valid = True
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"fields are: {', '.join(fields)}"
            problems.add((*path, _shown_key(key)), f"unknown field; {hint}", line=problems.line_of((*path, key)))
            valid = False
            continue
        converted = _convert(value, field.type, (*path, key), problems)
        if converted is _INVALID:
            valid = False
        else:
            values[field.name] = converted
    missing = [name for name, field in fields.items() if _required(field) and name not in data]
    for name in missing:
        problems.add(path, f"missing required field `{name}`")
    if problems.for_rules:  # a stand-in: each refused value at its default, or a placeholder where it has none
        for name, field in fields.items():
            if _required(field) and field.name not in values and name in data:
                values[field.name] = _placeholder(field.type)
        unbuilt = [
            field.name for field in fields.values() if _required(field) and values.get(field.name, _INVALID) is _INVALID
        ]
        return _INVALID if unbuilt else cls(**values)
    return cls(**values) if valid and not missing else _INVALID


def _placeholder(tp: Any) -> Any:
    """A value of ``tp`` in place of a refused one that has no default, in a stand-in
    (:meth:`Problems.unsaid`): text, a number or a literal. The rules never read it
    (:attr:`Problems.refused`); they read the values beside it."""
    for member in _union_args(_without_constraints(tp)[0]):
        if typing.get_origin(member) is typing.Literal:
            return typing.get_args(member)[0]
        if member in (str, int, float, bool):
            return member()
    return _INVALID


def _leaf(data: Any, tp: Any, path: Path, problems: Problems) -> Any:
    hidden = path in problems.from_env  # a variable's value may be a secret: its name is said instead (t66)
    if isinstance(data, str) and path in problems.exponents and _takes_a_number_not_text(tp):
        data = float(data)
    try:
        value = msgspec.convert(data, tp, strict=True)
    except msgspec.ValidationError as exc:
        flow = path in problems.quoted_in_flow
        reason = _not_a_number(data, tp, hidden=hidden) or _reason(data, tp, str(exc), hidden=hidden, flow=flow)
        problems.add(path, reason)
        return _INVALID
    if isinstance(value, float) and not math.isfinite(value):
        # no limit, price or timeout is meant as .inf or .nan: a key written with `--usd-per-day inf`
        # became a file no gateway could load (t41)
        problems.add(path, f"must be a finite number, got {_shown(data, hidden=hidden)}")
        return _INVALID
    return value


def _not_a_number(data: Any, tp: Any, *, hidden: bool) -> str | None:
    """Why nan is refused: "must be >= 0, got nan" read as if nan were below 0 (t69)."""
    if not (isinstance(data, float) and math.isnan(data)):
        return None
    metas = _without_constraints(tp)[1]
    described = [meta.description for meta in metas if meta.description]
    words = " and ".join(described) or "a finite number" + "".join(f" {_described(meta)}" for meta in metas)
    return f"must be {words}, got {_shown(data, hidden=hidden)}"


def _takes_a_number_not_text(tp: Any) -> bool:
    members = _union_args(_without_constraints(tp)[0])
    return float in members and str not in members


def _reason(data: Any, tp: Any, message: str, *, hidden: bool = False, flow: bool = False) -> str:
    """Why ``data`` is not a ``tp``: the allowed literals, the constraint not met, or msgspec's words.
    ``hidden``: the value is an environment variable's, not shown; ``flow``: a quoted ``${VAR}``
    inside ``{...}`` or ``[...]``."""
    bare, metas = _without_constraints(tp)
    literals = [arg for arg in _union_args(bare) if typing.get_origin(arg) is typing.Literal]
    if literals:
        allowed = [f"`{value}`" for literal in literals for value in typing.get_args(literal)]
        return f"must be one of {', '.join(allowed)}, got {_shown(data, hidden=hidden)}"
    if metas and _fits(data, bare):  # the type is right, a constraint is not met
        secret = hidden or any((m.extra or {}).get("secret") for m in metas)
        shown = "a value not shown here" if secret else _shown(data)
        return f"must be {' and '.join(_described(meta) for meta in metas)}, got {shown}"
    expected = _expected(bare)
    if expected is None:
        scalar = isinstance(data, str | int | float | bool)
        return f"{message}: {_shown(data, hidden=hidden)}" if scalar else message
    return f"expected {expected}, got {_kind(data, hidden=hidden)}{_hint(data, bare, hidden=hidden, flow=flow)}"


_TYPE_WORDS: dict[Any, str] = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def _expected(tp: Any) -> str | None:
    """``int | None`` as "a whole number" (t63: ``Expected `int | null``` spoke msgspec's words);
    None for a type with no words here. Null is left out: it is what leaving the field out gives."""
    members = [arg for arg in _union_args(tp) if arg is not types.NoneType]
    if int in members and float in members:
        members.remove(int)
    if not members or any(member not in _TYPE_WORDS for member in members):
        return None
    return " or ".join(_TYPE_WORDS[member] for member in members)


_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*)?\.?[0-9_]+([eE][-+]?[0-9]+)?")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")
_YAML_11_BOOLS = frozenset({"yes", "no", "y", "n", "on", "off"})


def _hint(data: Any, tp: Any, *, hidden: bool = False, flow: bool = False) -> str:
    """What to write instead, where the value's YAML spelling is the likely slip (t63); ``hidden``:
    the value is a variable's, which is then what to change (t66)."""
    members = _union_args(tp)
    if isinstance(data, str) and not _PLACEHOLDER.fullmatch(data):
        text = data.strip()
        if _LEADING_ZERO.fullmatch(text) and (int in members or float in members):
            # YAML 1.1 read 010 as octal 8, YAML 1.2 reads 10: neither is assumed
            fix = "set the variable" if hidden else "write it"
            return f"; a number may not start with 0 (YAML 1.1 reads it as octal): {fix} without the leading 0"
        if (
            (int in members and _PLAIN_INT.fullmatch(text))
            or (float in members and _PLAIN_FLOAT.fullmatch(text))
            or (bool in members and text in ("true", "false"))
        ):
            if hidden and text != data:  # t164: no quotes to drop
                return "; the variable's value has spaces around it, which make it text: set it without them"
            if flow:  # without them, YAML refuses it there (t134)
                needed = "inside `{...}` or `[...]` a `${...}` needs them"
                return f"; the quotes around it make it text, and {needed}: {BLOCK_STYLE}, without the quotes"
            return "; the quotes around it make it text: write it without them"
        if bool in members and text.lower() in _YAML_11_BOOLS:
            return "; YAML reads only true and false as booleans (not yes, no, on, off)"
    elif str in members and isinstance(data, int | float):  # bool is an int
        return "; write it in quotes to have it read as text"
    return ""


def _described(meta: msgspec.Meta) -> str:
    if meta.description:
        return meta.description
    bounds = [(">=", meta.ge), (">", meta.gt), ("<=", meta.le), ("<", meta.lt)]
    words = [f"{sign} {bound}" for sign, bound in bounds if bound is not None]
    if meta.pattern is not None:
        words.append(f"matching {meta.pattern!r}")
    return " and ".join(words)


def _without_constraints(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    """``tp`` without ``Annotated`` (in it or in its union members), and the constraints it carried."""
    metas: list[msgspec.Meta] = []

    def strip(t: Any) -> Any:
        if typing.get_origin(t) is typing.Annotated:
            base, *metadata = typing.get_args(t)
            metas.extend(m for m in metadata if isinstance(m, msgspec.Meta))
            return base
        return t

    args = [strip(arg) for arg in _union_args(tp)]
    return functools.reduce(lambda a, b: a | b, args), metas


def _union_args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _fits(data: Any, tp: Any) -> bool:
    try:
        msgspec.convert(data, tp, strict=True)
    except msgspec.ValidationError:
        return False
    return True


_PLACEHOLDER = re.compile(r"http://unset-[a-z0-9-]*\.invalid")
"""What stands in for an unset ``${VAR}`` while a file is checked (``config/loader.py``)."""


def _shown(data: Any, *, hidden: bool = False) -> str:
    if isinstance(data, str) and _PLACEHOLDER.fullmatch(data):
        return "an unset variable"  # the placeholder is the gateway's, not the file's (t29)
    if hidden:
        return "a value not shown here"
    text = repr(data)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(data: Any, *, hidden: bool = False) -> str:
    if hidden and isinstance(data, str) and not _PLACEHOLDER.fullmatch(data):
        return "text (not shown here)"
    if hidden and isinstance(data, int | float) and not isinstance(data, bool):
        return "a number (not shown here)"
    if data is None:
        return "nothing"
    if isinstance(data, bool):
        return "true" if data else "false"
    if isinstance(data, dict):
        return "a mapping"
    if isinstance(data, list):
        return "a list"
    if isinstance(data, str) and not _PLACEHOLDER.fullmatch(data):
        return f"the string {_shown(data)}"
    return _shown(data)


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {field.encode_name: field for field in msgspec.structs.fields(cls)}


def _required(field: msgspec.structs.FieldInfo) -> bool:
    return field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT


# ----------------------------------------------------------------------- rules


_ORIGIN = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#\s]+")
"""What a browser sends in ``Origin``: a scheme and a host (with its port), nothing more."""


_GATEWAYS_OWN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
     "accept-encoding", "content-type"}
)  # fmt: skip
"""Headers each upstream request gets from the gateway: a second one made two, or a conflicting length (t31)."""
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
"""RFC 9110's token: what a header's name may be."""


def check_policy(
    policy: Policy,
    problems: Problems,
    *,
    dropped: Mapping[str, Set[str]] | None = None,
    broken: Set[str] = frozenset(),
    key_file: tuple[list[AuthKey], Problems] | None = None,
) -> None:
    """The rules that span fields and sections.

    ``dropped``: per section, the entries that failed to convert (already reported: a
    reference to one is not "unknown"); ``broken``: the required sections that are missing or
    invalid (already reported: their stand-ins are not checked, nor references into them);
    ``key_file``: its keys, and where to report about them. A rule that reads a value
    conversion refused (at its default in ``policy``) is not run: what it would say depends on a
    problem already said.
    """
    dropped = dropped or {}

    def judged(*paths: Path) -> bool:
        """Whether the rules may read these values: none was refused."""
        return not any(path in problems.refused for path in paths)

    invalid_models = dropped.get("models", set())
    known = ", ".join(sorted({*policy.models, *invalid_models}))  # t63: one left out for an unset ${VAR} is known

    def check_model(path: Path, name: str | None) -> None:
        if path in problems.refused:  # said already; a stand-in's placeholder or default is in its place
            return
        if name is not None and name not in policy.models and name not in invalid_models and "models" not in broken:
            problems.add(path, f"unknown model {name!r}; models are: {known}")

    for role in () if "pair" in broken else ("small", "large"):
        name = getattr(policy.pair, role)
        check_model(("pair", role), name)
        tier = policy.models[name].tier if name in policy.models else role
        if tier != role and judged(("models", name, "tier")):
            has = f"tier {tier!r}" if tier else "no tier"  # t63: was "has tier None"
            problems.add(("pair", role), f"model {name!r} has {has}; the pair's {role} model needs `tier: {role}`")
    if not policy.routes and not dropped.get("routes") and "routes" not in broken:
        problems.add(("routes",), "at least one route is needed")
    for route_name, route in policy.routes.items():
        base: Path = ("routes", route_name)
        check_model((*base, "model"), route.model)
        for i, name in enumerate(route.fallbacks):
            check_model((*base, "fallbacks", i), name)
        check_model((*base, "baseline"), route.baseline)
        if route.baseline in policy.models and policy.models[route.baseline].kind != "chat":  # t56: accepted
            problems.add(
                (*base, "baseline"), f"model {route.baseline!r} is an embedding model; a baseline answers chat"
            )
        if (
            route_name in policy.models
            and policy.models[route_name].public
            and judged(("models", route_name, "public"))
        ):
            problems.add(base, f"route {route_name!r} has the name of a public model; rename one of them")
    for name, model in policy.models.items():
        _check_base_url(problems, name, model.base_url)
        if model.encoding not in _ENCODINGS:
            problems.add(
                ("models", name, "encoding"),
                f"unknown encoding {model.encoding!r}; encodings are: {', '.join(_ENCODINGS)}",
            )
        if model.kind == "chat" and model.tier is None and judged(("models", name, "kind"), ("models", name, "tier")):
            problems.add(("models", name), "missing required field `tier` (`small` or `large`) for a chat model")
        if model.kind == "embedding" and model.provider != "openai":
            problems.add(("models", name, "kind"), f"provider {model.provider!r} serves no embeddings; use `openai`")
        if model.responses_api and (model.provider != "openai" or model.kind != "chat"):
            problems.add(("models", name, "responses_api"), "only an openai chat model can serve the Responses API")
        if model.tenant_cache_salt and (model.provider != "openai" or model.kind != "chat"):
            problems.add(("models", name, "tenant_cache_salt"), "only an openai chat model (vLLM) takes a cache_salt")
        for header, value in model.headers.items():
            if not _HEADER_NAME.fullmatch(header):
                problems.add(
                    ("models", name, "headers"), "a header name is not an HTTP token (letters, digits, -_.!#$%&'*+^`|~)"
                )
            elif any(c in value for c in "\r\n\0"):
                problems.add(
                    ("models", name, "headers", header), "holds a line break or NUL, which HTTP forbids in a header"
                )
            elif header.lower() in _GATEWAYS_OWN_HEADERS:
                problems.add(("models", name, "headers", header), "is written by the gateway itself for each request")
            elif header.lower() in ("authorization", "x-api-key") and model.api_key_env:
                problems.add(
                    ("models", name, "headers", header), "the key comes from `api_key_env`: give one or the other"
                )
    for route_name, route in policy.routes.items():
        names = [route.model, *route.fallbacks]
        kinds = {policy.models[n].kind for n in names if n in policy.models}
        if len(kinds) > 1 and judged(*(("models", n, "kind") for n in names)):
            problems.add(
                ("routes", route_name), "a route's model and fallbacks must all be chat or all embedding models"
            )
        strategy_read = judged(("routes", route_name, "strategy"))
        if route.target_large_share is not None and route.strategy != "classifier" and strategy_read:
            problems.add(
                ("routes", route_name, "target_large_share"), "only a classifier route has a large share to keep"
            )
        if route.strategy == "classifier" and "embedding" in kinds:
            problems.add(("routes", route_name, "strategy"), "an embedding route cannot use the classifier")
        if route.learning is not None:
            if route.strategy != "classifier" and strategy_read:
                problems.add(("routes", route_name, "learning"), "only a classifier route has a router to teach")
            judge = route.learning.judge
            check_model(("routes", route_name, "learning", "judge"), judge)
            if judge is not None and judge in policy.models and policy.models[judge].kind != "chat":
                problems.add(("routes", route_name, "learning", "judge"), f"model {judge!r} is not a chat model")
    for i, origin in enumerate(policy.cors.allow_origins):
        if origin != "*" and not _ORIGIN.fullmatch(origin.strip().rstrip("/")):
            problems.add(
                ("cors", "allow_origins", i),
                f"{origin!r} is not an origin a browser sends: scheme://host[:port], no path (or `*`)",
            )
    for role in () if "pair" in broken else ("small", "large"):
        name = getattr(policy.pair, role)
        if name in policy.models and policy.models[name].kind != "chat":
            problems.add(("pair", role), f"model {name!r} is an embedding model; the pair routes chat")
    for name, model in policy.models.items():
        spec = model.speculative
        base = ("models", name, "speculative")
        ks = (*base, "k_min"), (*base, "k_initial"), (*base, "k_max")
        if not spec.k_min <= spec.k_initial <= spec.k_max and judged(*ks):
            problems.add(base, f"need k_min <= k_initial <= k_max, got {spec.k_min}, {spec.k_initial}, {spec.k_max}")
        if spec.mode == "gateway":
            if (
                spec.draft is None
                and spec.draft_source == "model"
                and judged((*base, "draft"), (*base, "draft_source"))
            ):
                problems.add((*base, "draft"), "mode `gateway` with draft_source `model` needs a draft model")
            check_model((*base, "draft"), spec.draft)
            if spec.draft == name:
                problems.add((*base, "draft"), "a model cannot draft for itself")
            elif spec.draft in policy.models and policy.models[spec.draft].kind != "chat":
                problems.add((*base, "draft"), f"model {spec.draft!r} is an embedding model; a draft writes text")
    _check_semantic_cache(policy, problems, check_model)
    if "auth" not in broken:
        check_auth(policy.auth, problems, key_file=key_file)


def _check_base_url(problems: Problems, name: str, base_url: str) -> None:
    """A URL every call can be made from: its query goes on each call (t177), but not a fragment,
    which is never sent, nor a user or password, which the gateway does not send (and is not shown)."""
    path = ("models", name, "base_url")
    if path in problems.refused:
        return
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises for a port past 65535 (t57: every call failed over)
    except ValueError as exc:
        problems.add(path, f"not a usable URL: {exc}")
        return
    if "@" in parts.netloc:
        problems.add(
            path, "holds a user name or password, which the gateway does not send: give the key in `api_key_env`"
        )
    if "#" in base_url:
        problems.add(path, "holds a fragment (`#...`), which is never sent; remove it")


def _check_semantic_cache(policy: Policy, problems: Problems, check_model: Callable[[Path, str | None], None]) -> None:
    audit = policy.cache.semantic.audit
    base: Path = ("cache", "semantic")
    check_model((*base, "audit", "judge_model"), audit.judge_model)
    judge = policy.models.get(audit.judge_model or "")
    if judge is not None and judge.kind != "chat":
        problems.add((*base, "audit", "judge_model"), f"model {audit.judge_model!r} is an embedding model")


ENGINE_FIELDS_TAKEN = ", ".join(f"`{field}`" for field in sorted(ENGINE_FIELDS))
"""The names a key's ``engine_fields`` takes, as its errors list them (``keys new --engine-fields`` too)."""


def check_auth(auth: AuthPolicy, problems: Problems, *, key_file: tuple[list[AuthKey], Problems] | None = None) -> None:
    """Key ids and secrets are unique across the policy and its key file; a key's ``engine_fields``
    are engine fields; ``mode: keys`` has a way to get keys."""
    located: list[tuple[AuthKey, Problems, Path]] = [
        (key, problems, ("auth", "keys", i)) for i, key in enumerate(auth.keys)
    ]
    if key_file is not None:
        keys, where = key_file
        located += [(key, where, ("keys", i)) for i, key in enumerate(keys)]
    seen: set[str] = set()
    hashes: dict[str, str] = {}
    for key, where, path in located:  # a refused value (said already) has a placeholder in its place
        id_read = (*path, "id") not in where.refused
        named = f"key {key.id!r}" if id_read else f"the key at {dotted(path)}"  # t201: not the placeholder's ''
        if id_read:
            if key.id in seen:
                where.add((*path, "id"), f"duplicate key id {key.id!r}")
            seen.add(key.id)
        if (*path, "hash") not in where.refused:
            if key.hash in hashes:  # one secret, two keys: it would act as whichever was read last
                where.add((*path, "hash"), f"{named} has the same secret as {hashes[key.hash]}")
            hashes.setdefault(key.hash, named)
        for i, name in enumerate(key.engine_fields):
            if name not in ENGINE_FIELDS and (*path, "engine_fields", i) not in where.refused:
                where.add(
                    (*path, "engine_fields", i),
                    f"{named} names {name!r}, which is no engine field; `engine_fields` takes {ENGINE_FIELDS_TAKEN}",
                )
    unread = ("auth", "keys") in problems.refused or ("auth", "key_file") in problems.refused  # at their defaults
    if auth.mode == "keys" and not auth.keys and not auth.key_file and not unread:
        problems.add(("auth", "keys"), "auth mode `keys` needs at least one key (or a `key_file`)")
