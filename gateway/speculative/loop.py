"""The draft/verify loop: rounds of k drafted tokens checked by one large-model call.

Each round: the draft source proposes k tokens; the large model gets prefix + draft as
one prompt with ``max_tokens: 1`` and ``prompt_logprobs``; the longest agreeing prefix
of the draft is accepted, then the large model's own token (its correction at the
first disagreement, or the token it generated after a fully accepted draft). The next
round's draft is started before the round's tokens are handed on, so the small
model's work overlaps the gateway's detokenization and streaming.

If the draft server fails, the rest of the answer is one plain streamed completion
on the large model from exactly the accepted tokens: nothing repeated, nothing lost. So
it is when the draft, though answering, is measured to lose to plain decoding (t49).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import structlog

from gateway.errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError
from gateway.speculative.adaptive import AdaptiveK
from gateway.speculative.drafts import Draft, DraftSource
from gateway.speculative.eos import EosTable
from gateway.speculative.sampling import verify_greedy, verify_sampled
from gateway.speculative.stats import SpeculationStats
from gateway.speculative.token_api import Distribution, TokenAPI

__all__ = ["Decoder", "Step"]

"""Logprobs asked for in speculative sampling: vLLM's default ``--max-logprobs``."""

_log = structlog.get_logger("gateway.speculative")

_ROUNDS_TO_JUDGE = 3
"""Drafted rounds measured before the loop may judge the draft too slow (one slow call may be a hiccup)."""


@dataclass(slots=True)
class Step:
    tokens: list[int]
    """Newly final tokens, in order; when ``eos`` the last one is the end-of-sequence token."""
    finish_reason: str | None = None
    eos: bool = False


