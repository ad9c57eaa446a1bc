"""The one thing every command module needs from argparse, typed without its private classes."""

from __future__ import annotations

import argparse
from typing import Any, Protocol

__all__ = ["Subcommands"]


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as far as a command uses it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...
