"""Token ids → the text the client sees: incremental detokenization and stop strings.

Text comes from the server's own ``/detokenize`` (the gateway never guesses how a
tokenizer joins pieces), over a window of recent tokens so each round costs one
short call. A trailing U+FFFD (a multi-byte character cut between tokens) is held
back until the next token completes it. Stop strings follow vLLM: the answer ends
at the first token after which the text contains one, and is cut before it; the
last ``len(longest stop) - 1`` characters are held back so that a stop string split
across rounds is never sent.
"""

from __future__ import annotations

import asyncio

from gateway.speculative.loop import Step
from gateway.speculative.token_api import TokenAPI

__all__ = ["TextAssembler"]

_REANCHOR_AFTER = 256
_ANCHOR_KEEP = 8


class TextAssembler:
    def __init__(self, api: TokenAPI, stops: list[str], *, incremental: bool = True) -> None:
        self._api = api
        self._lazy = not incremental and not any(stops)
        """Nothing needs the text before the end (non-streamed, no stop strings): one call at the end."""
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._ids: list[int] = []
        self._anchor = 0
        self._before = 0  # characters of text before the anchor
        self.text = ""
        self._sent = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def push(self, step: Step) -> str:
        """Take a step's tokens; returns the text that may be sent now. Sets :attr:`finish_reason` when done."""
        counted_before = self.completion_tokens
        self.completion_tokens += len(step.tokens)
        visible = step.tokens[:-1] if step.eos else step.tokens
        final = step.finish_reason is not None
        if self._lazy and not final:
            self._ids.extend(visible)
            return ""
        if visible or (self._lazy and self._ids):
            start = len(self.text)
            first_new = len(self._ids)
            self._ids.extend(visible)
            window = await self._api.detokenize(self._ids[self._anchor :])
            self.text = self.text[: self._before] + (window if final else window.rstrip("\ufffd"))
            hit = self._find_stop(start)
            if hit is not None:
                cut, end = hit
                self.completion_tokens = counted_before + await self._tokens_until(end, first_new)
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                return self._release(everything=True)
            if not final:
                await self._maybe_reanchor(window)
        if final:
            self.finish_reason = step.finish_reason
        return self._release(everything=final)

    def _release(self, *, everything: bool) -> str:
        upto = len(self.text) if everything else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent : upto]
        self._sent = upto
        return out

    def _find_stop(self, start: int) -> tuple[int, int] | None:
        """The occurrence that a token-by-token check would meet first: earliest end, then list order."""
        best: tuple[int, int] | None = None
        for stop in self._stops:
            index = self.text.find(stop, max(0, start - len(stop) + 1))
            if index >= 0 and (best is None or index + len(stop) < best[1]):
                best = (index, index + len(stop))
        return best

    async def _tokens_until(self, end: int, first_new: int) -> int:
        """How many of the new tokens it takes for the text to reach ``end`` (vLLM counts them all)."""
        candidates = range(first_new + 1, len(self._ids) + 1)
        texts = await asyncio.gather(*(self._api.detokenize(self._ids[self._anchor : n]) for n in candidates))
        for n, text in zip(candidates, texts, strict=False):
            if self._before + len(text.rstrip("\ufffd")) >= end:
                return n - first_new
        return len(self._ids) - first_new

    async def _maybe_reanchor(self, window: str) -> None:
        """Keep the detokenized window short: move the anchor when the text before it is settled."""
        if len(self._ids) - self._anchor <= _REANCHOR_AFTER or window.endswith("\ufffd"):
            return
        anchor = len(self._ids) - _ANCHOR_KEEP
        tail = await self._api.detokenize(self._ids[anchor:])
        if tail and not tail.startswith("\ufffd") and self.text.endswith(tail):
            self._anchor, self._before = anchor, len(self.text) - len(tail)
