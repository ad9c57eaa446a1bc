"""The semantic cache: one vector index per namespace, searched for an earlier prompt that means the same.

A namespace is specific to a tenant, a route, the system prompt and the parameters that
change the answer (see :func:`gateway.cache.plan.plan_cache`). An element whose answer
has expired is never served: the lookup removes it. Candidates above the threshold pass
through :func:`gateway.cache.guard.guard_allows` before they are served.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import numpy as np

from gateway.cache.entries import CachedAnswer
from gateway.cache.guard import guard_allows
from gateway.store.base import StoreUnavailable, VectorIndex

__all__ = ["SemanticCache", "SemanticHit", "SemanticLookup"]

_CANDIDATES = 4


@dataclass(slots=True)
class SemanticHit:
    answer: CachedAnswer
    similarity: float


@dataclass(slots=True)
class SemanticLookup:
    hit: SemanticHit | None
    best_similarity: float | None
    refused_by_guard: int = 0
    expired_removed: int = 0


class SemanticCache:
    def __init__(self, index: VectorIndex) -> None:
        self._index = index

    async def lookup(
        self,
        index: str,
        embedding: np.ndarray,
        prompt: str,
        threshold: float,
        guard: bool,
        timeout_s: float,
        *,
        truncated: bool = False,
    ) -> SemanticLookup:
        """The best entry at or above ``threshold`` that the guard allows, all within ``timeout_s``.

        ``truncated``: the prompt ran past the embedding's window (see ``guard_allows(beyond_window=...)``).
        """
        result = SemanticLookup(hit=None, best_similarity=None)
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            await self._search(result, index, embedding, prompt, threshold, guard, deadline, truncated)
        except StoreUnavailable:
            result.hit = None
        return result

    async def _search(
        self,
        result: SemanticLookup,
        index: str,
        embedding: np.ndarray,
        prompt: str,
        threshold: float,
        guard: bool,
        deadline: float,
        truncated: bool,
    ) -> None:
        for match in await self._index.nearest(index, embedding, _CANDIDATES, _left(deadline)):
            if result.best_similarity is None:
                result.best_similarity = match.similarity
            if match.similarity < threshold:
                break
            raw = await self._index.entry(index, match.element, _left(deadline))
            if raw is None:  # its answer expired: never serve it, drop it from the index
                await self._index.remove(index, match.element, _left(deadline))
                result.expired_removed += 1
                continue
            answer = CachedAnswer.decode(raw)
            if (
                guard
                and answer.prompt is not None
                and not guard_allows(prompt, answer.prompt, beyond_window=truncated or answer.prompt_truncated)
            ):
                result.refused_by_guard += 1
                continue
            result.hit = SemanticHit(answer, match.similarity)
            return

    async def store(
        self, index: str, embedding: np.ndarray, answer: CachedAnswer, ttl_s: int, max_entries: int, timeout_s: float
    ) -> None:
        if answer.prompt is None:
            return
        element = hashlib.sha256(answer.prompt.encode()).hexdigest()[:20]
        try:
            await self._index.add(index, element, embedding, answer.encode(), ttl_s, max_entries, timeout_s)
        except StoreUnavailable:
            pass  # not stored: a later miss


def _left(deadline: float) -> float:
    """The time a lookup's next store call may take; none left is an unavailable store."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise StoreUnavailable
    return left
