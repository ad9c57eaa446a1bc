"""A finished answer told again as a stream, for a client that asked for one (a cache hit)."""

from __future__ import annotations

from gateway.core.model import (
    Answer,
    Delta,
    Finish,
    RedactedThinking,
    RedactedThinkingPart,
    RefusalDelta,
    TextDelta,
    ThinkingDelta,
    ThinkingSignature,
    ToolArgumentsDelta,
    ToolCallStart,
    UsageReport,
)

__all__ = ["deltas_of"]

_FIRST_PIECE_CHARS = 32
"""Text is replayed in pieces: a first small one, a few words as a live stream's first delta, then
each twice the last's length up to :data:`_MOST_PIECE_CHARS` (f211: pieces of a token's worth each
carried a whole event's envelope, ~10 times the answer's bytes on the wire)."""
_MOST_PIECE_CHARS = 2048


def deltas_of(answer: Answer) -> list[Delta]:
    """Reasoning (each part's text in pieces, then its signature), text and a refusal in pieces, each tool
    call, the finish and the usage: what a live stream of the same answer would have said."""
    deltas: list[Delta] = []
    for part in answer.thinking:
        if isinstance(part, RedactedThinkingPart):
            deltas.append(RedactedThinking(part.data))
            continue
        deltas += [ThinkingDelta(piece) for piece in _pieces(part.text)]
        if part.signature:
            deltas.append(ThinkingSignature(part.signature))
    deltas += [TextDelta(piece) for piece in _pieces(answer.text or "")]
    deltas += [RefusalDelta(piece) for piece in _pieces(answer.refusal or "")]
    for index, call in enumerate(answer.tool_calls):
        deltas.append(ToolCallStart(index, call.id, call.name))
        if call.arguments:
            deltas.append(ToolArgumentsDelta(index, call.arguments))
    reason = answer.finish_reason or (None if answer.other_finish else "stop")
    deltas.append(Finish(reason, answer.stop_sequence, answer.other_finish))
    deltas.append(UsageReport(answer.usage))
    return deltas


def _pieces(text: str) -> list[str]:
    """``text`` cut at code points (a str's indices: a UTF-8 character, or a character beyond the BMP
    that JSON writes as a surrogate pair, is never split)."""
    pieces: list[str] = []
    start, size = 0, _FIRST_PIECE_CHARS
    while start < len(text):
        pieces.append(text[start : start + size])
        start, size = start + size, min(2 * size, _MOST_PIECE_CHARS)
    return pieces
