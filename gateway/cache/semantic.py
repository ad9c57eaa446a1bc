"""The semantic cache: one vector index per namespace, searched for an earlier prompt that
asks the same thing, and a check of each candidate before it is served.

A namespace is specific to a tenant, a route, the system prompt and the parameters that
change the answer (see :func:`gateway.cache.plan.plan_cache`). A lookup:

1. the ``NEAREST_CANDIDATES`` nearest stored prompts at cosine ≥ ``threshold`` (a loose floor:
   the embedding finds candidates, it cannot tell a paraphrase from a near miss);
2. an element whose answer has expired is never served: the lookup removes it;
3. with ``guard`` on, :func:`gateway.cache.structure.conflicts` refuses a candidate whose
   numbers, options, code or script differ;
4. the verifier (:mod:`gateway.cache.verifier`) judges the nearest one left (a prompt
   equal to the new one but for case, spacing, accents, closing punctuation and number
   spelling needs no judging); the most likely candidate whose ``p_same`` clears its
   :class:`ServeBar` is served.

Without a verifier nothing is served semantically: an unverified hit is the failure the
cache exists to avoid.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import structlog

from gateway.cache.entries import CachedAnswer
from gateway.cache.structure import conflicts, matched_structure, same_question
from gateway.cache.verifier import PairVerifier, Verdict
from gateway.config.schema import SemanticCachePolicy
from gateway.store.base import StoreUnavailable, VectorIndex

__all__ = ["SemanticCache", "SemanticHit", "SemanticLookup", "ServeBar"]

NEAREST_CANDIDATES = 4
VERIFIED_CANDIDATES = 1
"""Only the nearest candidate the rules allow goes to the verifier: on 1,024 development
pairs (2026-12-01) judging the two nearest served the same paraphrases and near misses
as judging one, and each candidate costs a forward pass (5-9 ms for a typical pair on 2 cores)."""

_log = structlog.get_logger("gateway.cache")


@dataclass(frozen=True, slots=True)
class ServeBar:
    """The verifier's ``p_same`` a candidate must reach to be served.

    ``matched`` applies where the rules matched numbers or answer options in both prompts,
    ``base`` elsewhere. A candidate at cosine ≥ ``close_similarity`` must also reach
    ``close``: the one-edit near misses that get past the rules embed *closer* to their
    stored prompt than real rewordings do (on the development pairs of 2026-12-01, the
    near misses the verifier passed at 0.98 sat at median cosine 0.95, the paraphrases
    at 0.88), so a small edit needs more certainty than a rewording. A candidate below
    ``far_similarity`` must reach ``far``: there the embedding barely vouches for the pair, and
    the near misses the verifier passed asked another question about the same thing ("is it
    better to stretch before or after running?" / "what stretches should I do before running?")."""

    base: float
    matched: float
    close: float = 0.0
    close_similarity: float = 1.0
    far: float = 0.0
    far_similarity: float = 0.0

    @classmethod
    def of(cls, policy: SemanticCachePolicy) -> ServeBar:
        return cls(
            policy.verify_threshold,
            policy.verify_threshold_matched,
            policy.verify_threshold_close,
            policy.close_similarity,
            policy.verify_threshold_far,
            policy.far_similarity,
        )

    def raised(self, adjust: Callable[[float], float]) -> ServeBar:
        """Each threshold passed through ``adjust`` (the audits' tightening); the cosines stay."""
        return ServeBar(
            adjust(self.base),
            adjust(self.matched),
            adjust(self.close),
            self.close_similarity,
            adjust(self.far),
            self.far_similarity,
        )

    def at(self, similarity: float, matched: bool) -> float:
        bar = self.matched if matched else self.base
        if similarity >= self.close_similarity:
            return max(bar, self.close)
        if similarity < self.far_similarity:
            return max(bar, self.far)
        return bar


@dataclass(slots=True)
class SemanticHit:
    answer: CachedAnswer
    similarity: float
    p_same: float


@dataclass(slots=True)
class SemanticLookup:
    hit: SemanticHit | None
    best_similarity: float | None
    refused: int = 0
    """Candidates above the similarity floor that the rules or the verifier refused."""
    expired_removed: int = 0
    timed_out: Literal["search", "verdict"] | None = None
    """The lookup gave up at a deadline, and so was a miss: the vector search's (the Redis
    timeout, across its calls) or the verifier's (``verify_timeout_ms``)."""


class SemanticCache:
    def __init__(self, index: VectorIndex, verifier: PairVerifier | None) -> None:
        self._index = index
        self._verifier = verifier

    async def lookup(
        self,
        index: str,
        embedding: np.ndarray,
        prompt: str,
        threshold: float,
        bar: ServeBar,
        guard: bool,
        timeout_s: float,
        *,
        verify_timeout_s: float | None = None,
    ) -> SemanticLookup:
        """The stored answer for ``prompt`` the checks allow (else a miss): the search within
        ``timeout_s``, then the verdicts within ``verify_timeout_s`` (None: ``timeout_s`` too). The verifier's one thread
        serves every request of the process, so under load a verdict waits its turn; held to the
        Redis timeout (50 ms), most lookups of 20 concurrent clients gave up on verdicts that
        would have served them, and paid an upstream call instead (t87)."""
        result = SemanticLookup(hit=None, best_similarity=None)
        if self._verifier is None:
            return result
        clock = asyncio.get_running_loop()
        deadline = clock.time() + timeout_s
        stage: Literal["search", "verdict"] = "search"
        try:
            candidates = await self._candidates(result, index, embedding, prompt, threshold, guard, deadline)
            if candidates:
                stage = "verdict"
                verdicts = await self._judge(candidates, prompt, clock.time() + (verify_timeout_s or timeout_s))
                passing = [
                    i
                    for i, (answer, similarity) in enumerate(candidates)
                    if not verdicts[i].unsure
                    and verdicts[i].p_same
                    >= bar.at(similarity, guard and matched_structure(answer.prompt or "", prompt))
                ]
                if passing:
                    best = max(passing, key=lambda i: verdicts[i].p_same)
                    answer, similarity = candidates[best]
                    result.hit = SemanticHit(answer, similarity, verdicts[best].p_same)
                result.refused += len(candidates) - (1 if passing else 0)
        except StoreUnavailable:  # down or slow (a call past its deadline: gateway_redis_timeouts)
            result.hit = None
        except TimeoutError:
            result.hit, result.timed_out = None, stage
        return result

    async def _judge(self, candidates: list[tuple[CachedAnswer, float]], prompt: str, deadline: float) -> list[Verdict]:
        """The verifier's verdicts; a prompt that is :func:`same_question` as the stored one needs
        none (and may be too long for the verifier to read)."""
        assert self._verifier is not None
        verdicts: list[Verdict | None] = [
            Verdict(1.0) if same_question(answer.prompt or "", prompt) else None for answer, _ in candidates
        ]
        asked = [i for i, v in enumerate(verdicts) if v is None]
        if asked:
            pairs = [(candidates[i][0].prompt or "", prompt) for i in asked]
            try:
                async with asyncio.timeout(_left(deadline)):  # not wait_for: see exact.py
                    judged = await self._verifier.judge(pairs, deadline)
            except (TimeoutError, StoreUnavailable):
                raise
            except Exception as exc:  # a failing model is a miss, never a failed request
                _log.warning("cache_verifier_failed", error=type(exc).__name__)
                judged = [Verdict(0.0, unsure=True) for _ in pairs]
            for i, verdict in zip(asked, judged, strict=True):
                verdicts[i] = verdict
        return [v if v is not None else Verdict(0.0, unsure=True) for v in verdicts]

    async def _candidates(
        self,
        result: SemanticLookup,
        index: str,
        embedding: np.ndarray,
        prompt: str,
        threshold: float,
        guard: bool,
        deadline: float,
    ) -> list[tuple[CachedAnswer, float]]:
        found: list[tuple[CachedAnswer, float]] = []
        matches = await self._index.nearest(index, embedding, NEAREST_CANDIDATES, _left(deadline))
        if matches:
            result.best_similarity = matches[0].similarity
        matches = [match for match in matches if match.similarity >= threshold]
        entries = await self._index.entries(index, [match.element for match in matches], _left(deadline))
        for match, raw in zip(matches, entries, strict=True):
            if raw is None:  # its answer expired: never serve it, drop it from the index
                await self._index.remove(index, match.element, _left(deadline))
                result.expired_removed += 1
                continue
            answer = CachedAnswer.decode(raw)
            if answer is None or answer.prompt is None or (guard and await _conflicting(answer.prompt, prompt)):
                result.refused += 1
                continue
            found.append((answer, match.similarity))
            if len(found) == VERIFIED_CANDIDATES:
                break
        return found

    async def store(
        self, index: str, embedding: np.ndarray, answer: CachedAnswer, ttl_s: int, max_entries: int, timeout_s: float
    ) -> None:
        if answer.prompt is None:
            return
        try:
            await self._index.add(
                index, _element(answer.prompt), embedding, answer.encode(), ttl_s, max_entries, timeout_s
            )
        except StoreUnavailable:
            pass  # not stored: a later miss

    async def retire(self, index: str, prompt: str, timeout_s: float) -> None:
        """Serve no more semantic hits from the entry stored for ``prompt``: an audit found
        one of its hits wrong, and the next prompt near it may be the same kind of near miss.
        Its exact-cache answer is another key and stays; a later miss may store it again."""
        try:
            await self._index.remove(index, _element(prompt), timeout_s)
        except StoreUnavailable:
            pass


def _element(prompt: str) -> str:
    """One element per stored prompt."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:20]


def _left(deadline: float) -> float:
    """The time a lookup's next store call may take; none left is an unavailable store."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise StoreUnavailable
    return left


_ON_LOOP_CHARS = 2_000
"""The guard's rules are linear in the text (a few microseconds a character); past this they run
in a worker thread, so one long prompt does not hold every other request."""


async def _conflicting(stored: str, prompt: str) -> bool:
    if len(stored) + len(prompt) <= _ON_LOOP_CHARS:
        return bool(conflicts(stored, prompt))
    return bool(await asyncio.to_thread(conflicts, stored, prompt))
