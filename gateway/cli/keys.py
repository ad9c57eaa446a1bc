"""``python -m gateway keys new``: make an API key, print its secret once, store only its hash."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from pathlib import Path

import msgspec
import yaml

from gateway.auth import hash_key
from gateway.cli._parsers import Subcommands
from gateway.config.envsubst import MissingVariable, substitute

__all__ = ["register", "run"]

_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def register(commands: Subcommands) -> None:
    keys = commands.add_parser("keys", help="manage API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    new = actions.add_parser("new", help="create a key: prints the secret once, writes its hash to the key file")
    new.add_argument("--tenant", required=True)
    new.add_argument("--id", help="key id (default: <tenant>-<random>)")
    new.add_argument("--models", default="*", help="comma-separated routes/models it may call (default: all)")
    new.add_argument("--rpm", type=int)
    new.add_argument("--tpm", type=int)
    new.add_argument("--usd-per-day", type=float)
    new.add_argument("--usd-per-month", type=float)
    new.add_argument("--admin", action="store_true", help="may read every key's usage")
    new.add_argument("--policies", default="policies.yaml")
    new.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``keys new`` (the only action so far)."""
    policy_path = Path(args.policies)
    try:
        key_file, existing = _key_file_and_ids(policy_path)
    except (OSError, ValueError, yaml.YAMLError, MissingVariable) as exc:
        print(f"cannot read the keys of {policy_path}: {exc}", file=sys.stderr)
        return 1
    if key_file is None:
        print(f"{policy_path} names no auth.key_file; add e.g. 'key_file: keys.yaml' under auth:", file=sys.stderr)
        return 1
    key_id = args.id or f"{args.tenant}-{secrets.token_hex(3)}"
    if not _ID.fullmatch(key_id) or not args.tenant.strip():
        print("key ids are 1-64 letters, digits, '.', '_' or '-'; the tenant must not be empty", file=sys.stderr)
        return 1
    if key_id in existing:
        print(f"a key with id {key_id!r} exists already", file=sys.stderr)
        return 1
    secret = "gw-" + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"id": key_id, "tenant": args.tenant, "hash": hash_key(secret)}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if models != ["*"]:
        entry["models"] = models
    limits = {name: value for name, value in (("rpm", args.rpm), ("tpm", args.tpm), ("usd_per_day", args.usd_per_day),
              ("usd_per_month", args.usd_per_month)) if value is not None}  # fmt: skip
    if limits:
        entry["limits"] = limits
    if args.admin:
        entry["admin"] = True
    _append(key_file, entry)
    print(f"key id:  {key_id}\ntenant:  {args.tenant}\nsecret:  {secret}", flush=True)
    print(f"The secret is shown only now; {key_file} holds its sha256. A running gateway picks it up by itself.",
          file=sys.stderr)  # fmt: skip
    return 0


def _append(path: Path, entry: dict[str, object]) -> None:
    """Append as text, so the file's comments and layout survive."""
    line = "  - " + msgspec.json.encode(entry).decode() + "\n"  # JSON is valid YAML flow style
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        path.write_text("# API keys: sha256 hashes only. Add with `python -m gateway keys new`.\nkeys:\n" + line)
        return
    text = path.read_text(encoding="utf-8")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(("" if text.endswith("\n") else "\n") + line)


def _key_file_and_ids(policy_path: Path) -> tuple[Path | None, set[str]]:
    """Only the auth section matters here: the rest (upstream URLs...) may be unset on this machine."""
    policy = yaml.safe_load(policy_path.read_text(encoding="utf-8")) or {}
    auth = policy.get("auth") or {}
    ids = {str(key.get("id")) for key in auth.get("keys") or [] if isinstance(key, dict)}
    name = auth.get("key_file")
    if not name:
        return None, ids
    key_file = policy_path.parent / substitute(str(name), os.environ)
    if key_file.exists():
        listed = (yaml.safe_load(key_file.read_text(encoding="utf-8")) or {}).get("keys") or []
        ids |= {str(key.get("id")) for key in listed if isinstance(key, dict)}
    return key_file, ids
