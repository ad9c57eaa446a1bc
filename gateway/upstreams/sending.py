"""Whether a request's bytes have left for its upstream, for whoever must know what a client's
leaving costs: a request still waiting for a pooled connection costs nothing yet, one sent is
billed by the upstream whatever the client does (t43: hang-ups queued for a connection were sent
later, and billed)."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["SendMark", "note_sent", "note_waiting", "watch_sending"]


class SendMark:
    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False
        """The current attempt's request was written (or handed to a transport that does not say)."""


_MARK: ContextVar[SendMark | None] = ContextVar("gateway_send_mark", default=None)


def watch_sending() -> SendMark:
    """A mark the calls made from here on in this task keep up to date."""
    mark = SendMark()
    _MARK.set(mark)
    return mark


def note_waiting() -> None:
    """An attempt begins: nothing of it is sent yet."""
    mark = _MARK.get()
    if mark is not None:
        mark.sent = False


def note_sent() -> None:
    mark = _MARK.get()
    if mark is not None:
        mark.sent = True
