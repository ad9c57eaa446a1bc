"""Load policies.yaml into a :class:`Policy`, with messages that name the field and the line."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gateway.config.envsubst import MissingVariable, substitute
from gateway.config.schema import AuthKey, ModelConfig, Policy, RouteConfig
from gateway.errors import ConfigError

__all__ = ["LoadedPolicy", "load_policy", "load_policy_text"]

_Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    version: str
    """Short sha256 of the file's bytes: what ``/readyz`` and the logs show."""
    source: str
    warnings: list[str] = field(default_factory=list)
    sections: frozenset[str] = frozenset()
    """The top-level keys the file spelled out (the others took their defaults)."""


def load_policy(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, unset_ok: bool = False
) -> LoadedPolicy:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    return load_policy_text(text, source=source, environ=environ, base_dir=Path(path).parent, unset_ok=unset_ok)


def key_file_path(policy: Policy, base_dir: Path) -> Path | None:
    """Where the policy's key file is (relative paths are relative to policies.yaml)."""
    if not policy.auth.key_file:
        return None
    return base_dir / policy.auth.key_file


def load_policy_text(
    text: str,
    *,
    source: str = "<policy>",
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    unset_ok: bool = False,
) -> LoadedPolicy:
    """Every problem of the file at once, each naming its field and line.

    ``unset_ok`` (``gateway check``): a ``${VAR}`` without a value or default is a note, not a
    problem, and a placeholder stands in for it; the file is judged on what it says.
    """
    environ = os.environ if environ is None else environ
    root = _compose(text, source)
    if root is None:
        raise ConfigError(source, ["the file is empty"])

    lines: dict[_Path, int] = {}
    problems: list[str] = []
    notes: list[str] | None = [] if unset_ok else None
    data = _NodeReader(environ, lines, problems, notes).read(root, ())
    if not isinstance(data, dict):
        raise ConfigError(source, [*problems, "the file must be a mapping of sections (version, models, routes, ...)"])
    data, invalid_models, complete = _checked_sections(data, lines, problems)
    policy = None
    if complete:
        try:
            policy = msgspec.convert(data, Policy, strict=True)
        except msgspec.ValidationError as exc:
            problems.append(_describe_validation_error(str(exc), lines))
    digest = hashlib.sha256(text.encode())
    if policy is not None:
        key_path = key_file_path(policy, base_dir or Path("."))
        if key_path is not None:
            extra_keys, key_text = _load_key_file(key_path, environ)
            digest.update(key_text.encode())
            auth = msgspec.structs.replace(policy.auth, keys=[*policy.auth.keys, *extra_keys])
            policy = msgspec.structs.replace(policy, auth=auth)
        problems += _check_references(policy, lines, invalid_models)
    if problems or policy is None:
        raise ConfigError(source, problems)
    sections = frozenset(data)
    warnings = [*(notes or []), *_warnings(policy, environ)]
    return LoadedPolicy(policy, digest.hexdigest()[:12], source, warnings, sections)


_SECTIONS = {field.encode_name: field for field in msgspec.structs.fields(Policy)}


def _checked_sections(
    data: dict[str, Any], lines: dict[_Path, int], problems: list[str]
) -> tuple[dict[str, Any], set[str], bool]:
    """Check each top-level section (and each named model and route) on its own.

    Returns the data without what failed (so the remaining checks still run), the names
    of the models that failed (references to them are not "unknown"), and whether the
    whole policy can be built (no required section missing or broken).
    """
    kept: dict[str, Any] = {}
    invalid_models: set[str] = set()
    complete = True
    for name, value in data.items():
        field = _SECTIONS.get(name)
        if field is None:
            problems.append(f"{name} (line {lines.get((name,), '?')}): unknown section; "
                            f"sections are: {', '.join(_SECTIONS)}")  # fmt: skip
            continue
        if name in _KEYED_SECTIONS and isinstance(value, dict):
            entries = {}
            for entry_name, entry in value.items():
                try:
                    msgspec.convert(entry, _KEYED_SECTIONS[name], strict=True)
                    entries[entry_name] = entry
                except msgspec.ValidationError as exc:
                    problems.append(_describe_validation_error(str(exc), lines, prefix=(name, str(entry_name))))
                    if name == "models":
                        invalid_models.add(str(entry_name))
            kept[name] = entries
            continue
        try:
            msgspec.convert(value, field.type, strict=True)
            kept[name] = value
        except msgspec.ValidationError as exc:
            problems.append(_describe_validation_error(str(exc), lines, prefix=(name,)))
            complete = complete and not field.required
    for name, field in _SECTIONS.items():
        if field.required and name not in data:
            problems.append(f"{name}: required section is missing")
            complete = False
    return kept, invalid_models, complete


