"""``python -m gateway check PATH``: every problem of a policy file at once, by field and line; and
what a running gateway would refuse of it, compared with the policy it keeps in force."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.cli._parsers import Subcommands
from gateway.cli._stdout import stdout_gone
from gateway.config.guard import refuse_weakening_by_omission
from gateway.config.kept import KEPT_POLICY, kept_for
from gateway.config.loader import LoadedPolicy, load_policy, load_policy_text
from gateway.errors import ConfigError

__all__ = ["register", "report_invalid", "run"]

_DATA_DIR_HELP = (
    "serve's --data-dir (default .gateway): the file is compared with the policy a running gateway keeps in "
    "force there (policy.last-accepted.yaml), as a reload compares it"
)


def register(commands: Subcommands) -> None:
    check = commands.add_parser(
        "check",
        help="validate a policy file; exits 1 with the problems if it is invalid or a running gateway would refuse it",
    )
    check.add_argument("path")
    check.add_argument("--data-dir", default=".gateway", help=_DATA_DIR_HELP)
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_policy(args.path, unset_ok=True)
    except ConfigError as exc:
        report_invalid(exc)
        return 1
    kept = Path(args.data_dir) / KEPT_POLICY
    # its key file as the gateway reads it: beside the policy file in force, wherever this one is (t134)
    in_force = _in_force(kept, base_dir=(kept_for(kept) or Path(args.path)).parent)
    if isinstance(in_force, LoadedPolicy):
        try:
            refuse_weakening_by_omission(in_force, loaded)
        except ConfigError as exc:
            report_invalid(
                exc, f"a running gateway refuses it (the policy it keeps in force: {kept}, version {in_force.version})"
            )
            return 1
    try:
        _say_valid(loaded, kept, in_force)
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head -1`: the verdict stands
        stdout_gone()
    return 0


def _say_valid(loaded: LoadedPolicy, kept: Path, in_force: LoadedPolicy | str) -> None:
    policy = loaded.policy
    print(f"{loaded.source}: ok (version {loaded.version})")
    print(
        f"  models: {', '.join(sorted(policy.models))}; routes: {', '.join(sorted(policy.routes))}; auth: {policy.auth.mode}"
    )
    if isinstance(in_force, LoadedPolicy):
        print(
            f"  compared with the policy in force at {kept} (version {in_force.version}): nothing that policy sets is left out"
        )
    else:
        print(
            f"  note: {in_force}: not compared with the policy a running gateway keeps in force, which may "
            "refuse a file that leaves out what it sets (give serve's --data-dir)"
        )
    for warning in loaded.warnings:
        print(f"  note: {warning}")


def _in_force(kept: Path, base_dir: Path) -> LoadedPolicy | str:
    """The policy a running gateway keeps in force, as ``serve`` writes it to its data dir, read
    with its key file as it is now (as the gateway reads it again on a reload); or why not."""
    try:
        text = kept.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"no policy in force at {kept}"
    except (OSError, UnicodeDecodeError) as exc:
        return f"the policy in force at {kept} cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})"
    try:
        return load_policy_text(text, source=str(kept), base_dir=base_dir, unset_ok=True)
    except ConfigError as exc:
        return f"the policy in force at {kept} cannot be read ({exc.problems[0] if exc.problems else exc})"


def report_invalid(exc: ConfigError, verdict: str = "invalid") -> None:
    """Every problem, one a line, on stderr (what ``check``, ``keys`` and ``route`` print for an invalid file)."""
    print(f"{exc.source}: {verdict}", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
