"""``SpeculativeProvider``: the large model, answered through the draft/verify loop.

It speaks the same OpenAI chat interface as any provider; inside, a request is
tokenized with the large model's chat template, decoded by :class:`Decoder`, turned
back into text as vLLM would write it (:mod:`gateway.speculative.text`), and shaped
as ``chat.completion`` (or its chunks). Requests the loop cannot reproduce exactly go
to the large model as they are (``fallback_to_plain`` with a reason in the stats).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, NoReturn, TypeVar

import structlog
from tokenizers import Tokenizer

from gateway.config.schema import SpeculationPolicy
from gateway.core import model as core
from gateway.errors import UpstreamError, UpstreamStatusError, UpstreamTotalTimeoutError
from gateway.protocols.engine_fields import ENGINE_FIELDS
from gateway.protocols.openai_chat import chunk_body, completion_body, usage_body
from gateway.speculative.adaptive import AdaptiveK
from gateway.speculative.drafts import DraftSource, ModelDraft, PromptLookupDraft
from gateway.speculative.eos import EosTable
from gateway.speculative.errors import PairMismatchError
from gateway.speculative.loop import Decoder, Step
from gateway.speculative.stats import SpeculationStats
from gateway.speculative.text import (
    LocalTextAssembler,
    ServerTextAssembler,
    TextAssembler,
    detokenize_is_faithful,
    load_tokenizer,
    tokenizer_matches_server,
)
from gateway.speculative.token_api import TokenAPI
from gateway.upstreams.base import ChatStream, Completion, Provider, UpstreamResponse, Usage
from gateway.upstreams.deadline import total_deadline
from gateway.upstreams.openai import chat_payload
from gateway.upstreams.stop_strings import stops_of, within_applied_limits

__all__ = ["PROBE_TEXT", "SpeculativeProvider"]

_T = TypeVar("_T")

_log = structlog.get_logger("gateway.speculative")

PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. It was the best of times; it was the worst of times.\n"
    "def mean(xs: list[float]) -> float:\n\treturn sum(xs) / len(xs)  # 3.14159, 2**10 = 1024\n"
    "Ünïcödé: naïve café, Straße, 東京, Москва, مرحبا, 🙂🚀 <|endoftext|> </s> [INST]"
)
"""Text both servers must tokenize identically: prose, code, numbers, several scripts, emoji, special-looking strings."""

_VLLM_DEFAULTS: dict[str, object] = {
    "min_tokens": 0,
    "ignore_eos": False,
    "stop_token_ids": None,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "bad_words": None,
    "allowed_token_ids": None,
    "prompt_logprobs": None,
    "truncate_prompt_tokens": None,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "min_p": 0.0,
    "echo": False,
    "add_special_tokens": False,
}
"""vLLM's extra sampling fields at their defaults: any other value changes what the large model
would answer in ways the draft/verify loop does not reproduce, so such a request goes plain."""

_UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "documents",
)

_ENGINE_FIELDS = tuple(sorted(ENGINE_FIELDS))
"""vLLM's and SGLang's engine-level fields, which reach a request only from a key whose
``engine_fields`` keeps them (f223). The loop's calls carry none: a ``lora_path`` or ``vllm_xargs``
(or a ``chat_template``) changes the model the draft would have to agree with, a ``priority``
or ``kv_transfer_params`` belongs to one request's place on the server, not to dozens of
draft/verify calls. Such a request goes plain, sent with them (f229)."""

_DOES_NOT_FIT = "context_length"
"""Why a request went plain when it does not fit the large server's window."""


