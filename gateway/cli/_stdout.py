"""Stdout that can no longer be written: its reader went away (``gateway check p.yaml | head -1``),
which is not an error, or it failed (a full disk), which the command says on stderr."""

from __future__ import annotations

import os
import sys

__all__ = ["stdout_gone"]


def stdout_gone() -> None:
    """Send stdout to /dev/null from here on: what is still buffered in it, and the interpreter's
    last flush, would fail again (a traceback, or "Exception ignored" and exit 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
