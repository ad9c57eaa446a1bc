"""Stop strings the gateway applies itself, for an upstream that refuses ``stop``.

OpenAI's reasoning models (o-series, gpt-5 and its minis) answer ``stop`` with a 400, while the
same request to a small vLLM model honours it: on an ``auto`` route whether a request with
stop strings worked came down to where it was routed, and agents (smolagents, CrewAI,
LangChain's ReAct) rely on theirs to end a turn before the model writes the tool's answer itself.
Such an upstream is sent the request without them; the answer is cut where the first stop
string begins, and it says so as vLLM does (``finish_reason: "stop"``, the string matched in
``stop_reason``). The upstream bills what it generated past the cut, so its usage stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.core.model import Delta, Finish, TextDelta, UsageReport
from gateway.errors import InvalidRequestError

__all__ = [
    "LONGEST_APPLIED",
    "MOST_APPLIED",
    "StopWatch",
    "applied_here",
    "cut_blocks",
    "cut_choices",
    "cut_deltas",
    "stops_of",
    "within_applied_limits",
]

MOST_APPLIED = 16
LONGEST_APPLIED = 1024
"""Stop strings the gateway applies itself are matched on the event loop for every piece of
every choice: 80,000 of them held a worker for 12 s (t67). OpenAI's API takes 4."""


def applied_here(stops: tuple[str, ...], upstream: str) -> tuple[str, ...]:
    """``stops`` for the gateway to apply, refused when more or longer than it matches."""
    if not within_applied_limits(stops):
        raise InvalidRequestError(
            f"stop: model '{upstream}' does not take stop strings, and the gateway applies at most "
            f"{MOST_APPLIED} of them, each at most {LONGEST_APPLIED} characters, itself",
            param="stop",
        )
    return stops


def within_applied_limits(stops: Sequence[str]) -> bool:
    """Whether the gateway matches ``stops`` itself: at most :data:`MOST_APPLIED`, each at most
    :data:`LONGEST_APPLIED` characters (the speculative loop matches its stops on the event loop too)."""
    return len(stops) <= MOST_APPLIED and all(len(stop) <= LONGEST_APPLIED for stop in stops)


def stops_of(value: Any) -> tuple[str, ...]:
    """A chat body's ``stop`` (a string or a list of them) as the non-empty strings it holds."""
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str) and item)
    return ()


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The stop string that completes first in ``text`` (as a server checks after each token, and
    a stream read piece by piece sees it: t53, ``["up\\nAc", "p"]`` cut a whole answer at the first
    and a streamed one at the second), and where it begins; the earlier beginning on a tie."""
    found: tuple[int, int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (found is None or (at + len(stop), at) < found[:2]):
            found = (at + len(stop), at, stop)
    return None if found is None else (found[1], found[2])


def cut_choices(data: dict[str, Any], stops: tuple[str, ...]) -> bool:
    """Each choice of a ``chat.completion`` cut at its first stop string; whether any was."""
    cut = False
    for choice in data.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(content := message.get("content"), str):
            continue
        found = _first_stop(content, stops)
        if found is None:
            continue
        message["content"] = content[: found[0]]
        # A message does not say whether its calls came before its text or after; OpenAI's models
        # and compatible servers' parsers write the text first: the calls are past the stop, as a
        # stream of that order drops them (t53: kept, streamed not). A stream that calls first keeps
        # what it sent before the cut (t58); a whole message cannot tell that apart.
        message.pop("tool_calls", None)
        choice["finish_reason"] = "stop"
        choice["stop_reason"] = found[1]
        cut = True
    return cut


def cut_blocks(content: list[Any], stops: tuple[str, ...]) -> tuple[list[Any], str | None]:
    """An Anthropic message's content blocks ended where the first stop string in their text begins,
    and the string matched (None: no stop, the blocks as they are). Text blocks in a row are one
    text, as a stream's watch reads them; text does not run on across a tool call or thinking, and
    the line the gateway starts text resumed after a call with is not the model's (t58: a ``"\n"``
    stop cut there, and the call was lost). What came before the cut stays, tool calls included;
    nothing after it does, as a stream that gave them out."""
    run: list[tuple[int, str]] = []
    """The text blocks of the current run: their places in ``content``, and their text."""
    for position, block in enumerate(content):
        text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
        if not isinstance(text, str):
            run = []
            continue
        run.append((position, text))
        found = _first_stop("".join(piece for _, piece in run), stops)
        if found is None:
            continue
        at, matched = found
        kept = content[: run[0][0]]
        for place, piece in run:
            kept.append({**content[place], "text": piece[:at]})
            if at <= len(piece):
                break
            at -= len(piece)
        return kept, matched
    return content, None


def cut_deltas(watch: StopWatch, deltas: list[Delta]) -> list[Delta]:
    """A stream's deltas with its text given out only up to the first stop string, and ended there
    (:class:`Finish` ``stop_sequence``); past it only the usage goes on. Text held back as a
    possible stop goes out before anything else the model writes, or its own finish."""
    out: list[Delta] = []
    for delta in deltas:
        if watch.matched is not None:
            if isinstance(delta, UsageReport):
                out.append(delta)
            continue
        if isinstance(delta, TextDelta):
            text = watch.take(delta.text)
            if text:
                out.append(TextDelta(text))
            if watch.matched is not None:
                out.append(Finish("stop_sequence", watch.matched))
            continue
        if not isinstance(delta, UsageReport) and (held := watch.flush()):
            out.append(TextDelta(held))
        out.append(delta)
    return out


class StopWatch:
    """One streamed choice's text, given out as it comes but for a tail that could still become
    a stop string, and cut where one begins."""

    __slots__ = ("_held", "_longest", "_stops", "matched")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._longest = max(len(stop) for stop in stops)
        self._held = ""
        self.matched: str | None = None
        """The stop string that ended the text; nothing is given out after it."""

    def take(self, text: str) -> str:
        """The part of the text so far that can go out now."""
        if self.matched is not None:
            return ""
        pending = self._held + text
        found = _first_stop(pending, self._stops)
        if found is not None:
            self.matched, self._held = found[1], ""
            return pending[: found[0]]
        keep = self._tail_that_may_stop(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """What was held back, once the choice has ended without a stop string."""
        held, self._held = self._held, ""
        return held

    def _tail_that_may_stop(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
