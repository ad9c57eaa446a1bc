"""Where draft tokens come from: the small model, or the prompt's own n-grams ("prompt lookup")."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from gateway.errors import UpstreamError, UpstreamTimeoutError
from gateway.speculative.eos import EosTable
from gateway.speculative.token_api import Distribution, TokenAPI

__all__ = ["Draft", "DraftSource", "ModelDraft", "PromptLookupDraft"]


@dataclass(slots=True)
class Draft:
    tokens: list[int]
    dists: list[Distribution] | None = None
    """The drafter's (raw, temperature-1) logprobs per token, for speculative sampling.
    ``None``: a deterministic proposal (probability 1 for the proposed token)."""


class DraftSource(ABC):
    name: ClassVar[str]
    costly: ClassVar[bool]
    """Whether proposing costs a server call (worth overlapping with the gateway's other work)."""

    @abstractmethod
    async def propose(
        self, context: Sequence[int], k: int, *, temperature: float, top_n: int, seed: int | None
    ) -> Draft:
        """Up to ``k`` tokens that may follow ``context``. Raises UpstreamError if its server fails."""


class ModelDraft(DraftSource):
    """The small model drafts ``k`` tokens by ordinary decoding (greedy at temperature 0, sampled otherwise).

    Each call has its own deadline (``timeout_s``); a call that fails or runs past it is
    reported to ``on_failure`` (the provider then skips speculation for a while) and raises
    UpstreamError, so the answer finishes on the large model."""

    name = "model"
    costly = True

    def __init__(
        self, api: TokenAPI, eos: EosTable, timeout_s: float = 1.0, on_failure: Callable[[], None] | None = None
    ) -> None:
        self.api = api
        self._eos = eos
        self._timeout_s = timeout_s
        self._on_failure = on_failure

    async def propose(
        self, context: Sequence[int], k: int, *, temperature: float, top_n: int, seed: int | None
    ) -> Draft:
        sampled = temperature > 0
        try:
            async with asyncio.timeout(self._timeout_s):
                generation = await self.api.generate(
                    context, k, temperature=temperature, logprobs=top_n if sampled else 1, seed=seed
                )
        except TimeoutError:
            self._failed()
            raise UpstreamTimeoutError(self.api.name, f"draft call over {self._timeout_s * 1000:g} ms") from None
        except UpstreamError as exc:
            if _says_server_is_unhealthy(exc):  # not a context too long for the draft's window
                self._failed()
            raise
        self._eos.learn(generation.tokens, generation.finish_reason)
        return Draft(generation.tokens[:k], generation.top[:k] if sampled and generation.top else None)

    def _failed(self) -> None:
        if self._on_failure is not None:
            self._on_failure()


def _says_server_is_unhealthy(exc: UpstreamError) -> bool:
    """A 400 is this request's (a context longer than the draft server's window): no cooldown for
    everyone. A 401, 403 or 404 is the draft's configuration (its key, its model name), which
    every request would meet.

    Stricter than :func:`gateway.dispatch.says_upstream_is_unhealthy` (t77): a busy draft server
    (429, 408) makes speculation slower than none, and skipping the draft for a while costs only the
    speed-up, where the dispatch rule opens a circuit that takes a model from every client."""
    status = getattr(exc, "upstream_status", None)
    return status is None or status >= 500 or status in (401, 403, 404, 408, 429)


class PromptLookupDraft(DraftSource):
    """Copy what followed the latest earlier occurrence of the context's last n tokens (n = max_ngram..1)."""

    name = "prompt_lookup"
    costly = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, window: int = 4096) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.window = window

    async def propose(
        self, context: Sequence[int], k: int, *, temperature: float, top_n: int, seed: int | None
    ) -> Draft:
        return Draft(lookup(context, k, self.max_ngram, self.min_ngram, self.window))


def lookup(context: Sequence[int], k: int, max_ngram: int, min_ngram: int, window: int) -> list[int]:
    size = len(context)
    lowest = max(0, size - window)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = list(context[size - n :])
        first = suffix[0]
        # latest earlier occurrence whose continuation is not the suffix itself
        for start in range(size - n - 1, lowest - 1, -1):
            if context[start] == first and list(context[start : start + n]) == suffix:
                follow = list(context[start + n : start + n + k])
                if follow:
                    return follow
    return []
