"""``python -m gateway check PATH``: every problem of a policy file at once, by field and line."""

from __future__ import annotations

import argparse
import sys

from gateway.cli._parsers import Subcommands
from gateway.config.loader import load_policy
from gateway.errors import ConfigError

__all__ = ["register", "report_invalid", "run"]


def register(commands: Subcommands) -> None:
    check = commands.add_parser("check", help="validate a policy file; exits 1 with the problems if it is invalid")
    check.add_argument("path")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.path, unset_ok=True)
    except ConfigError as exc:
        report_invalid(exc)
        return 1
    policy = loaded.policy
    print(f"{loaded.source}: ok (version {loaded.version})")
    print(
        f"  models: {', '.join(sorted(policy.models))}; routes: {', '.join(sorted(policy.routes))}; auth: {policy.auth.mode}"
    )
    for warning in loaded.warnings:
        print(f"  note: {warning}")
    return 0


def report_invalid(exc: ConfigError) -> None:
    """Every problem, one a line, on stderr (what ``check``, ``keys`` and ``route`` print for an invalid file)."""
    print(f"{exc.source}: invalid", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
