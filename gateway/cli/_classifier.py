"""What ``route`` and ``calibrate`` share: the classifier's arguments, loading it, the route's settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from gateway.settings import DEFAULT_ROUTER_ARTIFACTS

if TYPE_CHECKING:
    from gateway.classifier.runtime import Classifier

__all__ = ["add_classifier_arguments", "load_classifier_or_exit", "route_settings"]


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


def route_settings(policy_path: Path, route: str) -> tuple[str, str, float]:
    """The pair and the route's threshold, read without resolving the rest of the policy (URLs may be unset here)."""
    doc = yaml.safe_load(policy_path.read_text(encoding="utf-8")) or {}
    pair = doc.get("pair") or {}
    settings = (doc.get("routes") or {}).get(route) or {}
    return str(pair.get("small", "small")), str(pair.get("large", "large")), float(settings.get("threshold", 0.5))
