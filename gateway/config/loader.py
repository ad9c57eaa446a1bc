"""Load policies.yaml into a :class:`Policy`, with messages that name the field and the line.

YAML is read with PyYAML's composer, whose nodes carry their line numbers (libyaml's when
it is installed: 6x faster, see :data:`_Loader`); the values then go through
:mod:`gateway.config.validate`, the one place where policies are checked.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import yaml

from gateway.config.envsubst import MAX_NESTING, MissingVariable, malformed, nesting, substitute
from gateway.config.schema import AuthKey, AuthPolicy, KeyFile, Limits, Policy
from gateway.config.validate import BLOCK_STYLE, Problems, check_auth, check_policy, convert, convert_policy, dotted
from gateway.config.validate import Path as _Path
from gateway.errors import ConfigError

__all__ = [
    "KeyRing",
    "LoadedPolicy",
    "Removals",
    "auth_in_text",
    "key_file_path",
    "keys_in_text",
    "load_keys",
    "load_policy",
    "load_policy_text",
    "request_log_problem",
    "without_unlisted_keys",
    "yaml_loader",
]

_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YAML_11_ONLY = {_BOOL, _INT, _FLOAT, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}
_CORE_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0o[0-7_]+|0x[0-9a-fA-F_]+)$")
"""YAML 1.2's decimal, ``0o`` and ``0x`` ints (``_`` between digits kept from 1.1: files use ``1_000``).
A leading zero (``010``, octal 8 in YAML 1.1, decimal 10 in 1.2) and ``1:30`` (1.1's base 60) are text."""
_CORE_FLOAT = re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
"""PyYAML's floats less the base-60 ones (``1:30.5``)."""
_EXPONENT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")
"""Floats of YAML 1.2 that :data:`_CORE_FLOAT` leaves as text (``2e-6``, ``1.5e3``): a field that
takes a number reads them as one where they are written plain (``Problems.exponents``)."""
_YAML_TAG = "tag:yaml.org,2002:"
_STR = "tag:yaml.org,2002:str"


def _core_schema(base: type[yaml.SafeLoader]) -> type[yaml.SafeLoader]:
    """``base`` reading plain scalars as YAML 1.2's core schema does (t63).

    PyYAML's YAML 1.1 resolvers read ``no``, ``on`` and ``y`` as booleans (a tenant named
    ``no`` became ``False``), ``010`` as 8, ``1:30`` as 90 and ``2023-06-01`` as a date:
    here only ``true``/``false`` are booleans and dates are text, as in YAML 1.2.
    """

    class CoreLoader(base):  # type: ignore[valid-type,misc]
        pass

    CoreLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_ONLY]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }

    CoreLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    CoreLoader.add_implicit_resolver(_INT, _CORE_INT, list("-+0123456789"))
    CoreLoader.add_implicit_resolver(_FLOAT, _CORE_FLOAT, list("-+0123456789."))
    CoreLoader.add_constructor(_INT, _construct_int)
    return CoreLoader


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    """Python's own int syntax (``!!int 010`` is refused, not read as octal)."""
    assert isinstance(node, yaml.ScalarNode)
    return int(node.value.replace("_", ""), 0)


_Loader = _core_schema(getattr(yaml, "CSafeLoader", yaml.SafeLoader))
"""Composes the node tree: libyaml's parser when PyYAML was built with it (the same nodes
and marks, 0.5 ms instead of 4.4 ms for the shipped policies.yaml)."""
_Constructor = _core_schema(yaml.SafeLoader)
"""Builds values from nodes, with the same resolvers as :data:`_Loader`."""


def yaml_loader() -> type[yaml.SafeLoader]:
    """A safe loader that reads plain scalars as the gateway does (YAML 1.2's core schema), for
    ``yaml.compose`` and ``yaml.load`` elsewhere: the key tools edit the key file with it (t66)."""
    return _Constructor


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    version: str
    """Short sha256 of the file's bytes (and the key file's): what ``/readyz`` and the logs show."""
    source: str
    warnings: list[str] = field(default_factory=list)
    sections: frozenset[str] = frozenset()
    """The top-level keys the file spelled out (the others took their defaults)."""
    guarded: frozenset[tuple[str, ...]] = frozenset()
    """The settings the file spells out inside ``limits``, ``cache`` and ``tenants``, as key paths: a
    reload that leaves one out (a file cut inside the section) must not fall back to its default unseen."""
    text: str = ""
    """The file as it was read: a worker started later falls back to it (``gateway.runtime.load_at_start``)."""
    key_file_keys: int | None = None
    """How many keys ``auth.key_file`` lists; None when the file is missing, empty or has no
    ``keys`` entry (``keys: []`` is 0)."""
    key_file_text: str | None = None
    """The key file as it was read ("" when missing; None when the policy names none): kept
    beside :attr:`text`, a worker started while the key file is invalid starts on it."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys a policy file gives, read by :func:`load_keys`."""

    key_file: Path | None
    """Where ``auth.key_file`` points (None: the policy names none)."""
    keys: list[AuthKey]
    """Inline keys, then the key file's."""
    enabled: bool = True
    """``auth.mode`` is ``keys``: with ``none`` no key is asked for, so none has any effect."""
    inline: int = 0
    """How many of :attr:`keys`, the first ones, are written in the policy file (``auth.keys``)."""
    source: str = ""
    """The policy file they were read from (the copy kept in the data folder, for the policy in force)."""