class SpeculativeProvider(Provider):
    """The target (large) model with a draft source. Shares the target's client, key, name and config."""

    kind: ClassVar[str] = "speculative"

    def __init__(
        self,
        target: Provider,
        draft: Provider | None,
        policy: SpeculationPolicy,
        *,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        # Not Provider.__init__: nothing new is opened, everything is the target's.
        self.name = target.name
        self.config = target.config
        self.client = target.client
        self.base_url = target.base_url
        self.api_key = target.api_key
        self.upstream_model = target.upstream_model
        self.target = target
        self.draft = draft
        self.policy = policy
        self._target_api = TokenAPI(target)
        self._draft_api = TokenAPI(draft) if draft is not None else None
        # The pair check's calls are as small as a draft call: each has the draft's deadline.
        bound = policy.draft_timeout_ms / 1000
        self._target_check = self._target_api.within(bound)
        self._draft_check = self._draft_api.within(bound) if self._draft_api is not None else None
        self._eos = EosTable(eos_token_ids)
        self._pair: bool | None = None
        self._pair_problem: str | None = None
        self._refusal = "pair_refused"
        self._tokenizer: Tokenizer | None = None
        """The pair's own tokenizer (``speculative.tokenizer``); None: text from ``/detokenize``."""
        self._scaled_by_server = (False, False)
        """(target, draft) return logprobs at the request's temperature (vLLM V0) rather than raw."""
        self._sampling_problem: str | None = None
        """Why requests with temperature > 0 go plain (a server refuses ``top_logprobs`` logprobs)."""
        self._checking = False  # a pair check is in flight: other requests go plain meanwhile (pair_checking)
        self._alpha = 0.7  # running acceptance across requests: the prior of each request's k controller
        self._draft_down_until = 0.0  # monotonic time until which requests skip speculation (draft_cooldown_s)
        self._draft_down_reason = "draft_unhealthy"  # draft_too_slow, pair_unchecked: the fallback_reason meanwhile
        self._inflight = 0  # requests to this model through this provider, plain ones included (max_inflight)

    # -- the pair check ------------------------------------------------------------

    async def check_pair(self) -> None:
        """Find out whether and how this pair can speculate; raise :class:`PairMismatchError` if it cannot.

        Both servers must tokenize :data:`PROBE_TEXT` alike; the answer's text must be
        reproducible as the large server's chat endpoint writes it; and each server's
        logprobs are found to be raw or temperature-scaled. Each call has the draft's deadline
        (``draft_timeout_ms``); a call that fails or runs past it raises ``UpstreamError``: the
        pair is then still unchecked, and requests skip speculation for ``draft_cooldown_s``.
        """
        self._checking = True
        try:
            await self._check_pair()
        except UpstreamError:
            self._pause_drafting("pair_unchecked")
            raise
        finally:
            self._checking = False

    async def _check_pair(self) -> None:
        if self.policy.draft_source == "model":
            await self._check_vocabulary()
        await self._check_text()
        if self.policy.sampling == "speculative":
            await self._check_logprobs()
        self._pair, self._pair_problem = True, None

    async def _check_vocabulary(self) -> None:
        draft = self._draft_check
        if draft is None:
            self._refuse("draft_source 'model' needs a draft model, and none was given")
        ours, theirs = await asyncio.gather(
            self._target_check.tokenize_text(PROBE_TEXT), draft.tokenize_text(PROBE_TEXT)
        )
        if ours != theirs:
            first = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
            )
            self._refuse(
                f"'{self.name}' and draft '{draft.name}' tokenize the probe text differently "
                f"({len(ours)} vs {len(theirs)} tokens, first difference at token {first}); "
                "mode 'gateway' needs both servers to share one tokenizer (same model family and vocabulary)"
            )

    async def _check_text(self) -> None:
        path = self.policy.tokenizer
        if path is None:
            if not await detokenize_is_faithful(self._target_check):
                self._refuse(
                    f"'{self.name}' answers /detokenize with text that is not the tokens' own (its tokenizer "
                    "cleans up spaces), so answers could not be written as its chat endpoint writes them; "
                    "set speculative.tokenizer to the model's tokenizer.json",
                    reason="text_unfaithful",
                )
            return
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, path)
        except Exception as exc:  # tokenizers raises bare Exceptions for unreadable files
            self._refuse(f"speculative.tokenizer {path} could not be read: {exc}", reason="tokenizer_unreadable")
        if not await tokenizer_matches_server(tokenizer, self._target_check, PROBE_TEXT):
            self._refuse(
                f"speculative.tokenizer {path} does not decode '{self.name}' token ids to that server's text "
                "(another model's tokenizer?)",
                reason="tokenizer_mismatch",
            )
        self._tokenizer = tokenizer

    async def _check_logprobs(self) -> None:
        prompt = (await self._target_check.tokenize_text(PROBE_TEXT))[:12]
        apis = [self._target_check] + (
            [self._draft_check] if self._draft_check and self.policy.draft_source == "model" else []
        )
        n = self.policy.top_logprobs
        try:
            await asyncio.gather(
                *(api.generate(prompt, 1, temperature=1.0, logprobs=n, prompt_logprobs=n, seed=0) for api in apis)
            )
            self._sampling_problem = None
        except UpstreamStatusError as exc:
            if exc.upstream_status != 400:
                raise
            self._sampling_problem = "top_logprobs_refused"
            _log.error(
                "speculative_sampling_refused", model=self.name, upstream=exc.upstream, top_logprobs=n,
                detail=f"{exc.message}; lower speculative.top_logprobs or raise the server's --max-logprobs",
            )  # fmt: skip
            return  # sampled requests go plain: how the logprobs are scaled does not matter
        found = await asyncio.gather(*(api.logprobs_scaled(prompt) for api in apis))
        # the target verifies with its prompt logprobs; the draft proposes with its sampled ones
        self._scaled_by_server = (found[0][0], found[1][1] if len(found) > 1 else False)
        if any(self._scaled_by_server):
            target, draft = self._scaled_by_server
            _log.info("speculation_logprobs_scaled", model=self.name, target=target, draft=draft)

    def _refuse(self, problem: str, *, reason: str = "pair_refused") -> NoReturn:
        self._pair, self._pair_problem, self._refusal = False, problem, reason
        raise PairMismatchError(f"models.{self.name}.speculative", [problem])

    async def _pair_ready(self) -> str | None:
        """None when the loop may run; otherwise why this request goes plain.

        The request that finds the pair unchecked checks it (within the calls' deadlines); the
        others meanwhile go plain rather than wait for it (t105: they queued, a first-byte timeout each)."""
        if self._pair is None:
            if self._checking:
                return "pair_checking"
            try:
                await self.check_pair()
            except PairMismatchError as exc:
                _log.error("speculation_refused", model=self.name, problems=exc.problems)
            except UpstreamError as exc:
                _log.warning("speculation_pair_unchecked", model=self.name, detail=exc.message)
                return "pair_unchecked"
        return None if self._pair else self._refusal

    # -- Provider ------------------------------------------------------------------

    def salted(self, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        return self.target.salted(body, tenant)

    async def relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> Completion:
        """Passed-through requests go to the target as they are: no token-level API there."""
        return await self.target.relay(body, headers)

    async def open_relay(self, body: dict[str, Any], headers: Mapping[str, str]) -> ChatStream:
        return await self.target.open_relay(body, headers)

    async def forward(self, method: str, path: str) -> UpstreamResponse:
        return await self.target.forward(method, path)

    async def complete(self, request: core.Request, body: dict[str, Any] | None = None) -> Completion:
        self._inflight += 1
        try:
            return await self._complete(
                request, chat_payload(request, body, self.upstream_model, continues=self.config.continue_final_message)
            )
        finally:
            self._inflight -= 1

    async def _complete(self, request: core.Request, body: dict[str, Any]) -> Completion:
        served = self._as_served(body)
        reason = await self._plain_reason(served)
        run = await self._start(served, request.tenant, streaming=False) if reason is None else None
        if run is None:
            stats = self._plain_stats(reason or _DOES_NOT_FIT)
            completion = await _said_plain(self.target.complete(request, body), stats)
            # the target's answer as it is (its tier, a cut at a stop string), with the loop's figures
            return dataclasses.replace(completion, speculation=stats)
        try:
            async with asyncio.timeout_at(total_deadline(self.config.timeouts.total)):
                text = [piece async for piece in run.pieces()]
        except TimeoutError:
            failure = UpstreamTotalTimeoutError(self.name, self.config.timeouts.total)
            failure.speculation = run.stats.to_log()
            raise failure from None
        except UpstreamError as exc:
            exc.speculation = run.stats.to_log()
            raise
        finally:
            await run.aclose()
        usage = Usage(len(run.prompt), run.assembler.completion_tokens)
        content = "".join(text)
        answer = completion_body(
            run.id, run.created, body.get("model", self.upstream_model), {"role": "assistant", "content": content},
            run.assembler.finish_reason, usage_body(usage.prompt_tokens, usage.completion_tokens),
            stop_reason=run.assembler.stop_reason,
        )  # fmt: skip
        return Completion(answer, usage, content, finish_reason=run.assembler.finish_reason, speculation=run.stats)

    async def open_stream(self, request: core.Request, body: dict[str, Any] | None = None) -> ChatStream:
        self._inflight += 1
        try:
            body = chat_payload(request, body, self.upstream_model, continues=self.config.continue_final_message)
            served = self._as_served(body)
            reason = await self._plain_reason(served)
            run = await self._start(served, request.tenant, streaming=True) if reason is None else None
            stream: _PlainStream | _SpeculativeStream
            if run is None:
                stats = self._plain_stats(reason or _DOES_NOT_FIT)
                stream = _PlainStream(await _said_plain(self.target.open_stream(request, body), stats), stats)
            else:
                stream = _SpeculativeStream(run, body.get("model", self.upstream_model), self.config.timeouts.total)
        except BaseException:
            self._inflight -= 1
            raise
        stream.on_close = self._stream_closed
        return stream

    def _as_served(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with the sampling fields it leaves unset as the large server fills them in
        (``server_defaults``): what the loop must reproduce. Plain requests still go out as sent."""
        defaults = self.policy.server_defaults
        if not defaults:
            return body
        unset: dict[str, float] = {name: value for name, value in defaults.items() if body.get(name) is None}
        return {**body, **unset} if unset else body

    def _stream_closed(self) -> None:
        self._inflight -= 1

    async def aclose(self) -> None:
        """Closes the target's client (shared); the draft is its own provider and is closed by its owner."""
        await self.target.aclose()

    # -- helpers -------------------------------------------------------------------

    async def _plain_reason(self, body: dict[str, Any]) -> str | None:
        if self.policy.mode != "gateway":
            return f"mode_{self.policy.mode}"
        if self.policy.max_inflight is not None and self._inflight > self.policy.max_inflight:
            return "busy"
        if time.monotonic() < self._draft_down_until:  # a draft or a pair check failed (or too slow to pay)
            return self._draft_down_reason
        for name in _ENGINE_FIELDS:
            if name in body:  # whatever its value: the server judges it, as without speculation
                return f"unsupported_{name}"
        for name in _UNSUPPORTED:
            if body.get(name) is not None:
                return f"unsupported_{name}"
        if _has_media(body.get("messages")):  # the loop sends token ids: an image would be left out
            return "unsupported_media"
        if self.policy.reasoning_parser and _thinks(body):
            return "reasoning_parser"
        for name, default in _VLLM_DEFAULTS.items():
            value = body.get(name)
            if value is not None and value != default and value != []:
                return f"unsupported_{name}"
        if (body.get("n") or 1) != 1:
            return "unsupported_n"
        stop = body.get("stop")
        if not within_applied_limits(stops_of(stop)):  # matched on the event loop, as applied stops
            return "stop_over_limit"
        if stop == "" or (isinstance(stop, list) and "" in stop):
            return "stop_empty"  # vLLM refuses it (400); the loop would drop it and answer in full (t154)
        if body.get("logprobs") or body.get("top_logprobs"):
            return "unsupported_logprobs"
        if (
            body.get("presence_penalty")
            or body.get("frequency_penalty")
            or body.get("repetition_penalty") not in (None, 1, 1.0)
        ):
            return "unsupported_penalties"
        temperature = _temperature(body)
        if temperature > 0:
            if self.policy.sampling == "plain":
                return "sampling_plain"
            if body.get("top_p") not in (None, 1, 1.0) or body.get("top_k") not in (None, -1, 0) or body.get("min_p"):
                return "unsupported_top_p"
            if temperature > 1.0:  # the tail beyond the returned logprobs grows, and its size is unknown
                return "unsupported_temperature_above_1"
            if body.get("seed") is not None:
                # The loop's draws depend on k, which follows measured timings: the same seeded request
                # gave another answer each time (t49). Plain, it is the large model's own, every time.
                return "seeded_sampling"
        reason = await self._pair_ready()
        if reason is None and temperature > 0 and self._sampling_problem is not None:
            return self._sampling_problem
        return reason

    def _plain_stats(self, reason: str) -> SpeculationStats:
        return SpeculationStats(
            mode="plain",
            draft_source=self.policy.draft_source,
            sampling="plain",
            fallback_to_plain=True,
            fallback_reason=reason,
        )

    def _draft_source(self, tenant: str | None, client_salt: object) -> DraftSource | None:
        if self.policy.draft_source == "prompt_lookup":
            return PromptLookupDraft()
        if self._draft_api is None:
            return None
        return ModelDraft(
            self._draft_api.for_tenant(tenant, client_salt),
            self._eos,
            self.policy.draft_timeout_ms / 1000,
            self._draft_failed,
        )

    def _draft_failed(self) -> None:
        """A draft call failed or ran past its deadline: no speculation for ``draft_cooldown_s``."""
        self._pause_drafting("draft_unhealthy")

    def _draft_too_slow(self) -> None:
        """Drafting lost to plain decoding (t49): the draft server answers, but too slowly to pay."""
        self._pause_drafting("draft_too_slow")

    def _pause_drafting(self, reason: str) -> None:
        if time.monotonic() >= self._draft_down_until:
            _log.warning("draft_unhealthy", model=self.name, reason=reason, cooldown_s=self.policy.draft_cooldown_s)
        self._draft_down_until = time.monotonic() + self.policy.draft_cooldown_s
        self._draft_down_reason = reason

    def _draft_rejected(self) -> None:
        """The large server refused a drafted prompt: the draft server may have changed model
        since the pair was checked. A cooldown, and the pair is checked again after it."""
        self._draft_failed()
        self._pair = None

    async def _start(self, body: dict[str, Any], tenant: str | None, *, streaming: bool) -> _Run | None:
        """The loop for one request; None when the prompt, with the completion it asks for,
        does not fit the large server's window: sent plain, the server refuses it itself
        (vLLM's 400, which the route reads as ``context_length_exceeded``)."""
        extra: dict[str, Any] = {
            key: body[key]
            for key in ("chat_template_kwargs", "continue_final_message", "add_generation_prompt")
            if key in body
        }
        messages = body["messages"]  # chat_payload left out the Anthropic-only parts its chat template knows not
        prompt, max_model_len = await self._target_api.tokenize_chat(messages, extra or None)
        room = (max_model_len or self.config.context_window) - len(prompt)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if room <= 0 or (limit and int(limit) > room):
            return None
        max_new = int(limit) if limit else room
        temperature = _temperature(body)
        stats = SpeculationStats(
            mode="gateway",
            draft_source=self.policy.draft_source,
            sampling="speculative" if temperature > 0 else "greedy",
        )
        client_salt = body.get("cache_salt")  # within the tenant's salt, as on the plain path (t176)
        k = AdaptiveK(self.policy.k_initial, self.policy.k_min, self.policy.k_max, prior_alpha=self._alpha)
        decoder = Decoder(
            self._target_api.for_tenant(tenant, client_salt),
            self._draft_source(tenant, client_salt),
            self._eos,
            k,
            stats,
            temperature=temperature,
            seed=body.get("seed"),
            top_n=self.policy.top_logprobs,
            max_uncovered_mass=self.policy.max_uncovered_mass,
            scaled_by_server=self._scaled_by_server,
            draft_rejected=self._draft_rejected,
            draft_too_slow=self._draft_too_slow,
            min_speedup=self.policy.min_speedup,
        )
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        assembler: TextAssembler = (
            LocalTextAssembler(self._tokenizer, prompt, stops)
            if self._tokenizer is not None
            else ServerTextAssembler(self._target_api, stops, incremental=streaming)
        )
        return _Run(self, prompt, max_new, decoder, assembler, stats, k)

    def _learn_alpha(self, k: AdaptiveK) -> None:
        self._alpha = 0.8 * self._alpha + 0.2 * k.alpha


async def _said_plain(call: Awaitable[_T], stats: SpeculationStats) -> _T:
    """The plain call's result; its failure carries why it went plain, for the request's log line."""
    try:
        return await call
    except UpstreamError as exc:
        exc.speculation = stats.to_log()
        raise


def _thinks(body: dict[str, Any]) -> bool:
    """Whether the model reasons before it answers (its chat template's switch, on by default)."""
    switches = body.get("chat_template_kwargs")
    if not isinstance(switches, dict):
        return True
    return switches.get("enable_thinking", True) is not False and switches.get("thinking", True) is not False


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    return 1.0 if value is None else float(value)


class _Run:
    """One request in flight: the decoder's steps turned into text pieces."""

    def __init__(
        self,
        provider: SpeculativeProvider,
        prompt: list[int],
        max_new: int,
        decoder: Decoder,
        assembler: TextAssembler,
        stats: SpeculationStats,
        k: AdaptiveK,
    ) -> None:
        self.provider = provider
        self.prompt = prompt
        self.assembler = assembler
        self.stats = stats
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._k = k
        self._steps: AsyncIterator[Step] = decoder.run(prompt, max_new) if max_new > 0 else _nothing()
        self.done = False
        self._closed = False

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it becomes final (possibly empty strings); ends when the answer does."""
        while not self.done:
            yield await self.next_piece()

    async def next_piece(self) -> str:
        step = await self._steps.__anext__()
        text = await self.assembler.push(step)
        if self.assembler.finish_reason is not None:
            self.done = True
            await self.aclose()
        return text

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._steps, "aclose", None)
        if aclose is not None:
            await aclose()
        self.provider._learn_alpha(self._k)


async def _nothing() -> AsyncIterator[Step]:
    yield Step([], "length")


class _SpeculativeStream(ChatStream):
    on_close: Callable[[], None] | None = None

    def __init__(self, run: _Run, model: str, total_s: float) -> None:
        super().__init__()
        self._run = run
        self.speculation = run.stats
        self._model = model
        self._deadline = total_deadline(total_s)
        self._total_s = total_s
        self._queue: deque[bytes] = deque()
        self._started = False
        self._finished = False
        tally = self.tally
        tally.id, tally.created, tally.model = run.id, run.created, model
        tally.usage, tally.usage_exact = self._usage(), True  # a cut stream is billed on it (t49)

    async def __anext__(self) -> bytes:
        while not self._queue:
            if self._finished:
                raise StopAsyncIteration
            remaining = self._deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(0.0, remaining)):
                    text = await self._run.next_piece()
            except TimeoutError:
                failure = UpstreamTotalTimeoutError(self._run.provider.name, self._total_s, "stream not finished")
                failure.speculation = self._run.stats.to_log()
                raise failure from None
            except UpstreamError as exc:  # before the first chunk the request log has only this (t49)
                exc.speculation = self._run.stats.to_log()
                raise
            finally:
                self.tally.usage = self._usage()
            if text or not self._started:
                self._queue.append(
                    self._chunk({"role": "assistant", "content": text} if not self._started else {"content": text})
                )
                self._started = True
                self.tally.take_delta({"content": text})
            if self._run.done:
                assembler = self._run.assembler
                finish = assembler.finish_reason
                stop = assembler.stop_reason
                self._queue.append(
                    chunk_body(self._run.id, self._run.created, self._model, {}, finish, stop_reason=stop)
                )
                self.tally.finish_reason, self.tally.stop_sequence = finish, stop
                self._finished = True
        self.tally.chunks += 1
        return self._queue.popleft()

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return chunk_body(self._run.id, self._run.created, self._model, delta, finish)

    def _usage(self) -> Usage:
        """The exact counts so far: the prompt as tokenized, the tokens the large model has given."""
        return Usage(len(self._run.prompt), self._run.assembler.completion_tokens)

    async def aclose(self) -> None:
        try:
            await self._run.aclose()
        finally:
            _closed(self)


def _closed(stream: _PlainStream | _SpeculativeStream) -> None:
    """Tell the provider once that this stream no longer holds a slot (``max_inflight``)."""
    on_close, stream.on_close = stream.on_close, None
    if on_close is not None:
        on_close()


class _PlainStream(ChatStream):
    """The large model's own stream, passed through, with the stats saying why."""

    on_close: Callable[[], None] | None = None
    speculation: SpeculationStats

    def __init__(self, inner: ChatStream, stats: SpeculationStats) -> None:
        super().__init__()
        self._inner = inner
        self.tally = inner.tally
        self.speculation = stats

    async def __anext__(self) -> bytes:
        try:
            return await self._inner.__anext__()
        except UpstreamError as exc:  # why it went plain, for the log of a stream that failed at once (t49)
            exc.speculation = self.speculation.to_log()
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            _closed(self)


def _has_media(messages: Any) -> bool:
    """A message part that is not text (an image, audio, a file), which token ids cannot carry."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in content):
            return True
    return False