def _load_key_file(path: Path, environ: Mapping[str, str]) -> tuple[list[AuthKey], str]:
    """``keys: [...]`` from a file of its own; a missing file is an empty list (no keys made yet)."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], ""
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the key file: {exc.strerror or exc}"]) from None
    root = _compose(text, source)
    if root is None:
        return [], text
    lines: dict[_Path, int] = {}
    problems: list[str] = []
    data = _NodeReader(environ, lines, problems).read(root, ())
    if not problems:
        try:
            return msgspec.convert(data, _KeyFile, strict=True).keys, text
        except msgspec.ValidationError as exc:
            problems.append(_describe_validation_error(str(exc), lines))
    raise ConfigError(source, problems)


class _KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[AuthKey] = []


def _compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree (it keeps line numbers), or a ConfigError naming the line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(source, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None


class _NodeReader:
    """Turns a composed YAML tree into plain values, recording each path's line."""

    def __init__(
        self, environ: Mapping[str, str], lines: dict[_Path, int], problems: list[str], notes: list[str] | None = None
    ) -> None:
        self._environ = environ
        self._lines = lines
        self._problems = problems
        self._notes = notes
        """When a list: unset variables are noted here and a placeholder stands in for them."""
        self._loader = yaml.SafeLoader("")

    def read(self, node: yaml.Node, path: _Path) -> Any:
        self._lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._loader.construct_object(key_node)
                if key == "<<":
                    self._problems.append(f"line {key_node.start_mark.line + 1}: YAML merge keys are not supported")
                    continue
                if key in out:
                    self._problems.append(
                        f"{_dotted((*path, key))} (line {key_node.start_mark.line + 1}): duplicate key"
                    )
                out[key] = self.read(value_node, (*path, str(key)))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path)

    def _scalar(self, node: yaml.ScalarNode, path: _Path) -> Any:
        if "${" in node.value:
            value, unset = _with_placeholders(node.value, self._environ)
            if unset:  # a placeholder stands in, so the rest of the file is still checked
                where = f"{_dotted(path)} (line {node.start_mark.line + 1})"
                if self._notes is not None:
                    self._notes += [
                        f"{name} is not set: {where} needs it to serve (or give a default)" for name in unset
                    ]
                else:
                    self._problems += [
                        f"{where}: environment variable {name} is not set and has no default "
                        f"(write ${{{name}:-default}} to give one)"
                        for name in unset
                    ]
                return value
            if node.style is None:  # plain scalar: let "${PORT}" become an int, as if written inline
                tag = self._loader.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
                node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark, node.style)
            else:
                return value
        return self._loader.construct_object(node)


