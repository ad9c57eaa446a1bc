"""``python -m gateway <command>``.

One module per command, each with the same shape: ``register(subcommands)`` adds its
parser (and sets ``run``), ``run(args)`` does the work and returns the exit status.
A reader of stdout that goes away (``| head``) ends a command quietly, with exit status 1
where it stopped part-way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway.cli import calibrate, check, keys, report, route, router, serve
from gateway.cli._stdout import stdout_gone

__all__ = ["main"]

_COMMANDS = (serve, check, keys, report, route, calibrate, router)
_DISTRIBUTION = "llm-gateway"


class _CommandParser(argparse.ArgumentParser):
    """A command's parser, which refuses what it does not take with its own usage: argparse hands
    a subcommand's leftovers up to the top level, whose usage says nothing of the command's (t166)."""

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        parsed, extras = super().parse_known_args(*args, **kwargs)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="OpenAI-compatible LLM routing gateway")
    parser.add_argument("-V", "--version", action="version", version=f"{_DISTRIBUTION} {_version()}")
    subcommands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for command in _COMMANDS:
        command.register(subcommands)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    status = 1  # a command that stops part-way because its reader left did not do all it was asked
    try:
        status = run(args)
        sys.stdout.flush()  # a reader gone is found here, not at the interpreter's exit (exit 120)
    except BrokenPipeError:
        stdout_gone()
    return status


def _version() -> str:
    """The installed package's version (a source tree run without installing it has none)."""
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