def load_policy(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, unset_ok: bool = False
) -> LoadedPolicy:
    text = _read(Path(path))
    return load_policy_text(text, source=str(path), environ=environ, base_dir=Path(path).parent, unset_ok=unset_ok)


def key_file_path(policy: Policy, base_dir: Path) -> Path | None:
    """Where the policy's key file is (relative paths are relative to policies.yaml)."""
    return _key_file_path(policy.auth, base_dir)


def _key_file_path(auth: AuthPolicy, base_dir: Path) -> Path | None:
    return base_dir / auth.key_file if auth.key_file else None


def load_policy_text(
    text: str,
    *,
    source: str = "<policy>",
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    unset_ok: bool = False,
    key_file_text: str | None = None,
) -> LoadedPolicy:
    """Every problem of the file (and of its key file) at once, each naming its field and line.

    ``unset_ok`` (``gateway check``): a ``${VAR}`` without a value or default is a note, not a
    problem, and a placeholder stands in for it; the file is judged on what it says.
    ``key_file_text``: the key file's content as kept with the policy last accepted, read in
    place of the file (``gateway.runtime.load_at_start``).
    """
    environ = os.environ if environ is None else environ
    root = _compose(text, source)
    if root is None:
        raise ConfigError(source, ["the file is empty"])
    problems = Problems()
    notes: list[str] | None = [] if unset_ok else None
    reader = _NodeReader(source, environ, problems, notes)
    data = reader.read(root, ())
    if not isinstance(data, dict):
        raise ConfigError(
            source, [*problems.messages, "the file must be a mapping of sections (version, models, routes, ...)"]
        )
    policy, dropped, broken = convert_policy(data, problems)  # a broken section's stand-in: only for the rules
    digest = hashlib.sha256(text.encode())
    policy = _with_tokenizer_paths(policy, base_dir or Path("."), problems)
    key_path = key_file_path(policy, base_dir or Path("."))
    key_file = _read_key_file(key_path, environ, problems, notes, key_file_text) if key_path is not None else None
    if key_file is not None:
        digest.update(key_file.text.encode())
    check_policy(
        policy, problems, dropped=dropped, broken=broken, key_file=key_file and (key_file.keys, key_file.problems)
    )
    if key_file is not None and key_file.keys:
        auth = msgspec.structs.replace(policy.auth, keys=[*policy.auth.keys, *key_file.keys])
        policy = msgspec.structs.replace(policy, auth=auth)
    if problems or broken:
        raise ConfigError(source, problems.messages)
    warnings = [
        *(notes or []),
        *reader.warnings,
        *_downgrade_warnings(policy),
        *_warnings(policy, environ, key_file_path(policy, base_dir or Path("."))),
    ]
    log = policy.request_log
    if base_dir is not None and log.enabled and log.path:
        unwritable = request_log_problem(base_dir / log.path)
        if unwritable is not None:  # t33, t41: check said ok, and serve said it was serving, then exited 3
            warnings.append(f"request_log.path: {unwritable}")
    listed = key_file is not None and key_file.listed
    return LoadedPolicy(
        policy,
        digest.hexdigest()[:12],
        source,
        warnings,
        frozenset(data),
        frozenset(_key_paths({name: data[name] for name in GUARDED_SETTINGS if name in data})),
        text,
        len(key_file.keys) if key_file is not None and listed else None,
        key_file.text if key_file is not None else None,
    )


GUARDED_SECTIONS = ("limits", "cache")
"""Sections whose defaults are the permissive side (cache on, limits open when Redis fails)."""

GUARDED_SETTINGS = (*GUARDED_SECTIONS, "tenants")
"""Sections whose settings a reload may not leave out unseen: a tenant's too, whose limits left out
are no limit (t94: a file cut inside the last section, ``tenants:``, let an over-budget tenant in).
The ``tenants`` section itself is guarded on its own terms (only while it has tenants)."""


