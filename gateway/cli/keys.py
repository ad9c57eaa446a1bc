"""``python -m gateway keys new``: make an API key, print its secret once, store only its hash."""

from __future__ import annotations

import argparse
import re
import secrets
import sys

import yaml

from gateway.auth import hash_key
from gateway.cli._parsers import Subcommands
from gateway.cli.check import report_invalid
from gateway.config.edit import append_key
from gateway.config.loader import load_keys
from gateway.config.schema import AuthKey
from gateway.config.validate import Problems, convert
from gateway.errors import ConfigError

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
    new.add_argument("--max-concurrent", type=int, help="requests in flight at once, in each gateway process")
    new.add_argument(
        "--admin",
        action="store_true",
        help="an operator's key: reads every tenant's usage (/v1/usage) and the policy's reload problems (/readyz)",
    )
    new.add_argument("--policies", default="policies.yaml")
    new.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``keys new`` (the only action so far)."""
    try:
        ring = load_keys(args.policies)
    except ConfigError as exc:
        report_invalid(exc)
        return 1
    if ring.key_file is None:
        print(f"{args.policies} names no auth.key_file; add e.g. 'key_file: keys.yaml' under auth:", file=sys.stderr)
        return 1
    key_id = args.id or f"{args.tenant}-{secrets.token_hex(3)}"
    if not _ID.fullmatch(key_id) or not args.tenant.strip():
        print("key ids are 1-64 letters, digits, '.', '_' or '-'; the tenant must not be empty", file=sys.stderr)
        return 1
    if key_id in {key.id for key in ring.keys}:
        print(f"a key with id {key_id!r} exists already", file=sys.stderr)
        return 1
    secret = "gw-" + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"id": key_id, "tenant": args.tenant, "hash": hash_key(secret)}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if models != ["*"]:
        entry["models"] = models
    limits = {
        name: value
        for name, value in (
            ("rpm", args.rpm),
            ("tpm", args.tpm),
            ("usd_per_day", args.usd_per_day),
            ("usd_per_month", args.usd_per_month),
            ("max_concurrent", args.max_concurrent),
        )
        if value is not None
    }
    if limits:
        entry["limits"] = limits
    if args.admin:
        entry["admin"] = True
    problems = Problems()
    if convert(entry, AuthKey, (), problems) is None:  # the checks the gateway will make when it loads the key
        report_invalid(ConfigError("the new key", problems.messages))
        return 1
    try:
        append_key(ring.key_file, entry)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cannot add the key to {ring.key_file}: {exc}", file=sys.stderr)
        return 1
    print(f"key id:  {key_id}\ntenant:  {args.tenant}\nsecret:  {secret}", flush=True)
    print(
        f"The secret is shown only now; {ring.key_file} holds its sha256. A running gateway picks it up by itself.",
        file=sys.stderr,
    )
    if not ring.enabled:
        print(
            f"warning: {args.policies} has auth mode none: no key is asked for, so this one (and its limits) has "
            "no effect until auth: {mode: keys}",
            file=sys.stderr,
        )
    return 0
