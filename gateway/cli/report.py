"""``python -m gateway report LOG [--by ...] [--since ...] [--until ...] [--format ...] [--png FILE]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gateway.cli._parsers import Subcommands
from gateway.cli._stdout import stdout_gone
from gateway.reporting.aggregate import (
    DIMENSIONS,
    Aggregator,
    DamagedLog,
    open_log,
    parse_dimensions,
    parse_until,
    parse_when,
)
from gateway.reporting.table import FORMATS, render, summary_line

__all__ = ["DAMAGED_LOG", "register", "run"]

DAMAGED_LOG = 3
"""The exit status when the table was printed but a gzipped log ended early or held corrupt data:
only its lines before the damage are in the totals (t109: a cut log read as whole, exit 0)."""

_DESCRIPTION = (
    'Totals from the request log (the JSON lines with "event": "request"): requests, errors, tokens, '
    "cost, baseline cost, savings (baseline − cost, cache hits included) and cache hits, grouped as asked. "
    "Other lines are skipped; malformed ones are counted."
)


def register(commands: Subcommands) -> None:
    parser = commands.add_parser("report", help="cost and savings totals from a request log", description=_DESCRIPTION)
    _add_arguments(parser)
    parser.set_defaults(run=run)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "logs",
        metavar="LOG",
        nargs="+",
        help="request log: a file (plain or gzipped) or - for stdin; several are summed",
    )
    parser.add_argument(
        "--by",
        default="day",
        type=_dimensions,
        help=f"comma-separated grouping, any of {','.join(DIMENSIONS)} in the order wanted; '' for one total (default: day)",
    )
    parser.add_argument(
        "--since",
        type=_when,
        help="first time included: 2026-11-20 (from midnight UTC), 2026-11-20T12:00Z, or 7d / 24h / 30m / 2w ago",
    )
    parser.add_argument(
        "--until",
        type=_until,
        help="last day included, as /v1/usage's end: 2026-11-30 counts that whole day (UTC); a datetime "
        "(2026-11-30T12:00Z) or 7d / 24h / ... ago is the first time excluded (default: no end)",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output on stdout (default: table)")
    parser.add_argument("--png", metavar="FILE", help="also write a chart: cost per day by model, savings per day")


def run(args: argparse.Namespace) -> int:
    """Exit status 0; 2 for arguments it cannot use; 1 when a log cannot be read, holds no line that reads as a
    request line but malformed ones (not a request log), or the chart cannot be drawn; else :data:`DAMAGED_LOG`
    when a gzipped log was damaged (the table is printed all the same)."""
    if args.since and args.until and args.since >= args.until:
        print("report: --since must be before --until", file=sys.stderr)
        return 2  # as argparse's own refusals: 1 is for a log that cannot be read (t146)
    aggregator = Aggregator(args.since, args.until)
    status = 0
    for path in args.logs:
        try:
            if not _feed(aggregator, path):
                status = DAMAGED_LOG
        except OSError as exc:
            print(f"report: cannot read {path}: {exc}", file=sys.stderr)
            return 1
    if not (aggregator.requests or aggregator.out_of_period) and aggregator.malformed:
        # t166: a YAML file or a serve's stderr read as a log of no requests, exit 0
        print(
            f"report: {', '.join(args.logs)}: not a request log: no line of it reads as a request line "
            f"({aggregator.malformed:,} malformed, {aggregator.ignored:,} other events); the policy's "
            "request_log.path names the log",
            file=sys.stderr,
        )
        return 1
    try:
        sys.stdout.write(render(aggregator, args.by, args.format))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: not an error
        stdout_gone()
    if args.format != "table":
        print(summary_line(aggregator), file=sys.stderr)
    if args.png:
        from gateway.reporting.chart import ChartUnavailable, render_png

        try:
            render_png(aggregator, args.png)
        except ChartUnavailable as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"report: cannot write {args.png}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"report: chart written to {args.png}", file=sys.stderr)
    return status


def _feed(aggregator: Aggregator, path: str) -> bool:
    """Add one log's lines: ``False`` for a damaged log, said on stderr with how many of its lines were read."""
    lines_before = aggregator.lines
    try:
        with open_log(path) as lines:
            aggregator.feed(lines)
    except DamagedLog as exc:
        read = aggregator.lines - lines_before
        print(
            f"report: {path} {exc.damage}: {read:,} whole lines read before that; the rest of it is not in the "
            f"totals (exit status {DAMAGED_LOG})",
            file=sys.stderr,
        )
        return False
    return True


def _dimensions(text: str) -> tuple[str, ...]:
    try:
        return parse_dimensions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _until(text: str) -> Any:
    return _when(text, parse_until)


def _when(text: str, parse: Callable[[str], datetime] = parse_when) -> Any:
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except OverflowError:  # "99999999d", "9999-12-31T23:59:59-05:00": before year 1 or after 9999
        raise argparse.ArgumentTypeError(f"out of the range of dates: {text!r}") from None