def _key_paths(mapping: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in mapping.items():
        path = (*prefix, str(key))
        yield path
        if isinstance(value, dict):
            yield from _key_paths(value, path)


def _with_tokenizer_paths(policy: Policy, base_dir: Path, problems: Problems) -> Policy:
    """``speculative.tokenizer`` paths made absolute (relative to the policy file), each checked to exist."""
    models = dict(policy.models)
    for name, model in policy.models.items():
        given = model.speculative.tokenizer
        if given is None:
            continue
        path = Path(given) if Path(given).is_absolute() else base_dir / given
        if not path.is_file():
            problems.add(("models", name, "speculative", "tokenizer"), f"no such file: {path}")
        speculative = msgspec.structs.replace(model.speculative, tokenizer=str(path))
        models[name] = msgspec.structs.replace(model, speculative=speculative)
    return msgspec.structs.replace(policy, models=models) if models != policy.models else policy


def load_keys(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, read_key_file: bool = True
) -> KeyRing:
    """The ``auth`` section and the key file, checked as :func:`load_policy` checks them.

    The rest of the file is not read: its upstream URLs and such may be unset on the
    machine where keys are made (``gateway keys new``). ``read_key_file=False``: the section's
    own keys only, its key file named but not read (``keys revoke`` takes a key out of a key file
    invalid as a whole: t98).
    """
    text = _read(Path(path))
    return keys_in_text(
        text, source=str(path), base_dir=Path(path).parent, environ=environ, read_key_file=read_key_file
    )


def keys_in_text(
    text: str,
    *,
    source: str,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    read_key_file: bool = True,
) -> KeyRing:
    """:func:`load_keys` of a policy's text, its key file named relative to ``base_dir`` (the
    policy a gateway keeps in force, whose copy lives in the data folder). Every problem of the
    section :func:`load_policy` names (t201: a refused value hid the rules' problems, which only
    ``gateway check`` said)."""
    environ = os.environ if environ is None else environ
    problems = Problems()
    auth = _auth_section(text, source, environ, problems, stand_in=True)
    key_path = _key_file_path(auth, base_dir)
    key_file = _read_key_file(key_path, environ, problems) if key_path is not None and read_key_file else None
    check_auth(auth, problems, key_file=key_file and (key_file.keys, key_file.problems))
    if problems:
        raise ConfigError(source, problems.messages)
    keys = [*auth.keys, *(key_file.keys if key_file else [])]
    return KeyRing(key_path, keys, auth.mode == "keys", len(auth.keys), source)


def auth_in_text(
    text: str, *, source: str, base_dir: Path, environ: Mapping[str, str] | None = None
) -> tuple[Path | None, bool]:
    """The key file (None: none named) and whether ``auth.mode`` is ``keys``, of a policy's text:
    ``keys`` tells with it which key file the policy a gateway keeps in force reads (t66).
    Only ``auth`` is read; a ConfigError when it is invalid."""
    auth = _auth_section(text, source, os.environ if environ is None else environ, Problems())
    return _key_file_path(auth, base_dir), auth.mode == "keys"


class Removals(NamedTuple):
    """:func:`without_unlisted_keys`: the policy in force less what an invalid key file takes out."""

    loaded: LoadedPolicy
    dropped: list[str]
    """The ids of the keys the file no longer lists with the same id and hash."""
    taken_back: dict[str, list[str]]
    """By field (``engine_fields``, ``models``, ``admin``, ``limits``), the ids of the keys left
    that the file takes some of it back from; only fields something is taken back from."""


class _Grants(NamedTuple):
    """What a key file's entries for one key grant it, each read alone; None: the field is not
    what the file's schema takes (not a list, not a boolean, not a mapping), so nothing of it is
    taken back."""

    engine_fields: frozenset[str] | None
    models: frozenset[str] | None
    """``*``: every route and model."""
    admin: bool | None
    limits: dict[str, float] | None
    """The caps the entry sets as the schema takes them (a cap it leaves out, or sets otherwise, is none)."""

    def __or__(self, other: _Grants) -> _Grants:
        """A key listed twice keeps what either entry grants."""
        return _Grants(
            _either(self.engine_fields, other.engine_fields),
            _either(self.models, other.models),
            None if self.admin is None or other.admin is None else self.admin or other.admin,
            _looser(self.limits, other.limits),
        )


def _either(one: frozenset[str] | None, other: frozenset[str] | None) -> frozenset[str] | None:
    return None if one is None or other is None else one | other


def _looser(one: dict[str, float] | None, other: dict[str, float] | None) -> dict[str, float] | None:
    """Each cap both set, at the higher of the two: one that either leaves out is no cap."""
    if one is None or other is None:
        return None
    return {cap: max(value, other[cap]) for cap, value in one.items() if cap in other}


_CAP_LEAST = {"rpm": 0, "tpm": 0, "usd_per_day": 0, "usd_per_month": 0, "max_concurrent": 1}
"""Each cap of :class:`~gateway.config.schema.Limits`, and the least value its schema takes."""
_WHOLE_CAPS = frozenset({"rpm", "tpm", "max_concurrent"})


def _caps(value: object) -> dict[str, float] | None:
    """The caps of an entry's ``limits`` that read as its schema takes them; None: no mapping."""
    if not isinstance(value, dict):
        return None
    caps: dict[str, float] = {}
    for cap, least in _CAP_LEAST.items():
        given = value.get(cap)
        if isinstance(given, bool) or not isinstance(given, int | float) or given < least:
            continue
        if cap in _WHOLE_CAPS and not isinstance(given, int):
            continue
        caps[cap] = given
    return caps


def without_unlisted_keys(
    loaded: LoadedPolicy, base_dir: Path, environ: Mapping[str, str] | None = None
) -> Removals | None:
    """``loaded`` less the keys of its key file that the file, invalid as it is now, no longer
    lists with the same id and hash, and less what it no longer grants the others: ``engine_fields``,
    ``models`` and ``admin``, and ``limits`` it lowers (none of either: ``loaded`` itself); None
    when the file says nothing of its keys.

    While the key file is invalid (a hand edit's bad line) the gateway keeps the keys in force,
    and a key revoked meanwhile stayed live (t98), as did an engine field (f229), a model or admin
    (f232) taken back, and a budget or rate cut for a key that overspends. Each entry is read alone
    here, so the file still says which keys it lists and what each may do. Only ever less: an entry
    added or changed otherwise, or a grant widened (a cap raised or left out), waits for a valid
    file, and a file that says nothing of its keys (missing, empty, not YAML, no ``keys`` list:
    perhaps cut short) drops none; a field that does not read as its schema says (``models`` no
    list, ``admin`` no boolean, ``limits`` no mapping, a cap no number the schema takes) takes back
    none of it. The version is the one in force with what was taken out."""
    key_path = key_file_path(loaded.policy, base_dir)
    listed = _listed_keys(key_path, os.environ if environ is None else environ) if key_path is not None else None
    if listed is None:
        return None
    keys = loaded.policy.auth.keys
    inline = len(keys) - (loaded.key_file_keys or 0)  # the policy's own keys, then the key file's (load_policy_text)
    dropped = [key.id for key in keys[inline:] if (key.id, key.hash) not in listed]
    kept: list[AuthKey] = [*keys[:inline]]
    taken_back: dict[str, list[str]] = {}
    for key in keys[inline:]:
        if key.id in dropped:
            continue
        less = _less(key, listed[(key.id, key.hash)])
        for name in less:
            taken_back.setdefault(name, []).append(key.id)
        kept.append(msgspec.structs.replace(key, **less) if less else key)
    if not dropped and not taken_back:
        return Removals(loaded, [], {})
    auth = msgspec.structs.replace(loaded.policy.auth, keys=kept)
    taken = f"{loaded.version} without {' '.join(dropped)}"
    if taken_back:
        taken += " narrowing " + " ".join(
            f"{key.id}:{','.join(key.engine_fields)}:{','.join(key.models)}:{key.admin}:{_written(key.limits)}"
            for key in kept[inline:]
        )
    version = hashlib.sha256(taken.encode()).hexdigest()[:12]
    policy = msgspec.structs.replace(loaded.policy, auth=auth)
    keyed = replace(loaded, policy=policy, version=version, key_file_keys=len(keys) - inline - len(dropped))
    return Removals(keyed, dropped, {name: sorted(ids) for name, ids in taken_back.items()})


def _written(limits: Limits) -> str:
    return ",".join(f"{cap}={getattr(limits, cap)}" for cap in _CAP_LEAST if getattr(limits, cap) is not None)


def _less(key: AuthKey, granted: _Grants) -> dict[str, Any]:
    """What of ``key`` in force its entries no longer grant, as its fields would be without it."""
    less: dict[str, Any] = {}
    if granted.engine_fields is not None and not granted.engine_fields.issuperset(key.engine_fields):
        less["engine_fields"] = [name for name in key.engine_fields if name in granted.engine_fields]
    models = granted.models
    if models is not None and "*" not in models and not models.issuperset(key.models):
        # "*" in force: every model, so what the entry names is all that is left of it
        less["models"] = sorted(models) if "*" in key.models else [name for name in key.models if name in models]
    if key.admin and granted.admin is False:
        less["admin"] = False
    if granted.limits:
        narrowed = {
            cap: value
            for cap, value in granted.limits.items()
            if (in_force := getattr(key.limits, cap)) is None or value < in_force
        }
        if narrowed:
            less["limits"] = msgspec.structs.replace(key.limits, **narrowed)
    return less


def _listed_keys(path: Path, environ: Mapping[str, str]) -> dict[tuple[str, str], _Grants] | None:
    """The id and hash of each entry of the key file's ``keys`` list that has both as text, valid
    or not, with what its entries grant; None when it has no such list to read."""
    try:
        root = _compose(path.read_text(encoding="utf-8"), str(path))
        data = _NodeReader(str(path), environ, Problems(), None, key_file=True).read(root, ()) if root else None
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    listed: dict[tuple[str, str], _Grants] = {}
    for entry in entries:
        key_id, digest = (entry.get("id"), entry.get("hash")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(key_id, str) and isinstance(digest, str)):
            continue
        admin = entry.get("admin", False)
        granted = _Grants(
            _names(entry.get("engine_fields", [])), _names(entry.get("models", ["*"])),
            admin if isinstance(admin, bool) else None, _caps(entry.get("limits", {})),
        )  # fmt: skip
        pair = (key_id, digest)
        listed[pair] = listed[pair] | granted if pair in listed else granted
    return listed


def _names(value: object) -> frozenset[str] | None:
    return frozenset(name for name in value if isinstance(name, str)) if isinstance(value, list) else None


def _auth_section(
    text: str, source: str, environ: Mapping[str, str], problems: Problems, *, stand_in: bool = False
) -> AuthPolicy:
    """The ``auth`` section; a ConfigError when it is refused, unless ``stand_in``: then, as
    :func:`convert_policy` builds one, a stand-in for :func:`check_auth` to run on, with the
    problems in ``problems`` (a ConfigError still where none can be built)."""
    root = _compose(text, source)
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(source, ["the file must be a mapping of sections (version, models, routes, auth, ...)"])
    nodes = [value for key, value in root.value if isinstance(key, yaml.ScalarNode) and key.value == "auth"]
    if not nodes:
        raise ConfigError(source, ["auth: required section is missing"])
    data = _NodeReader(source, environ, problems).read(nodes[-1], ("auth",))
    auth = convert(data, AuthPolicy, ("auth",), problems)
    if auth is None and stand_in and problems:
        auth = convert(data, AuthPolicy, ("auth",), problems.unsaid())
    if auth is None:
        raise ConfigError(source, problems.messages)
    return auth


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:  # its text is never quoted: a policy may hold secrets
        raise ConfigError(str(path), [_not_utf8(exc)]) from None


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text: byte {exc.start} (0x{exc.object[exc.start]:02x}) cannot be read"


class _KeyFileRead(NamedTuple):
    keys: list[AuthKey]
    problems: Problems
    """Where problems about these keys go: the policy's list, naming the key file and its lines."""
    text: str
    listed: bool = False
    """The file has a ``keys`` entry (an empty list included)."""


def _read_key_file(
    path: Path,
    environ: Mapping[str, str],
    problems: Problems,
    notes: list[str] | None = None,
    text: str | None = None,
) -> _KeyFileRead:
    """``keys: [...]`` from a file of its own (or ``text``, its content as kept); a missing file
    is an empty list (no keys made yet)."""
    source = str(path)
    where = problems.sibling(source)
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
    except FileNotFoundError:
        return _KeyFileRead([], where, "")
    except OSError as exc:
        problems.messages.append(f"{source}: cannot read the key file: {exc.strerror or exc}")
        return _KeyFileRead([], where, "")
    except UnicodeDecodeError as exc:
        problems.messages.append(f"{source}: {_not_utf8(exc)}")
        return _KeyFileRead([], where, "")
    try:
        root = _compose(text, source)
    except ConfigError as exc:
        problems.messages.extend(f"{source}: {problem}" for problem in exc.problems)
        return _KeyFileRead([], where, text)
    said = len(where)  # a problem said as it is read counts (t201: a value YAML cannot build is refused unsaid)
    try:
        data = _NodeReader(source, environ, where, notes, key_file=True).read(root, ()) if root else {}
    except ConfigError as exc:
        problems.messages.extend(f"{source}: {problem}" for problem in exc.problems)
        return _KeyFileRead([], where, text)
    key_file = convert(data, KeyFile, (), where)
    if key_file is None and len(where) > said:  # for the rules only (the file is refused): the keys beside a bad one
        key_file = convert(data, KeyFile, (), where.unsaid())
    listed = isinstance(data, dict) and "keys" in data
    return _KeyFileRead(key_file.keys if key_file is not None else [], where, text, listed)


def _compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree (it keeps line numbers), or a ConfigError naming the line."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError(source, ["nested too deep to read"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        if mark is not None and _char_at(text, mark.line, mark.column) == "\t":  # t63: libyaml never says "tab"
            problem = "a tab character; YAML indents with spaces only"
        elif mark is not None and _char_at(text, mark.line, mark.column - 1, 2) == "${":  # t134: "expected ','"
            problem = (
                "inside `{...}` or `[...]` a bare value ends at the `{` of `${`: quote the reference where "
                f"the value is text, else {BLOCK_STYLE}"
            )
        raise ConfigError(source, [f"{where}not valid YAML: {problem}"]) from None


def _char_at(text: str, line: int, column: int, length: int = 1) -> str:
    lines = text.splitlines()
    return lines[line][max(column, 0) : column + length] if line < len(lines) else ""


_MAX_VALUES = 200_000
"""Values a policy file may hold (aliases expanded); its key file has a room of its own."""
_MAX_KEY_FILE_VALUES = 2_000_000
"""A key file's: a key with every field and three models is 15 values, so 100,000 such keys are
1.5 million (``keys new`` writes 4 for a key with no models or limits given)."""
_MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"


class _Endless(Exception):
    """What :func:`_values_in` finds: an alias inside the node it names, or nesting past :data:`_MAX_DEPTH`."""


def _values_in(root: yaml.Node, bound: int) -> int:
    """How many values reading ``root`` makes, an alias counting as the node it repeats (a number
    past ``bound`` once that is certain); :class:`_Endless` for what no reading of it could end.

    Each collection is counted once (an alias is the very node of its anchor), so this takes
    time in the file's size, not in what its aliases expand to: 700 bytes of them can expand to
    10**8 values. 0.4 s for 100,000 keys written in full, against 20 s to compose them."""
    sizes: dict[int, int] = {}

    def count(node: yaml.Node, depth: int) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise _Endless("a YAML alias inside the value it names (it never ends)")
            return known
        if depth > _MAX_DEPTH:
            raise _Endless(f"nested deeper than {_MAX_DEPTH} (YAML aliases included)")
        sizes[id(node)] = -1  # counting: met again below itself, it is a cycle
        children = (value for _, value in node.value) if isinstance(node, yaml.MappingNode) else node.value
        total = 1
        for child in children:
            total += 1 if isinstance(child, yaml.ScalarNode) else count(child, depth + 1)
            if total > bound:
                break
        sizes[id(node)] = total
        return total

    return 1 if isinstance(root, yaml.ScalarNode) else count(root, 0)


class _Lines:
    """The line each path's value starts on, looked up in the composed tree when a problem is said:
    not kept per value, as a million values' paths would take hundreds of MB."""

    def __init__(self, node: yaml.Node, path: _Path) -> None:
        self._node = node
        self._path = path
        self._keys: dict[int, dict[str, yaml.Node]] = {}
        """Each mapping looked into, by its keys (the last of a duplicate, as the reader keeps)."""

    def __call__(self, path: _Path) -> int | None:
        """The line of ``path``, or of the nearest enclosing value read from the file."""
        if path[: len(self._path)] != self._path:
            return None
        node = self._node
        for part in path[len(self._path) :]:
            child = self._child(node, part)
            if child is None:
                break
            node = child
        return node.start_mark.line + 1

    def _child(self, node: yaml.Node, part: str | int) -> yaml.Node | None:
        if isinstance(node, yaml.SequenceNode):
            return node.value[part] if isinstance(part, int) and 0 <= part < len(node.value) else None
        if not isinstance(node, yaml.MappingNode) or not isinstance(part, str):
            return None
        keys = self._keys.get(id(node))
        if keys is None:
            keys = self._keys[id(node)] = {
                key.value: value for key, value in node.value if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE
            }
        return keys.get(part)


class _NodeReader:
    """Turns a composed YAML tree into plain values; ``problems`` finds each path's line in it."""

    def __init__(
        self,
        source: str,
        environ: Mapping[str, str],
        problems: Problems,
        notes: list[str] | None = None,
        *,
        key_file: bool = False,
    ) -> None:
        self._source = source
        self._max_values = _MAX_KEY_FILE_VALUES if key_file else _MAX_VALUES
        self._what = "a key file" if key_file else "a policy"
        self._environ = environ
        self._problems = problems
        self._notes = notes
        """When a list: unset variables are noted here and a placeholder stands in for them."""
        self._loader = _Constructor("")
        self.warnings: list[str] = []
        """Text that looks meant as a ``${VAR}`` but is used as written (t63)."""

    def read(self, node: yaml.Node, path: _Path) -> Any:
        """The node's value; a ConfigError past :data:`_MAX_VALUES` (aliases repeat a node wherever
        they stand: eight levels of them in 1 KB would expand to gigabytes), counted before
        anything is built, or nesting too deep."""
        try:
            values = _values_in(node, self._max_values)
        except _Endless as exc:
            raise ConfigError(self._source, [f"{exc}: not {self._what}"]) from None
        if values > self._max_values:
            problem = f"more than {self._max_values:,} values (YAML aliases included)"
            raise ConfigError(self._source, [f"{problem}: not {self._what}"])
        self._problems.line_at = _Lines(node, path)
        return self._read(node, path)

    def _read(self, node: yaml.Node, path: _Path, *, in_flow: bool = False) -> Any:
        """``in_flow``: the node stands inside ``{...}`` or ``[...]``."""
        if len(path) > _MAX_DEPTH:
            raise ConfigError(
                self._source, [f"nested deeper than {_MAX_DEPTH} (YAML aliases included): not {self._what}"]
            )
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == _MERGE:
                    self._problems.add(path, "YAML merge keys (<<) are not supported", line=line)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self._problems.add(path, "a key must be a plain name, not a mapping or a list", line=line)
                    continue
                key = self._key(key_node, path)
                if key in out:
                    self._problems.add((*path, str(key)), "duplicate key", line=line)
                out[key] = self._read(value_node, (*path, str(key)), in_flow=node.flow_style is True)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._read(item, (*path, i), in_flow=node.flow_style is True) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path, in_flow=in_flow)

    def _key(self, node: yaml.ScalarNode, path: _Path) -> Any:
        """A mapping key: every one in a policy is a name (a field, model, route, tenant, header).

        One that YAML reads as another type is a problem saying what was written (t63: a tenant
        ``no`` was ``tenants.False: Expected str, got bool``), and the written text stands in.
        """
        key = self._construct(node, path, of_key=True)
        line = node.start_mark.line + 1
        if not isinstance(key, str):
            written = node.value if len(node.value) <= 40 else node.value[:37] + "..."
            self._problems.add(
                (*path, written),
                f"{written or '(empty)'} is read as {_KINDS.get(type(key), 'a value')}, not a name; "
                f"write it in quotes ('{written}') to use it as a name",
                line=line,
            )
            return node.value
        if "${" in node.value:  # names are never substituted: see gateway.config.envsubst
            self.warnings.append(
                f"{dotted((*path, node.value))} (line {line}): ${{...}} is substituted in values, not in names; "
                "this name is used as written"
            )
        return key

    def _scalar(self, node: yaml.ScalarNode, path: _Path, *, in_flow: bool) -> Any:
        if "${" in node.value and nesting(node.value) > MAX_NESTING:
            self._problems.add(path, f"`${{...}}` nested more than {MAX_NESTING} deep in defaults")
            self._problems.standing_in.add(path)  # the value as written is no one's to judge
            return node.value
        if "$" in node.value:
            where = f"{dotted(path) or '(top level)'} (line {node.start_mark.line + 1})"
            wrong = malformed(node.value)
            self.warnings += [f"{where}: {problem}; the value is used as written" for problem in wrong]
            if wrong:  # lost with the warnings when the file is refused: said with the value's problem too (t66)
                self._problems.malformed[path] = wrong
        if "${" in node.value:
            value, unset, used = _with_placeholders(node.value, self._environ)
            if used:
                self._problems.from_env[path] = used
            if unset:  # a placeholder stands in, so the rest of the file is still checked
                if self._notes is not None:
                    self._problems.standing_in.add(path)
                    where = f"{dotted(path)} (line {node.start_mark.line + 1})"
                    self._notes += [
                        f"{name} is not set: {where} needs it to serve (or give a default)" for name in unset
                    ]
                else:
                    for name in unset:
                        self._problems.add(
                            path,
                            f"environment variable {name} is not set and has no default "
                            f"(write ${{{name}:-default}} to give one)",
                        )
                return value
            if not node.style:  # plain (None from PyYAML, "" from libyaml): "${PORT}" becomes an int, as if inline
                tag = self._loader.resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
                node = yaml.ScalarNode(tag, value, node.start_mark, node.end_mark, node.style)
            else:
                if in_flow:  # t134: quoted because YAML needs it there; the fix is block style, not no quotes
                    self._problems.quoted_in_flow.add(path)
                return value
        if not node.style and node.tag == _STR and _EXPONENT.fullmatch(node.value):
            self._problems.exponents.add(path)
        return self._construct(node, path)

    def _construct(self, node: yaml.Node, path: _Path, *, of_key: bool = False) -> Any:
        """``of_key``: the node is a key of the mapping at ``path``, not its value."""
        try:
            return self._loader.construct_object(node)
        except yaml.constructor.ConstructorError as exc:  # an unknown tag (!foo), a bad !!binary...
            self._problems.add(path, f"not valid YAML: {exc.problem}", line=node.start_mark.line + 1)
            return node.value if isinstance(node, yaml.ScalarNode) else None  # reported once: checks go on
        except Exception:
            # Named by its tag only: the value may be a secret written in the wrong place.
            tag = node.tag.replace(_YAML_TAG, "!!", 1)
            self._problems.add(
                path,
                f"not a value YAML can build as `{tag}` (the value is not shown here): remove the tag or fix the value",
                line=node.start_mark.line + 1,
            )
            if not of_key:  # t201: the None in its place was judged too ("must be one of ..., got None")
                self._problems.standing_in.add(path)
            return None


