"""``python -m gateway calibrate``: the threshold that sends a target share of prompts to the large model."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from gateway.cli._classifier import (
    add_classifier_arguments,
    load_classifier_or_exit,
    load_route_or_exit,
    unreadable_input,
)
from gateway.cli._parsers import Subcommands
from gateway.config.edit import set_route_threshold

__all__ = ["register", "run"]


def register(commands: Subcommands) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="the threshold that sends a target share of prompts to the large model"
    )
    calibrate.add_argument("--target-large-share", type=float, required=True)
    calibrate.add_argument("--jsonl", required=True, help="a sample of prompts, or - for stdin")
    calibrate.add_argument(
        "--write", action="store_true", help="write it into the policy (a running gateway reloads it)"
    )
    add_classifier_arguments(calibrate)
    calibrate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gateway.classifier.batch import calibrate

    if not 0 <= args.target_large_share <= 1:
        print("--target-large-share must be between 0 and 1", file=sys.stderr)
        return 2
    load_route_or_exit(Path(args.policies), args.route)  # the file and the route are checked before the work
    classifier = load_classifier_or_exit(args.artifacts)
    try:
        threshold, unreadable = calibrate(classifier, args.jsonl, args.target_large_share)
    except (OSError, UnicodeDecodeError) as exc:
        return unreadable_input(args.jsonl, exc)
    except ValueError as exc:  # no prompt at all
        print(f"{args.jsonl}: {exc}", file=sys.stderr)
        return 1
    # Written with 6 decimals: rounded down, or the prompt scored exactly at it (the last one the
    # share takes) would fall below the threshold written and go small.
    threshold = math.floor(threshold * 1e6) / 1e6
    print(f"{threshold:.6f}")
    if unreadable:  # as route does: a sample with holes is not a calibration to write silently
        print(f"{unreadable} line(s) could not be read; nothing written", file=sys.stderr)
        return 1
    if args.write:
        set_route_threshold(args.policies, args.route, threshold)
        print(f"wrote routes.{args.route}.threshold = {threshold:.6f} to {args.policies}", file=sys.stderr)
    return 0
