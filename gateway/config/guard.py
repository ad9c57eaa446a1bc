"""What a reload may not do by leaving something out: the rules ``gateway.runtime`` applies to
every edit of the policy in force, and ``gateway check`` to a file against the policy a running
gateway keeps in force (t94: check said ok to edits the gateway then refused), in one place."""

from __future__ import annotations

import msgspec

from gateway.config.loader import GUARDED_SECTIONS, LoadedPolicy
from gateway.config.schema import Limits, Policy, TenantPolicy
from gateway.errors import ConfigError

__all__ = ["refuse_weakening_by_omission"]


def refuse_weakening_by_omission(current: LoadedPolicy, new: LoadedPolicy) -> None:
    """A section that sets limits may be emptied on purpose, never dropped by a file cut short."""
    if current.policy.tenants and "tenants" not in new.sections:
        raise ConfigError(
            new.source,
            ["`tenants` is missing while the policy in force has tenants (write `tenants: {}` to remove them all)"],
        )
    # t56: a file cut before them turned the cache (semantic too) back on, and on_redis_error to open
    dropped = [name for name in GUARDED_SECTIONS if name in current.sections and name not in new.sections]
    if dropped:
        raise ConfigError(
            new.source,
            [
                f"`{name}` is missing while the policy in force sets it (write `{name}: {{}}` for the defaults)"
                for name in dropped
            ],
        )
    key_ids = _key_ids(new.policy)
    unset = _settings_left_out(current, new, key_ids)
    if unset:
        raise ConfigError(new.source, [_left_out(path, current.policy, new.policy, key_ids) for path in unset])
    if current.key_file_keys and new.policy.auth.key_file and new.key_file_keys is None:
        raise ConfigError(
            new.source,
            [
                f"auth.key_file `{new.policy.auth.key_file}` is missing, empty or has no `keys` list while the "
                f"policy in force has {current.key_file_keys} keys from `{current.policy.auth.key_file}` "
                "(write `keys: []` there to remove them all)"
            ],
        )


def _settings_left_out(
    current: LoadedPolicy, new: LoadedPolicy, key_ids: dict[str, list[str]]
) -> list[tuple[str, ...]]:
    """Guarded settings the new file leaves out where the default differs from the value in force.

    t57: a file cut inside ``cache:`` (just after ``exact:``) turned semantic hits back on. A
    mapping written empty (``semantic: {}``) takes its defaults on purpose, nothing inside a
    mapping switched off counts, and a mapping left out is named once, not with each setting in it.
    t94: the same inside ``tenants:`` (a file cut there served an over-budget tenant), where a
    setting left out is no limit; a tenant's whole entry counts only while something still uses it.
    """
    written = new.guarded
    # each written path against its own prefixes, not against every other path (t164: quadratic,
    # a reload of 2,000 tenants held every worker for seconds)
    emptied = written - {path[:depth] for path in written for depth in range(1, len(path))}
    unset: dict[tuple[str, ...], None] = {}  # in order, and looked up by prefix
    for path in sorted(current.guarded - written):  # a mapping sorts before the settings in it
        if any(path[:depth] in emptied for depth in range(1, len(path))):
            continue
        if any(_setting(new.policy, (*path[:depth], "enabled")) is False for depth in range(1, len(path))):
            continue  # `cache: {enabled: false}` leaves nothing in it to weaken
        if any(path[:depth] in unset for depth in range(1, len(path))):
            continue
        if _retired(path, new.policy, key_ids):
            continue
        if _setting(current.policy, path) != _setting(new.policy, path):
            unset[path] = None
    return list(unset)


def _left_out(path: tuple[str, ...], current: Policy, new: Policy, key_ids: dict[str, list[str]]) -> str:
    """What a setting left out would change, and what to write (t66: ops putting an override
    back to its default had no way out shown)."""
    name, where, leaf = ".".join(path), ".".join(path[:-1]), path[-1]
    if path[0] == "tenants" and len(path) == 2:
        return (
            f"`{name}` is missing while the policy in force sets it, and {_users(new, leaf, key_ids)}: left out, no tenant "
            f"limits apply; write `{leaf}: {{}}` under `tenants` to mean that (a tenant no key names may be left out)"
        )
    was, default = _setting(current, path), _setting(new, path)
    if isinstance(was, msgspec.Struct):
        return (
            f"`{name}` is missing while the policy in force sets it, and left out all of it takes its "
            f"defaults: write `{leaf}: {{}}` under `{where}` to mean that"
        )
    meaning = " (no limit)" if default is None and isinstance(_setting(new, path[:-1]), Limits) else ""
    return (
        f"`{name}` is missing while the policy in force sets it to `{_yaml(was)}`, and left out it would be "
        f"`{_yaml(default)}`{meaning}: write `{leaf}: {_yaml(default)}` under `{where}` for the default (or `{path[-2]}: {{}}` "
        f"for all of `{where}`'s defaults), or `{leaf}: {_yaml(was)}` to keep it"
    )


def _yaml(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _retired(path: tuple[str, ...], new: Policy, key_ids: dict[str, list[str]]) -> bool:
    """A tenant's entry the new file leaves out, with no key left to name it (retired, or renamed
    with its keys): its limits no longer apply to anyone, so leaving them out weakens nothing."""
    return path[0] == "tenants" and len(path) > 1 and path[1] not in new.tenants and not _users(new, path[1], key_ids)


def _users(policy: Policy, tenant: str, key_ids: dict[str, list[str]]) -> str:
    """Who a tenant's limits apply to, said as a clause ("" for no one): its keys, or every request
    while auth is off (``gateway.auth.ANONYMOUS`` is tenant ``default``)."""
    if policy.auth.mode == "none":
        return "auth mode none puts every request under it" if tenant == "default" else ""
    ids = key_ids.get(tenant, [])
    if not ids:
        return ""
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return f"key{'s' if len(ids) > 1 else ''} {shown} still name{'' if len(ids) > 1 else 's'} it"


def _key_ids(policy: Policy) -> dict[str, list[str]]:
    """Each tenant's key ids, in the file's order: looked up per tenant, not searched for each."""
    ids: dict[str, list[str]] = {}
    for key in policy.auth.keys:
        ids.setdefault(key.tenant, []).append(key.id)
    return ids


def _setting(policy: Policy, path: tuple[str, ...]) -> object:
    value: object = policy
    for name in path:
        # tenants: one not listed has no tenant limits, as one written empty (gateway.limits.limiter._limits)
        value = value.get(name, _UNLISTED_TENANT) if isinstance(value, dict) else getattr(value, name, None)
    return value


_UNLISTED_TENANT = TenantPolicy()
