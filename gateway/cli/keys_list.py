"""What ``python -m gateway keys list`` shows of each key: where it is written and what it may
do, never its secret nor its whole hash (a prefix tells which secret it is, with ``sha256sum``)."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.config.loader import KeyRing
from gateway.config.schema import AuthKey

__all__ = ["HASH_SHOWN", "listing", "table"]

HASH_SHOWN = len("sha256:") + 8
"""Characters of a key's hash shown: enough to tell keys apart, not to stand for the hash."""

_COLUMNS = ("ID", "TENANT", "MODELS", "LIMITS", "ENGINE_FIELDS", "ADMIN", "HASH", "WRITTEN_IN")


def listing(ring: KeyRing) -> dict[str, Any]:
    """The ``--json`` document: the policy file read, its auth mode and key file, and each key."""
    inline_file = ring.source
    key_file = str(ring.key_file) if ring.key_file is not None else None
    keys = [
        _key(key, "auth.keys", inline_file) if i < ring.inline else _key(key, "key_file", key_file or "")
        for i, key in enumerate(ring.keys)
    ]
    return {
        "policy_file": ring.source,
        "auth_mode": "keys" if ring.enabled else "none",
        "key_file": key_file,
        "keys": keys,
    }


def _key(key: AuthKey, source: str, file: str) -> dict[str, Any]:
    limits = {name: value for name, value in msgspec.structs.asdict(key.limits).items() if value is not None}
    return {
        "id": key.id,
        "tenant": key.tenant,
        "models": list(key.models),
        "limits": limits,
        "engine_fields": list(key.engine_fields),
        "admin": key.admin,
        "hash_prefix": key.hash[:HASH_SHOWN],
        "source": source,
        "file": file,
    }


def table(document: dict[str, Any]) -> str:
    """One line a key under a header, columns aligned; ``-`` for none."""
    rows = [_COLUMNS, *(_row(key) for key in document["keys"])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def _row(key: dict[str, Any]) -> tuple[str, ...]:
    limits = ",".join(f"{name}={value}" for name, value in key["limits"].items())
    written = f"{key['file']}:auth.keys" if key["source"] == "auth.keys" else key["file"]
    return (
        key["id"],
        key["tenant"],
        ",".join(key["models"]) or "-",
        limits or "-",
        ",".join(key["engine_fields"]) or "-",
        "yes" if key["admin"] else "no",
        key["hash_prefix"],
        written,
    )
