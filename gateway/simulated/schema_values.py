"""Plausible JSON values for a JSON schema, as a model asked for structured output writes them.

Used for ``response_format: json_schema`` answers, tool-call arguments (OpenAI
``parameters``, Anthropic ``input_schema``) and Anthropic ``output_config.format``.

Supported: ``type`` (one or a list: the first non-null one), ``object`` with
``properties`` / ``required`` / ``additionalProperties``, ``string`` (``enum``,
``const``, ``minLength`` / ``maxLength``, ``format`` date, date-time, time, email,
uri/url, uuid, ipv4, ipv6, hostname), ``integer`` / ``number`` (``minimum``,
``maximum``, the exclusive ones, ``multipleOf``), ``boolean``, ``null``, ``array``
(``items``, ``prefixItems``, ``minItems`` / ``maxItems``, ``uniqueItems``), ``anyOf`` /
``oneOf`` (the first branch, or a null branch once nesting is deep), ``allOf``
(merged), ``$ref`` into ``#/$defs`` / ``#/definitions`` (as pydantic emits them) and
recursive models (the depth is capped). ``pattern`` is not honoured.

String values come from the prompt where it names the property (``city: Paris``,
``name is "Ada"``, ``unit celsius``); enum values the prompt mentions win; places
come from ``in``/``for``/``at`` followed by capitalised words; otherwise a
placeholder that fits the property name (``email`` → ``user@example.com``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SchemaValues"]

_DEEP = 5  # past this nesting: only required properties, minimum items, null branches
_MAX_DEPTH = 24  # hard stop for schemas that can never end (a required self-reference)

_FORMATS: dict[str, str] = {
    "date": "2024-01-15",
    "date-time": "2024-01-15T12:00:00Z",
    "time": "12:00:00",
    "duration": "P1D",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "iri": "https://example.com",
    "uri-reference": "https://example.com",
    "uuid": "123e4567-e89b-42d3-a456-426614174000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
}

_UNIQUE_FORMATS: dict[str, str] = {
    "email": "user{}@example.com",
    "idn-email": "user{}@example.com",
    "uri": "https://example.com/{}",
    "url": "https://example.com/{}",
    "iri": "https://example.com/{}",
    "uri-reference": "https://example.com/{}",
    "hostname": "host{}.example.com",
}

# (substring of the property name, placeholder): the first match wins.
_STRING_HINTS: tuple[tuple[str, str], ...] = (
    ("email", "user@example.com"),
    ("url", "https://example.com"),
    ("uri", "https://example.com"),
    ("link", "https://example.com"),
    ("website", "https://example.com"),
    ("homepage", "https://example.com"),
    ("firstname", "Ada"),
    ("lastname", "Lovelace"),
    ("surname", "Lovelace"),
    ("username", "ada"),
    ("city", "Paris"),
    ("country", "France"),
    ("location", "San Francisco, CA"),
    ("address", "1 Example Street, Springfield"),
    ("phone", "+1-555-0100"),
    ("datetime", "2024-01-15T12:00:00Z"),
    ("timestamp", "2024-01-15T12:00:00Z"),
    ("date", "2024-01-15"),
    ("time", "12:00"),
    ("timezone", "UTC"),
    ("currency", "USD"),
    ("language", "English"),
    ("color", "blue"),
    ("colour", "blue"),
    ("unit", "celsius"),
    ("units", "celsius"),
    ("title", "Example title"),
    ("summary", "A short example summary."),
    ("description", "A short example description."),
    ("reason", "It fits the request."),
    ("name", "Ada Lovelace"),
    ("zip", "94103"),
    ("postcode", "94103"),
    ("postal", "94103"),
    ("id", "id_1"),
    ("code", "ABC123"),
)
_NUMBER_HINTS: tuple[tuple[str, float], ...] = (
    ("latitude", 48.8566),
    ("longitude", 2.3522),
    ("lat", 48.8566),
    ("lon", 2.3522),
    ("lng", 2.3522),
    ("age", 30),
    ("year", 2024),
    ("month", 1),
    ("day", 15),
    ("price", 9.99),
    ("amount", 9.99),
    ("cost", 9.99),
    ("temperature", 21),
    ("rating", 4),
    ("score", 4),
    ("percent", 50),
    ("count", 3),
    ("quantity", 3),
    ("number", 3),
    ("limit", 5),
)
_QUERY_NAMES = frozenset({"query", "q", "search", "search_query", "question", "prompt", "topic", "keywords", "term"})
_LOCATION_NAMES = frozenset({"location", "city", "place", "destination", "region", "town", "where"})
_PLACE = re.compile(r"\b(?:in|for|at|near|to|from)\s+((?:[A-Z][\w'.-]*)(?:\s+[A-Z][\w'.-]*){0,3})")
_FILLER = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "is",
        "are",
        "be",
        "this",
        "that",
        "it",
        "its",
        "my",
        "your",
        "their",
        "and/or",
    ]
)
_DESCRIBED = re.compile(r"\{([^{}]*)\}$")
_NUMERIC_KEYWORDS = frozenset(
    {
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    }
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class SchemaValues:
    """Generates one value for ``root`` (a JSON schema); ``prompt`` supplies what it can."""

    def __init__(self, root: Any, prompt: str = "") -> None:
        self._root = root if isinstance(root, Mapping) else {}
        self._prompt = prompt
        self._lower = prompt.lower()
        self._active: list[str] = []  # the $refs being expanded, to spot recursion

    def value(self, *, only_mentioned: bool = False) -> Any:
        """The value for the root schema.

        ``only_mentioned`` (tool arguments): a root object gets its required properties
        and those the prompt names, as a model calling a tool would; otherwise all.
        """
        return self._value(self._root, None, 0, 0, only_mentioned)

    # -------------------------------------------------------------- dispatch

    def _value(self, schema: Any, name: str | None, depth: int, variant: int, only_mentioned: bool = False) -> Any:
        if not isinstance(schema, Mapping):
            return self._string({}, name, variant)  # `true` / missing: anything goes
        if depth > _MAX_DEPTH:
            return None
        description = schema.get("description")
        if isinstance(description, str) and description.endswith("}"):
            schema = _described_constraints(schema, description)
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            if isinstance(target, Mapping):
                merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
                # A model that refers to itself: one level of it, then as little as is valid.
                if ref in self._active:
                    depth = max(depth, _DEEP)
                self._active.append(ref)
                try:
                    return self._value(merged, name, depth + 1, variant, only_mentioned)
                finally:
                    self._active.pop()
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self._enum(enum, variant)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self._value(self._branch(branches, depth), name, depth + 1, variant, only_mentioned)
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            return self._value(self._merge(schema, all_of), name, depth + 1, variant, only_mentioned)
        kind = self._type(schema, depth)
        if kind == "object":
            return self._object(schema, depth, only_mentioned)
        if kind == "array":
            return self._array(schema, name, depth)
        if kind == "integer" or kind == "number":
            return self._number(schema, name, variant, integer=kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self._string(schema, name, variant)

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node: Any = self._root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def _branch(self, branches: list[Any], depth: int) -> Any:
        if depth >= _DEEP:
            for branch in branches:
                if isinstance(branch, Mapping) and branch.get("type") == "null":
                    return branch
        return branches[0]

    def _merge(self, schema: Mapping[str, Any], parts: list[Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        properties: dict[str, Any] = dict(merged.get("properties") or {})
        required: list[Any] = list(merged.get("required") or [])
        for part in parts:
            if isinstance(part, Mapping) and isinstance(part.get("$ref"), str):
                part = self._resolve(part["$ref"])
            if not isinstance(part, Mapping):
                continue
            for key, val in part.items():
                if key == "properties" and isinstance(val, Mapping):
                    properties.update(val)
                elif key == "required" and isinstance(val, list):
                    required.extend(r for r in val if r not in required)
                else:
                    merged.setdefault(key, val)
        if properties:
            merged["properties"] = properties
        if required:
            merged["required"] = required
        return merged

    @staticmethod
    def _type(schema: Mapping[str, Any], depth: int) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            real = [k for k in kind if isinstance(k, str) and k != "null"]
            if depth >= _DEEP and "null" in kind:
                return "null"
            kind = real[0] if real else ("null" if "null" in kind else None)
        if isinstance(kind, str):
            return kind
        if "properties" in schema or "additionalProperties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return "string"

    # ---------------------------------------------------------------- kinds

    def _object(self, schema: Mapping[str, Any], depth: int, only_mentioned: bool) -> dict[str, Any]:
        properties = schema.get("properties")
        required = schema.get("required")
        required_set = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        result: dict[str, Any] = {}
        if isinstance(properties, Mapping):
            for key, sub in properties.items():
                key = str(key)
                wanted = key in required_set
                if not wanted:
                    if depth >= _DEEP:
                        continue
                    wanted = not only_mentioned or not required_set or self._mentions(key, sub)
                if wanted:
                    result[key] = self._value(sub, key, depth + 1, 0)
        extra = schema.get("additionalProperties")
        if not result and isinstance(extra, Mapping) and extra and depth < _DEEP:
            result["key"] = self._value(extra, "key", depth + 1, 0)
        return result

    def _array(self, schema: Mapping[str, Any], name: str | None, depth: int) -> list[Any]:
        low = _int(schema.get("minItems"), 0) or 0
        high = _int(schema.get("maxItems"), None)
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        item_name = _singular(name)
        result: list[Any] = []
        if isinstance(prefix, list):
            result = [self._value(sub, item_name, depth + 1, i) for i, sub in enumerate(prefix)]
        size = max(low, len(result) if result else (1 if depth < _DEEP else 0))
        if high is not None:
            size = min(size, high)
        del result[size:]
        if len(result) < size and items is not False:
            result += [self._value(items, item_name, depth + 1, i) for i in range(len(result), size)]
        return result

    def _number(self, schema: Mapping[str, Any], name: str | None, variant: int, *, integer: bool) -> int | float:
        found = self._mentioned_number(name)
        value: float = (
            found if found is not None else float(_hint(_NUMBER_HINTS, name, 1 if integer else 1.5)) + variant
        )
        low, high = _num(schema.get("minimum")), _num(schema.get("maximum"))
        xlow, xhigh = _num(schema.get("exclusiveMinimum")), _num(schema.get("exclusiveMaximum"))
        step = 1.0 if integer else 0.5
        if xlow is not None and value <= xlow:
            value = xlow + step
        if low is not None and value < low:
            value = low
        if xhigh is not None and value >= xhigh:
            value = xhigh - step if xlow is None or xhigh - step > xlow else (xlow + xhigh) / 2
        if high is not None and value > high:
            value = high
        multiple = _num(schema.get("multipleOf"))
        if multiple is not None and multiple > 0:
            value = math.ceil(value / multiple) * multiple
            if high is not None and value > high:
                value -= multiple
        if integer:
            return math.ceil(value)
        return value

    def _string(self, schema: Mapping[str, Any], name: str | None, variant: int) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            if variant and fmt in _UNIQUE_FORMATS:  # items of a uniqueItems array must differ
                return _UNIQUE_FORMATS[fmt].format(variant)
            return _FORMATS[fmt]
        text = self._mentioned_string(name) or ""
        if not text:
            text = _hint(_STRING_HINTS, name, "")
            if not text:
                text = f"example {name.replace('_', ' ')}" if name else "example"
            if variant:
                text = f"{text} {variant + 1}"
        low = _int(schema.get("minLength"), 0) or 0
        high = _int(schema.get("maxLength"), None)
        if len(text) < low:
            text += "x" * (low - len(text))
        if high is not None:
            text = text[:high]
        return text

    def _enum(self, values: list[Any], variant: int) -> Any:
        for value in values:
            if isinstance(value, str) and value and re.search(rf"\b{re.escape(value.lower())}\b", self._lower):
                return value
        return values[variant % len(values)]

    # ----------------------------------------------------------- the prompt

    def _mentions(self, name: str, schema: Any) -> bool:
        """Whether the prompt names the property, or one of its enum values."""
        words = list(_variants(name))
        if isinstance(schema, Mapping) and isinstance(schema.get("enum"), list):
            words += [v.lower() for v in schema["enum"] if isinstance(v, str) and v]
        return any(re.search(rf"\b{re.escape(w)}\b", self._lower) for w in words)

    def _after_name(self, name: str | None) -> list[str]:
        """The text right after each mention of the property's name (separators skipped)."""
        if not name or not self._prompt:
            return []
        found: list[str] = []
        for variant in _variants(name):
            pattern = (
                rf"\b{re.escape(variant)}\b\s*(?:(?:[:=]|is|are|of|for|to|as|be|should be|named|called)\s+|[:=]\s*)?"
            )
            found += [self._prompt[m.end() :] for m in re.finditer(pattern, self._prompt, re.IGNORECASE)]
        return [rest for rest in found if rest]

    def _mentioned_string(self, name: str | None) -> str | None:
        for rest in self._after_name(name):
            quoted = re.match(r"\"([^\"]*)\"|'([^']*)'|“([^”]*)”", rest)
            if quoted is not None:
                return next(g for g in quoted.groups() if g is not None)
            words = re.match(r"([^\s,;:!?\"]+)((?:\s+[A-Z][^\s,;:!?\"]*){0,3})", rest)
            if words is not None:
                first = words.group(1)
                text = (first + words.group(2) if first[:1].isupper() else first).rstrip(".")
                if text and text.lower() not in _FILLER:
                    return text
        if name and name.lower() in _LOCATION_NAMES:
            place = _PLACE.search(self._prompt)
            if place is not None:
                return place.group(1).rstrip(".")
        if name and name.lower() in _QUERY_NAMES and self._prompt.strip():
            return " ".join(self._prompt.split())[:200]
        return None

    def _mentioned_number(self, name: str | None) -> float | None:
        for rest in self._after_name(name):
            match = _NUMBER.match(rest)
            if match is not None:
                return float(match.group())
        return None


