"""The one thing every command module needs from argparse, typed without its private classes."""

from __future__ import annotations

import argparse
from typing import Any, Protocol

__all__ = ["Subcommands"]


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as a command uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def share(text: str) -> float:
    """An argument that is a share or a probability: a finite number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # nan too (t44: a threshold of nan was written as NaN, which is no JSON)
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value
