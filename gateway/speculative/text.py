"""Token ids → the text the client sees, as vLLM's chat endpoint makes it, and stop strings.

vLLM's answers are detokenized incrementally, special tokens skipped, spaces left as the
tokens have them. Its ``/detokenize`` endpoint is ``tokenizer.decode`` instead: special
tokens kept and, for tokenizers configured so (Llama-3.1's is),
``clean_up_tokenization_spaces`` applied, which turns ``"from . import x"`` into
``"from. import x"``. Two assemblers, chosen per pair when it is checked:

* :class:`LocalTextAssembler` decodes with the pair's own ``tokenizer.json``
  (``speculative.tokenizer``) as vLLM does: a ``tokenizers`` ``DecodeStream`` primed with
  the prompt's last tokens, special tokens skipped. Exact.
* :class:`ServerTextAssembler` asks the large server's ``/detokenize`` over a window of
  recent tokens. Used only when :func:`detokenize_is_faithful` says that endpoint returns
  the tokens' text unaltered; special tokens other than EOS would then appear in the text.

Stop strings follow vLLM: the answer ends at the first token after which the text
contains one, and is cut before it; the last ``len(longest stop) - 1`` characters are
held back so that a stop string split across rounds is never sent.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from gateway.speculative.loop import Step
from gateway.speculative.token_api import TokenAPI

__all__ = [
    "FIDELITY_PROBE",
    "LocalTextAssembler",
    "ServerTextAssembler",
    "TextAssembler",
    "clean_up_tokenization",
    "detokenize_is_faithful",
    "load_tokenizer",
    "tokenizer_matches_server",
]

FIDELITY_PROBE = "the . a , it 's so ! what ? do n't we"
"""Words and the punctuation that ``clean_up_tokenization_spaces`` pulls left."""

_REANCHOR_AFTER = 256
_ANCHOR_KEEP = 8
_INVALID_PREFIX = "Invalid prefix encountered"
_CLEAN_UPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """What Hugging Face's ``decode`` does to text when ``clean_up_tokenization_spaces`` is set."""
    for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text


def load_tokenizer(path: str) -> Tokenizer:
    """Reads a ``tokenizer.json`` (blocking: call it off the event loop)."""
    return Tokenizer.from_file(path)


async def detokenize_is_faithful(api: TokenAPI) -> bool:
    """Whether the server's ``/detokenize`` gives back the tokens' own text (no clean-up of spaces)."""
    text = await api.detokenize(await api.tokenize_text(FIDELITY_PROBE))
    return text.strip() == FIDELITY_PROBE


async def tokenizer_matches_server(tokenizer: Tokenizer, api: TokenAPI, probe: str) -> bool:
    """Whether ``tokenizer`` turns the server's token ids for ``probe`` into the server's own text."""
    ids = await api.tokenize_text(probe)
    theirs = await api.detokenize(ids)
    ours = tokenizer.decode(ids, skip_special_tokens=False)
    return theirs in (ours, clean_up_tokenization(ours))


class TextAssembler(ABC):
    """Takes the decoder's steps; gives the text that may be sent, and how the answer ended."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self._sent = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        """The stop string that ended the answer (vLLM's ``stop_reason``)."""

    @abstractmethod
    async def push(self, step: Step) -> str:
        """Take a step's tokens; returns the text that may be sent now. Sets :attr:`finish_reason` when done."""

    def _release(self, *, everything: bool) -> str:
        upto = len(self.text) if everything else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent : upto]
        self._sent = upto
        return out


class LocalTextAssembler(TextAssembler):
    """vLLM V1's fast incremental detokenizer, over the pair's own tokenizer."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], stops: Sequence[str]) -> None:
        super().__init__(stops)
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=_prompt_tail(tokenizer, prompt), skip_special_tokens=True)

    async def push(self, step: Step) -> str:
        visible = step.tokens[:-1] if step.eos else step.tokens
        for count, token in enumerate(visible, 1):
            piece = self._step(token)
            if not piece:
                continue
            self.text += piece
            hit = self._stop_hit(len(piece))
            if hit is not None:
                cut, self.stop_reason = hit
                self.text = self.text[:cut]
                self.completion_tokens += count
                self.finish_reason = "stop"
                return self._release(everything=True)
        self.completion_tokens += len(step.tokens)
        if step.finish_reason is not None:
            self.finish_reason = step.finish_reason
            return self._release(everything=True)
        return self._release(everything=False)

    def _step(self, token: int) -> str | None:
        try:
            piece: str | None = self._stream.step(self._tokenizer, token)
        except (OverflowError, TypeError):
            return None
        except Exception as exc:  # tokenizers raises a bare Exception; vLLM resets the stream on this one
            if not str(exc).startswith(_INVALID_PREFIX):
                raise
            self._stream = DecodeStream(skip_special_tokens=True)
            piece = self._stream.step(self._tokenizer, token)
        return piece

    def _stop_hit(self, new_chars: int) -> tuple[int, str] | None:
        """vLLM's ``check_stop_strings``: stop strings in list order, searched where the new text
        could complete one; where the text is cut, and the stop string found."""
        for stop in self._stops:
            index = self.text.find(stop, 1 - new_chars - len(stop))
            if index >= 0:
                return index, stop
        return None


def _prompt_tail(tokenizer: Tokenizer, prompt: Sequence[int]) -> list[int]:
    """The last 4 to 23 prompt tokens, the fewest that decode to whole characters: what the
    answer's first tokens are decoded after (vLLM primed its detokenizer so). Priming with
    the whole prompt costs a decode of all of it on the event loop (20 ms for 100k tokens)."""
    if len(prompt) <= 4:
        return list(prompt)
    for n in range(4, min(len(prompt), 23) + 1):
        tail = list(prompt[-n:])
        if "\ufffd" not in tokenizer.decode(tail, skip_special_tokens=False):
            return tail
    return list(prompt[-23:])


class ServerTextAssembler(TextAssembler):
    """Text from the server's ``/detokenize``, over a window of recent tokens so each round costs one short call.

    A trailing U+FFFD (a multi-byte character cut between tokens) is held back until the
    next token completes it, and left out when none does.
    """

    def __init__(self, api: TokenAPI, stops: Sequence[str], *, incremental: bool = True) -> None:
        super().__init__(stops)
        self._api = api
        self._lazy = not incremental and not self._stops
        """Nothing needs the text before the end (non-streamed, no stop strings): one call at the end."""
        self._ids: list[int] = []
        self._anchor = 0
        self._before = 0  # characters of text before the anchor

    async def push(self, step: Step) -> str:
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
            # half a character at the very end too: vLLM's detokenizer never writes one (t76)
            self.text = self.text[: self._before] + window.rstrip("\ufffd")
            hit = self._find_stop(start)
            if hit is not None:
                cut, end = hit
                self.completion_tokens = counted_before + await self._tokens_until(end, first_new)
                self.stop_reason = self.text[cut:end]
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                return self._release(everything=True)
            if not final:
                await self._maybe_reanchor(window)
        if final:
            self.finish_reason = step.finish_reason
        return self._release(everything=final)

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