def _described_constraints(schema: Mapping[str, Any], description: str) -> Mapping[str, Any]:
    """Constraints a client moved into the description, honoured as a model reading it would.

    The ``anthropic`` SDK's ``transform_schema`` drops keywords the API does not accept
    and appends them as ``{minItems: 2, maximum: 10}`` to the description.
    """
    match = _DESCRIBED.search(description)
    if match is None:
        return schema
    found: dict[str, Any] = {}
    for key, raw in re.findall(r"(\w+): ([^,{}]+)", match.group(1)):
        if key in _NUMERIC_KEYWORDS and key not in schema:
            number = _num(_parse_number(raw.strip()))
            if number is not None:
                found[key] = int(number) if number.is_integer() else number
    return {**schema, **found} if found else schema


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _variants(name: str) -> list[str]:
    lowered = name.lower()
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ").replace("-", " ").lower()
    return [lowered] if spaced == lowered else [lowered, spaced]


def _singular(name: str | None) -> str | None:
    if name and len(name) > 3 and name.endswith("s") and not name.endswith("ss"):
        return name[:-1]
    return name


def _hint(table: tuple[tuple[str, Any], ...], name: str | None, default: Any) -> Any:
    """The placeholder for the first key that is the whole name (``first_name`` → ``firstname``)
    or one of its words (``departure_city`` → ``city``, ``userEmail`` → ``email``)."""
    if name:
        words = _variants(name)[-1].split()
        whole = "".join(words)
        for key, value in table:
            if key == whole or key in words:
                return value
    return default


def _num(value: Any) -> float | None:
    """A finite JSON number as a float, else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10_000 else default
