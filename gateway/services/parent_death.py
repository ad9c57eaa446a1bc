"""Children that end with the process that started them, even when it is killed (SIGKILL).

A ``serve`` killed outright runs none of its clean-up: its workers kept serving on the
port (with upstreams that had gone with it) and its private Redis kept running beside the
next gateway's. On Linux the kernel can send a child a signal when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["SUPERVISOR_PID", "end_with_parent", "end_with_supervisor"]

SUPERVISOR_PID = "GATEWAY_SUPERVISOR_PID"
"""Set by ``serve`` for the workers it has an ASGI server start."""

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[[int, int], int] = libc.prctl
    return prctl


def end_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when the thread that
    started it ends (a long-lived one: the main thread, or a supervising thread)."""
    prctl = _prctl()  # looked up before the fork: the child only makes the call
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


def end_with_supervisor() -> None:
    """In a worker of ``serve``: SIGTERM (a drain, then exit) when the supervisor dies; at once
    if it is already gone. A process that is not such a worker is left alone."""
    supervisor = os.environ.get(SUPERVISOR_PID)
    if not supervisor or not supervisor.isdigit() or int(supervisor) == os.getpid():
        return
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(supervisor):  # it died before the call above: the signal will not come
        os.kill(os.getpid(), signal.SIGTERM)