_KINDS: dict[type, str] = {bool: "true or false", int: "a number", float: "a number", type(None): "null (no value)"}


def _with_placeholders(value: str, environ: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """The value with each unset variable replaced by a URL that names it, those variables, and
    the set ones whose values went in."""
    filled, unset = dict(environ), list[str]()
    while True:
        used: list[str] = []
        try:
            return substitute(value, filled, used), unset, [name for name in used if name not in unset]
        except MissingVariable as exc:
            unset.append(exc.name)
            filled[exc.name] = f"http://unset-{exc.name.lower().replace('_', '-')}.invalid"


_LEAST_PRICE_PER_MTOK = 0.001
"""Below the cheapest model's price per million tokens: such a price is likely per token."""
_CONVENTIONAL_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _key_warnings(model: str, variable: str, secret: str | None) -> list[str]:
    """What is wrong with a model's API key in the environment (an unset variable, a line break)."""
    shown = variable
    if not _CONVENTIONAL_NAME.fullmatch(variable):  # perhaps a key pasted for its variable's name
        shown = "the variable it names (not shown: it is not an upper-case name; is it a key itself?)"
    if not secret:
        return [f"models.{model}.api_key_env: {shown} is not set; requests to it carry no API key"]
    if any(c in secret.strip() for c in "\r\n\0"):  # t31: a two-line Secret; each request fell back
        return [
            f"models.{model}.api_key_env: {shown} holds a line break, which no header may; "
            "requests to this model fail before they leave"
        ]
    return []


def _salt_warnings(model: str, secret: str | None, environ: Mapping[str, str]) -> list[str]:
    """A ``tenant_cache_salt`` keyed on nothing secret: with no API key and no
    GATEWAY_CACHE_SALT_KEY the salt's key is the model's name (gateway/upstreams/openai.py)."""
    if (secret or "").strip() or environ.get("GATEWAY_CACHE_SALT_KEY"):
        return []
    return [
        f"models.{model}.tenant_cache_salt: keyed on the model's name (no API key, GATEWAY_CACHE_SALT_KEY "
        "unset): anyone who reaches the server directly can compute a tenant's salt; set "
        "GATEWAY_CACHE_SALT_KEY to a secret all gateway processes share"
    ]


def _downgrade_warnings(policy: Policy) -> list[str]:
    """A tenant's ``downgrade_auto_at`` is a share of a USD budget, its own or one of its keys':
    with none, it never applies (t63: accepted in silence)."""
    budgeted = {key.tenant for key in policy.auth.keys if _has_budget(key.limits)}
    return [
        f"tenants.{name}.downgrade_auto_at: neither the tenant nor any of its keys has usd_per_day or "
        "usd_per_month, so it never applies"
        for name, tenant in policy.tenants.items()
        if tenant.downgrade_auto_at is not None and not _has_budget(tenant.limits) and name not in budgeted
    ]


_REFUSED = "429, with a retry-after SDKs retry on"


def _rates_of_zero(limits: Limits) -> list[str]:
    """``rpm`` and ``tpm`` of 0: valid, as a zero budget is, but no request ever fits (t146)."""
    return [name for name, value in (("rpm", limits.rpm), ("tpm", limits.tpm)) if value == 0]


def _has_budget(limits: Limits) -> bool:
    return limits.usd_per_day is not None or limits.usd_per_month is not None


def _warnings(policy: Policy, environ: Mapping[str, str], key_file: Path | None = None) -> list[str]:
    """What is valid but likely not meant: each turns into a 401, a 404 or a limit that never applies."""
    out = []
    for name, model in policy.models.items():
        secret = environ.get(model.api_key_env) if model.api_key_env else None
        if model.api_key_env and (secret or not model.simulated):  # t66: a simulated upstream needs no key
            out += _key_warnings(name, model.api_key_env, secret)
        if model.tenant_cache_salt and not model.simulated:
            out += _salt_warnings(name, secret, environ)
        for price in msgspec.structs.fields(model.price):
            value = getattr(model.price, price.name)
            if (
                isinstance(value, float | int) and 0 < value < _LEAST_PRICE_PER_MTOK
            ):  # t29: a per-token price billed a millionth
                out.append(
                    f"models.{name}.price.{price.encode_name}: ${value:g} per million tokens; prices are per "
                    f"million tokens (a per-token price would be ${value * 1e6:g} here)"
                )
        timeouts = model.timeouts
        if timeouts.total < timeouts.first_byte:  # t41: accepted in silence
            out.append(
                f"models.{name}.timeouts.total: {timeouts.total:g} s is shorter than first_byte "
                f"({timeouts.first_byte:g} s), which then never applies: the whole answer must come within total"
            )
    names = policy.routes.keys() | policy.models.keys()
    for key in policy.auth.keys:
        unknown = [name for name in key.models if name != "*" and name not in names]
        if unknown:
            out.append(f"key {key.id}: models {', '.join(unknown)} are neither routes nor models; it cannot call them")
        hidden = [
            m for m in key.models if m not in policy.routes and m in policy.models and not policy.models[m].public
        ]
        if hidden:  # t63: they were said to be neither routes nor models
            out.append(f"key {key.id}: models {', '.join(hidden)} are not public (public: false); it cannot call them")
        if policy.tenants and key.tenant not in policy.tenants:
            out.append(f"key {key.id}: tenant {key.tenant!r} is not under tenants:, so no tenant limits apply to it")
        out += [
            f"key {key.id}: limits.{rate} 0 refuses every request it makes ({_REFUSED}); leave it out for no "
            "limit, or revoke the key"
            for rate in _rates_of_zero(key.limits)
        ]
    for name, tenant in policy.tenants.items():
        out += [
            f"tenants.{name}.limits.{rate}: 0 refuses every request of the tenant's keys ({_REFUSED}); leave it "
            "out for no limit"
            for rate in _rates_of_zero(tenant.limits)
        ]
    if policy.auth.mode == "keys" and not policy.auth.keys:
        where = (
            f" ({key_file} does not exist yet: `gateway keys new` writes it)"
            if key_file and not key_file.exists()
            else ""
        )
        out.append(f"auth: mode keys with no key{where}; every request is refused (401)")
    return out


def request_log_problem(path: Path) -> str | None:
    """Why the request log cannot be appended to at ``path`` (None: it can, as far as a look tells)."""
    path = Path(os.path.realpath(path))  # a symlink's target (t44: one into a missing folder passed)
    if path.is_dir():
        return "it is a folder; the gateway cannot open the request log there"
    if not path.parent.is_dir():
        return "its folder does not exist; the gateway cannot open the request log there"
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        return "the gateway's user may not write there; it cannot open the request log"
    return None
