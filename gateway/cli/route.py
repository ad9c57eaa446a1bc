"""``python -m gateway route``: the classifier's decision for each prompt, without calling upstreams."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import IO

from gateway.cli._classifier import (
    add_classifier_arguments,
    load_classifier_or_exit,
    load_route_or_exit,
    unreadable_input,
    unwritable_output,
)
from gateway.cli._parsers import Subcommands, share
from gateway.cli._stdout import stdout_gone

__all__ = ["register", "run"]


def register(commands: Subcommands) -> None:
    route = commands.add_parser(
        "route", help="score prompts (JSON lines with 'prompt' or 'messages') and print decisions"
    )
    route.add_argument("--jsonl", required=True, help="input file, or - for stdin")
    route.add_argument("--output", default="-", help="output file (default: stdout)")
    route.add_argument("--threshold", type=share, help="default: the route's threshold in the policy")
    add_classifier_arguments(route)
    route.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gateway.classifier.batch import WriteFailed, route_jsonl

    small, large, threshold, _ = load_route_or_exit(Path(args.policies), args.route)
    with ExitStack() as files:
        try:
            # bytes, decoded line by line: a line that is not UTF-8 is that line's error (t146)
            src = sys.stdin.buffer if args.jsonl == "-" else files.enter_context(open(args.jsonl, "rb"))
        except OSError as exc:
            return unreadable_input(args.jsonl, exc)
        if args.output != "-" and args.jsonl != "-" and _same_file(args.jsonl, args.output):
            print(f"--output {args.output} is the input: it would be emptied before it is read", file=sys.stderr)
            return 1
        try:  # before the classifier loads, and not blamed on the input (t51); not emptied yet (t55)
            if args.output != "-":
                open(args.output, "a", encoding="utf-8").close()
        except OSError as exc:
            return unwritable_output(args.output, exc)
        classifier = load_classifier_or_exit(args.artifacts)
        try:
            dst = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            return unwritable_output(args.output, exc)
        if dst is not sys.stdout:
            files.callback(_close, dst)
        try:
            counts = route_jsonl(
                classifier, src, dst, args.threshold if args.threshold is not None else threshold, small, large
            )
        except WriteFailed as failed:
            if args.output != "-":
                return unwritable_output(args.output, failed.error)
            stdout_gone()  # what it still buffers would fail again at exit
            if isinstance(failed.error, BrokenPipeError):  # `| head`: the reader left, not an error to say
                return 1
            return unwritable_output("stdout", failed.error)
        except OSError as exc:
            return unreadable_input(args.jsonl, exc)
    print(
        f"{counts['lines']} prompts: {counts['large']} large, {counts['small']} small, "
        f"{counts['errors']} line(s) could not be read",
        file=sys.stderr,
    )
    return 0 if counts["errors"] == 0 else 1


def _close(file: IO[str]) -> None:
    """Closed after a write that failed too: what it still buffers fails again, and was said already."""
    with suppress(OSError):
        file.close()


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one does not exist (yet)
        return Path(first).resolve() == Path(second).resolve()