class Decoder:
    """One request's decoding. Iterate :meth:`run`; closing the iterator early (a stop string) is fine."""

    def __init__(
        self,
        target: TokenAPI,
        draft: DraftSource | None,
        eos: EosTable,
        k: AdaptiveK,
        stats: SpeculationStats,
        *,
        temperature: float,
        seed: int | None = None,
        top_n: int = 20,
        max_uncovered_mass: float = 0.02,
        scaled_by_server: tuple[bool, bool] = (False, False),
        draft_rejected: Callable[[], None] | None = None,
        draft_too_slow: Callable[[], None] | None = None,
        min_speedup: float = 0.5,
    ) -> None:
        self._target = target
        self._draft_rejected = draft_rejected
        """Called when the large server refuses a drafted prompt (the pair is to be checked again)."""
        self._draft_too_slow = draft_too_slow
        """Called when drafting is measured to lose to plain decoding (the provider pauses speculation)."""
        self._min_speedup = min_speedup
        """Drafting is given up below this share of plain decoding's expected tokens per second. Not
        1: the estimate (α from a few rounds, draft time partly overlapped with the gateway's own
        work, plain decoding taken as one verify-sized call per token) is too rough to split hairs
        at break-even; a draft that costs a clear multiple of what it saves (t49: 0.3 s draft calls
        against 10 ms verifies) is stopped within a few rounds."""
        self._draft = draft
        self._eos = eos
        self._k = k
        self.stats = stats
        self._temperature = temperature
        self._rng = random.Random(seed)
        self._seeded = seed is not None
        self._top_n = top_n
        self._max_uncovered = max_uncovered_mass
        self._scaled_by_server = scaled_by_server
        """(target, draft): the server's logprobs come at the request's temperature, not raw."""

    async def run(self, prompt: Sequence[int], max_new: int) -> AsyncIterator[Step]:
        out: list[int] = []
        pending: asyncio.Task[tuple[Draft, float]] | None = None
        try:
            while len(out) < max_new:
                context = [*prompt, *out]
                remaining = max_new - len(out)
                if pending is None:
                    pending = self._start_draft(context, remaining)
                try:
                    draft, draft_s = await pending if pending is not None else (Draft([]), 0.0)
                except UpstreamError as exc:
                    pending = None
                    _log.warning("draft_failed", upstream=exc.upstream, detail=exc.message, at_token=len(out))
                    self.stats.draft_failed = True
                    async for step in self._plain(context, remaining):
                        yield step
                    return
                pending = None
                try:
                    verified = await self._verify(context, draft, remaining)
                except UpstreamStatusError as exc:
                    if not (draft.tokens and exc.upstream_status in (400, 422)):
                        raise  # busy (429) or the gateway's credentials (401, 403): the server's, not the draft's (t33)
                    # The large server refused a prompt that is the client's context plus the draft:
                    # the draft is at fault (ids outside its vocabulary: a draft server redeployed
                    # with another model), not the client (t28). The answer finishes plainly.
                    _log.warning("draft_rejected", upstream=exc.upstream, detail=exc.message[:200], at_token=len(out))
                    self.stats.draft_failed = True
                    if self._draft_rejected is not None:
                        self._draft_rejected()
                    async for step in self._plain(context, remaining):
                        yield step
                    return
                if verified is None:
                    _log.info("speculation_heavy_tail", at_token=len(out), top_n=self._top_n)
                    self.stats.heavy_tail = True
                    async for step in self._plain(context, remaining):
                        yield step
                    return
                step, verify_s = verified
                if not step.tokens and step.finish_reason is None:
                    # a server that answers a round with no token would be asked again for ever (t76)
                    raise UpstreamProtocolError(self._target.name, "answered a completion without a token")
                cpu = time.thread_time()
                self.stats.output_tokens += len(step.tokens)
                out.extend(step.tokens)
                if step.finish_reason is None and len(out) >= max_new:
                    step.finish_reason = "length"
                next_k = self._k.observe(len(draft.tokens), self._last_accepted, draft_s, verify_s)
                self.stats.k_last = next_k
                slow = step.finish_reason is None and self._draft_loses(len(out))
                if step.finish_reason is None and not slow:
                    pending = self._start_draft([*prompt, *out], max_new - len(out))
                self.stats.loop_cpu_ms += (time.thread_time() - cpu) * 1000
                yield step
                if step.finish_reason is not None:
                    return
                if slow:
                    async for step in self._plain([*prompt, *out], max_new - len(out)):
                        yield step
                    return
            yield Step([], "length")
        finally:
            if pending is not None:  # a stop string ended the answer while the next draft was on its way
                pending.cancel()
                pending.add_done_callback(_retrieve)

    # -- one round ---------------------------------------------------------------

    def _start_draft(self, context: list[int], remaining: int) -> asyncio.Task[tuple[Draft, float]] | None:
        k = min(self._k.k, remaining - 1)  # a round yields up to k + 1 tokens
        if k <= 0 or self._draft is None or self.stats.draft_failed:
            return None
        self.stats.k_history.append(k)
        return asyncio.get_running_loop().create_task(self._propose(context, k))

    async def _propose(self, context: list[int], k: int) -> tuple[Draft, float]:
        assert self._draft is not None
        started = time.perf_counter()
        try:
            draft = await self._draft.propose(
                context, k, temperature=self._temperature, top_n=self._top_n, seed=self._next_seed()
            )
        finally:  # a call that failed was made too (t49: the log said draft_calls 0 beside draft_failed)
            elapsed = time.perf_counter() - started
            if self._draft.costly:
                self.stats.draft_calls += 1
                self.stats.draft_ms += elapsed * 1000
        if self._draft.costly:
            self.stats.draft_prompt_tokens += len(context)
            self.stats.draft_completion_tokens += len(draft.tokens)
        return draft, elapsed

    def _draft_loses(self, at_token: int) -> bool:
        """Whether drafting, as measured so far, gives fewer tokens per second than the large
        model alone would (t49: a draft server slow but inside its deadline slowed every answer)."""
        if self._draft is None or not self._draft.costly or self._k.drafted_rounds < _ROUNDS_TO_JUDGE:
            return False
        speedup = self._k.speedup()
        if speedup is None or speedup >= self._min_speedup:
            return False
        _log.warning(
            "draft_too_slow", speedup=round(speedup, 3), alpha=round(self._k.alpha, 3), rounds=self.stats.rounds,
            draft_ms=round(self.stats.draft_ms, 1), verify_ms=round(self.stats.verify_ms, 1), at_token=at_token,
        )  # fmt: skip
        self.stats.fallback_reason = "draft_too_slow"
        if self._draft_too_slow is not None:
            self._draft_too_slow()
        return True

    async def _verify(self, context: list[int], draft: Draft, remaining: int) -> tuple[Step, float] | None:
        """One round; None when the large model's distributions are not covered well enough
        by the returned logprobs to sample from exactly (the caller decodes the rest plainly)."""
        sampled = self._temperature > 0
        # No draft (prompt lookup found nothing): plain decoding, k tokens in one call rather than one.
        burst = 1 if draft.tokens or self._draft is None or self._draft.costly else max(1, min(self._k.k, remaining))
        started = time.perf_counter()
        generation = await self._target.generate(
            [*context, *draft.tokens],
            burst,
            temperature=self._temperature,
            logprobs=1,
            prompt_logprobs=(self._top_n if sampled else 1) if draft.tokens else None,
            prompt_tail=len(draft.tokens),
            seed=self._next_seed(),
        )
        verify_s = time.perf_counter() - started
        self.stats.verify_ms += verify_s * 1000
        cpu = time.thread_time()
        self.stats.rounds += 1
        self.stats.large_calls += 1
        self.stats.large_prompt_tokens += len(context) + len(draft.tokens)
        self.stats.large_completion_tokens += len(generation.tokens)
        self.stats.drafted += len(draft.tokens)
        self._eos.learn(generation.tokens, generation.finish_reason)
        if not draft.tokens:
            accepted, correction = 0, None
        elif sampled:
            assert generation.prompt_top is not None
            if _uncovered(generation.prompt_top) > self._max_uncovered:
                return None
            accepted, correction = verify_sampled(
                draft.tokens,
                draft.dists,
                generation.prompt_top,
                self._temperature,
                self._rng,
                scaled_by_server=self._scaled_by_server,
            )
        else:
            assert generation.prompt_best is not None
            accepted, correction = verify_greedy(draft.tokens, generation.prompt_best)
        self._last_accepted = accepted
        self.stats.accepted += accepted
        self.stats.rejections += accepted < len(draft.tokens)
        if correction is None and accepted == len(draft.tokens):
            tokens = [*draft.tokens, *generation.tokens[:burst]]
        else:
            tokens = [*draft.tokens[:accepted], *([] if correction is None else [correction])]
        self.stats.loop_cpu_ms += (time.thread_time() - cpu) * 1000
        return await self._cut_at_eos(tokens, context, remaining), verify_s

    async def _cut_at_eos(self, tokens: list[int], context: list[int], remaining: int) -> Step:
        for i, token in enumerate(tokens):
            if not self._eos.known(token):
                await self._probe_eos(token, context[-1])
            if token in self._eos.eos:
                # vLLM V1 checks the length cap before EOS: an EOS that is the last token allowed ends
                # a 'length' finish, as the large model alone says (t49)
                return Step(tokens[: i + 1], "length" if i + 1 >= remaining else "stop", eos=True)
        return Step(tokens)

    async def _plain(self, context: list[int], remaining: int) -> AsyncIterator[Step]:
        """The rest of the answer from the large model alone (after a draft failure)."""
        self.stats.large_calls += 1
        stream = self._target.stream_generate(context, remaining, temperature=self._temperature, seed=self._next_seed())
        produced = 0
        async for generation in stream:
            if not produced:  # its first event: the server has read the context
                self.stats.large_prompt_tokens += len(context)
            self._eos.learn(generation.tokens, None)
            produced += len(generation.tokens)
            self.stats.output_tokens += len(generation.tokens)
            self.stats.large_completion_tokens += len(generation.tokens)
            finish = generation.finish_reason
            if finish is None and produced >= remaining:
                finish = "length"
            if finish == "length" and generation.tokens and not self._eos.known(generation.tokens[-1]):
                await self._probe_eos(generation.tokens[-1], context[-1])  # an EOS is kept out of the text
            yield Step(generation.tokens, finish, eos=self._ends_at_eos(generation.tokens, finish))
            if finish is not None:
                return
        yield Step([], "length")  # a stream that ended without a finish reason

    async def _probe_eos(self, token: int, context_token: int) -> None:
        self.stats.eos_probes += 1
        self.stats.large_calls += 1
        probed = await self._eos.probe(self._target, token, context_token)
        self.stats.large_prompt_tokens += 1
        self.stats.large_completion_tokens += len(probed.tokens)

    def _ends_at_eos(self, tokens: list[int], finish: str | None) -> bool:
        """Whether the last token is an end of sequence (kept out of the text): always in a 'stop'
        finish (no stop strings are sent), and in a 'length' one when the EOS was the last token allowed."""
        if not tokens:
            return False
        return finish == "stop" or (finish == "length" and tokens[-1] in self._eos.eos)

    def _next_seed(self) -> int | None:
        return self._rng.getrandbits(31) if self._seeded else None

    _last_accepted: int = 0


def _uncovered(dists: Sequence[Distribution | None]) -> float:
    """The largest probability that a position's returned top logprobs leave out (at
    temperature 1 when the logprobs are raw, at the request's when the server scaled them)."""
    return max((1.0 - sum(math.exp(lp) for lp in d.values()) for d in dists if d), default=0.0)


def _retrieve(task: asyncio.Task[tuple[Draft, float]]) -> None:
    """Collect an abandoned draft's outcome so that its failure is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()
