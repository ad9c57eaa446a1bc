"""``python -m gateway calibrate``: the threshold that sends a target share of prompts to the large model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.cli._classifier import (
    add_classifier_arguments,
    load_classifier_or_exit,
    load_route_or_exit,
    unreadable_input,
)
from gateway.cli._parsers import Subcommands, share
from gateway.config.edit import set_route_threshold

__all__ = ["register", "run"]


def register(commands: Subcommands) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="the threshold that sends a target share of prompts to the large model"
    )
    calibrate.add_argument("--target-large-share", type=share, required=True)
    calibrate.add_argument("--jsonl", required=True, help="a sample of prompts, or - for stdin")
    calibrate.add_argument(
        "--write", action="store_true", help="write it into the policy (a running gateway reloads it)"
    )
    add_classifier_arguments(calibrate)
    calibrate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gateway.classifier.batch import calibrate

    # the file and the route are checked before the work
    target = load_route_or_exit(Path(args.policies), args.route).target_large_share
    classifier = load_classifier_or_exit(args.artifacts)
    try:
        threshold, unreadable = calibrate(classifier, args.jsonl, args.target_large_share)
    except OSError as exc:
        return unreadable_input(args.jsonl, exc)
    except ValueError as exc:  # no prompt at all
        print(f"{args.jsonl}: {exc}", file=sys.stderr)
        return 1
    # Exact (the shortest text that reads back as the same float): the threshold may sit just
    # above a score it must exclude, or at one it must include, and any rounding can cross it.
    print(repr(threshold), flush=True)  # a reader gone (`| head`) stops it here, before --write, buffered or not
    if unreadable:  # as route does: a sample with holes is not a calibration to write silently
        print(f"{unreadable} line(s) could not be read; nothing written", file=sys.stderr)
        return 1
    if args.write:
        try:
            set_route_threshold(args.policies, args.route, threshold)
        except ValueError as exc:  # a threshold the file shares through an anchor: not edited
            print(exc, file=sys.stderr)
            return 1
        print(f"wrote routes.{args.route}.threshold = {threshold!r} to {args.policies}", file=sys.stderr)
        if target is not None and target != args.target_large_share:  # t178: the route keeps its own share
            print(
                f"note: routes.{args.route} has target_large_share {target!r}, not {args.target_large_share!r}: its "
                "threshold moves to keep that share on the large model, and the one written is only where it starts "
                "(before its first shared value for that target)",
                file=sys.stderr,
            )
    return 0