def _with_placeholders(value: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The value with each unset variable replaced by a URL that names it, and those variables."""
    filled, unset = dict(environ), list[str]()
    while True:
        try:
            return substitute(value, filled), unset
        except MissingVariable as exc:
            unset.append(exc.name)
            filled[exc.name] = f"http://unset-{exc.name.lower().replace('_', '-')}.invalid"


_MSGSPEC_PATH = re.compile(r" - at `\$([^`]*)`$")
_PATH_PART = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\.\.\.\]")


_KEYED_SECTIONS: dict[str, type] = {"models": ModelConfig, "routes": RouteConfig}


def _describe_validation_error(message: str, lines: dict[_Path, int], prefix: _Path = ()) -> str:
    match = _MSGSPEC_PATH.search(message)
    if not match:
        line = _nearest_line(prefix, lines)
        return f"{_dotted(prefix) or '(top level)'}{f' (line {line})' if line else ''}: {message}"
    reason = message[: match.start()]
    path: _Path = prefix + tuple(
        (m.group(1) if m.group(1) is not None else int(m.group(2)) if m.group(2) is not None else "...")
        for m in _PATH_PART.finditer(match.group(1))
    )
    line = _nearest_line(path, lines)
    where = f" (line {line})" if line else ""
    return f"{_dotted(path) or '(top level)'}{where}: {reason}"


def _nearest_line(path: _Path, lines: dict[_Path, int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _check_references(policy: Policy, lines: dict[_Path, int], invalid_models: set[str]) -> list[str]:
    problems: list[str] = []

    def problem(path: _Path, text: str) -> None:
        line = _nearest_line(path, lines)
        problems.append(f"{_dotted(path)}{f' (line {line})' if line else ''}: {text}")

    known = sorted(policy.models)

    def check_model(path: _Path, name: str | None) -> None:
        if name is not None and name not in policy.models and name not in invalid_models:
            problem(path, f"unknown model {name!r}; models are: {', '.join(known)}")

    for role in ("small", "large"):
        name = getattr(policy.pair, role)
        check_model(("pair", role), name)
        if name in policy.models and policy.models[name].tier != role:
            problem(("pair", role), f"model {name!r} has tier {policy.models[name].tier!r}, expected {role!r}")
    if not policy.routes:
        problem(("routes",), "at least one route is needed")
    for route_name, route in policy.routes.items():
        base: _Path = ("routes", route_name)
        if route.model is None:
            problem(base, "'model' is required (for classifier routes: the model used until the classifier loads)")
        check_model((*base, "model"), route.model)
        for i, name in enumerate(route.fallbacks):
            check_model((*base, "fallbacks", i), name)
        check_model((*base, "baseline"), route.baseline)
        if not 0.0 <= route.threshold <= 1.0:
            problem((*base, "threshold"), "must be between 0 and 1")
        if route_name in policy.models and policy.models[route_name].public:
            problem(base, f"route {route_name!r} has the name of a public model; rename one of them")
    for name, model in policy.models.items():
        spec = model.speculative
        base = ("models", name, "speculative")
        if spec.mode == "gateway":
            if spec.draft is None and spec.draft_source == "model":
                problem((*base, "draft"), "mode 'gateway' with draft_source 'model' needs a draft model")
            check_model((*base, "draft"), spec.draft)
            if spec.draft == name:
                problem((*base, "draft"), "a model cannot draft for itself")
    seen_ids: set[str] = set()
    for i, key in enumerate(policy.auth.keys):
        base = ("auth", "keys", i)
        if key.id in seen_ids:
            problem((*base, "id"), f"duplicate key id {key.id!r}")
        seen_ids.add(key.id)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", key.hash):
            problem((*base, "hash"), "must be 'sha256:' followed by 64 lowercase hex digits")
    if policy.auth.mode == "keys" and not policy.auth.keys and not policy.auth.key_file:
        problem(("auth", "keys"), "auth mode 'keys' needs at least one key (or a key_file)")
    for name, tenant in policy.tenants.items():
        share = tenant.downgrade_auto_at
        if share is not None and not 0 < share <= 1:
            problem(("tenants", name, "downgrade_auto_at"), "must be in (0, 1]")
    if policy.limits.max_body_bytes < 1024:
        problem(("limits", "max_body_bytes"), "must be at least 1024")
    return problems


def _warnings(policy: Policy, environ: Mapping[str, str]) -> list[str]:
    out = []
    for name, model in policy.models.items():
        if model.api_key_env and not environ.get(model.api_key_env):
            out.append(f"models.{name}: {model.api_key_env} is not set; requests to it carry no API key")
    return out
