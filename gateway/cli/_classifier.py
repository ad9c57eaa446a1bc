"""What ``route`` and ``calibrate`` share: the classifier's arguments, loading it, the route's settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from gateway.cli.check import report_invalid
from gateway.config.loader import load_policy
from gateway.errors import ConfigError
from gateway.settings import DEFAULT_ROUTER_ARTIFACTS

if TYPE_CHECKING:
    from gateway.classifier.runtime import Classifier

__all__ = [
    "RouteSettings",
    "add_classifier_arguments",
    "load_classifier_or_exit",
    "load_route_or_exit",
    "unreadable_input",
    "unwritable_output",
]


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default="policies.yaml")
    parser.add_argument("--route", default="auto")
    parser.add_argument("--artifacts", default=DEFAULT_ROUTER_ARTIFACTS)


def load_classifier_or_exit(artifacts: str) -> Classifier:
    import structlog

    from gateway.classifier import load_classifier

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the results

    classifier = load_classifier(artifacts)
    if classifier is None:
        print(f"the classifier could not be loaded from {artifacts} (see the log line above)", file=sys.stderr)
        raise SystemExit(1)
    return classifier


class RouteSettings(NamedTuple):
    small: str
    large: str
    threshold: float
    target_large_share: float | None


def load_route_or_exit(policy_path: Path, route: str) -> RouteSettings:
    """The pair's models and the route's threshold and target share, from the policy loaded as the gateway loads it.

    Unset ``${VAR}``s are let through, as ``gateway check`` lets them: the upstream URLs may
    not be set where prompts are scored. An invalid file, or no such route, exits with 1.
    """
    try:
        policy = load_policy(policy_path, unset_ok=True).policy
    except ConfigError as exc:
        report_invalid(exc)
        raise SystemExit(1) from None
    if route not in policy.routes:
        print(f"{policy_path}: no route {route!r}; routes are: {', '.join(policy.routes)}", file=sys.stderr)
        raise SystemExit(1)
    if policy.routes[route].strategy != "classifier":
        classifier_routes = [name for name, config in policy.routes.items() if config.strategy == "classifier"]
        print(
            f"{policy_path}: route {route!r} does not use the classifier (it always goes to its model); "
            f"classifier routes: {', '.join(classifier_routes) or 'none'}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    config = policy.routes[route]
    return RouteSettings(policy.pair.small, policy.pair.large, config.threshold, config.target_large_share)


def unreadable_input(path: str, exc: OSError) -> int:
    """A prompt file that cannot be read at all: said in one line, exit status 1 (a line that is
    not UTF-8 is that line's error)."""
    print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
    return 1


def unwritable_output(path: str, exc: OSError) -> int:
    """An output file that cannot be opened for writing: said in one line, exit status 1."""
    print(f"cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
    return 1
