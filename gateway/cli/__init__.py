"""``python -m gateway <command>``.

One module per command, each with the same shape: ``register(subcommands)`` adds its
parser (and sets ``run``), ``run(args)`` does the work and returns the exit status.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from gateway.cli import calibrate, check, keys, report, route, router, serve

__all__ = ["main"]

_COMMANDS = (serve, check, keys, report, route, calibrate, router)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="OpenAI-compatible LLM routing gateway")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.register(subcommands)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
