"""``python -m gateway route`` and ``python -m gateway calibrate``: the classifier without upstreams."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from gateway.config.edit import set_route_threshold
from gateway.settings import DEFAULT_ROUTER_ARTIFACTS

if TYPE_CHECKING:
    from gateway.classifier.runtime import Classifier

__all__ = ["add_router_parsers"]


def add_router_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    route = commands.add_parser(
        "route", help="score prompts (JSON lines with 'prompt' or 'messages') and print decisions"
    )
    route.add_argument("--jsonl", required=True, help="input file, or - for stdin")
    route.add_argument("--output", default="-", help="output file (default: stdout)")
    route.add_argument("--threshold", type=float, help="default: the route's threshold in the policy")
    _common(route)
    route.set_defaults(run=_route)

    calibrate = commands.add_parser(
        "calibrate", help="the threshold that sends a target share of prompts to the large model"
    )
    calibrate.add_argument("--target-large-share", type=float, required=True)
    calibrate.add_argument("--jsonl", required=True, help="a sample of prompts, or - for stdin")
    calibrate.add_argument(
        "--write", action="store_true", help="write it into the policy (a running gateway reloads it)"
    )
    _common(calibrate)
    calibrate.set_defaults(run=_calibrate)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default="policies.yaml")
    parser.add_argument("--route", default="auto")
    parser.add_argument("--artifacts", default=DEFAULT_ROUTER_ARTIFACTS)


def _route(args: argparse.Namespace) -> int:
    from gateway.classifier.commands import route_jsonl

    classifier = _load(args.artifacts)
    small, large, threshold = _route_settings(Path(args.policies), args.route)
    counts = route_jsonl(
        classifier, args.jsonl, None if args.output == "-" else args.output,
        args.threshold if args.threshold is not None else threshold, small, large,
    )  # fmt: skip
    print(f"{counts['lines']} prompts: {counts['large']} large, {counts['small']} small, {counts['errors']} unreadable",
          file=sys.stderr)  # fmt: skip
    return 0 if counts["errors"] == 0 else 1


def _calibrate(args: argparse.Namespace) -> int:
    from gateway.classifier.commands import calibrate

    if not 0 <= args.target_large_share <= 1:
        print("--target-large-share must be between 0 and 1", file=sys.stderr)
        return 2
    classifier = _load(args.artifacts)
    threshold, unreadable = calibrate(classifier, args.jsonl, args.target_large_share)
    print(f"{threshold:.6f}")
    if unreadable:  # as route does: a sample with holes is not a calibration to write silently
        print(f"{unreadable} line(s) could not be read; nothing written", file=sys.stderr)
        return 1
    if args.write:
        set_route_threshold(args.policies, args.route, threshold)
        print(f"wrote routes.{args.route}.threshold = {threshold:.6f} to {args.policies}", file=sys.stderr)
    return 0


def _load(artifacts: str) -> Classifier:
    import structlog

    from gateway.classifier import load_classifier

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the results

    classifier = load_classifier(artifacts)
    if classifier is None:
        print(f"the classifier could not be loaded from {artifacts} (see the log line above)", file=sys.stderr)
        raise SystemExit(1)
    return classifier


def _route_settings(policy_path: Path, route: str) -> tuple[str, str, float]:
    """The pair and the route's threshold, read without resolving the rest of the policy (URLs may be unset here)."""
    doc = yaml.safe_load(policy_path.read_text(encoding="utf-8")) or {}
    pair = doc.get("pair") or {}
    settings = (doc.get("routes") or {}).get(route) or {}
    return str(pair.get("small", "small")), str(pair.get("large", "large")), float(settings.get("threshold", 0.5))
