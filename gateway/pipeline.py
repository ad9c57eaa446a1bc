"""The request path for every generating API (chat, Messages, Responses, completions):
auth → policy → cache (exact, semantic, then coalescing) → router → upstreams → accounting,
on the request in the internal model (:class:`gateway.core.model.Request`).

Everything a generating request goes through is here, in the order it happens, and every
outcome ends in one log line; the HTTP layer (``gateway.api``) reads, decodes and encodes it.
Routes that generate nothing answer on their own in ``gateway.api``: counting tokens
(``/v1/messages/count_tokens`` authenticates, limits and plans a route itself) and reading
or deleting a stored response (``/v1/responses/{id}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, cast

import anyio
import msgspec
import numpy as np
import structlog

from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import RequestRecord, exception_frames, log_request, utc_stamp
from gateway.accounting.usage import UsageFigures
from gateway.auth import Credentials, Principal
from gateway.cache.audit import AuditJob, SemanticAudit, effective_threshold, judge_request
from gateway.cache.entries import CachedAnswer
from gateway.cache.exact import LEADER_LEFT, ExactCache, Lease
from gateway.cache.plan import CachePlan, check_directives, plan_cache
from gateway.cache.semantic import SemanticCache, ServeBar
from gateway.classifier import ClassifierError
from gateway.classifier.text import request_text, request_unreadable
from gateway.client_pace import ClientPace
from gateway.config.schema import Price
from gateway.core import model as core
from gateway.core.headers import dropped_header
from gateway.core.replay import deltas_of
from gateway.dispatch import DispatchInfo, dispatch, says_upstream_is_unhealthy
from gateway.drain import CONNECTION_RESET, DEFAULT_DRAIN_S, Drain
from gateway.errors import (
    ClientStalled,
    GatewayError,
    InvalidRequestError,
    ShuttingDownError,
    UpstreamError,
    UpstreamGaveUpError,
    UpstreamProtocolError,
    UpstreamUnavailableError,
)
from gateway.judge import parse_yes_no
from gateway.large_share import LargeShareTracker, ranked
from gateway.learning.examples import Side
from gateway.learning.loop import LearningLoop
from gateway.learning.shadow import ShadowCosts, judged_conversation, read_tokens
from gateway.learning.shadow import judge_request as shadow_judge_request
from gateway.limits import Limiter, Reservation
from gateway.limits.concurrency import InFlight, Slot
from gateway.pricing import SERVICE_TIERS, PricedOptions, cost_usd, unpriced
from gateway.protocols.body import LARGE_BODY_BYTES, named_model, read_off_loop
from gateway.protocols.chat_request import parse_chat_request
from gateway.protocols.engine_fields import without_engine_fields
from gateway.protocols.openai_chat import (
    answer_from_completion,
    chunk_body,
    client_usage,
    completion_from_answer,
    read_chat_request,
    storable_answer,
    stream_from_answer,
    usage_body,
)
from gateway.protocols.tenant_ids import scoped_body, scoped_request
from gateway.routing import RoutePlan
from gateway.runtime import Runtime, RuntimeHolder
from gateway.store.base import StoreUnavailable
from gateway.tokens import count_prompt, count_text, prompt_chars
from gateway.upstreams.base import ChatStream, Completion, Provider, StreamTally, Usage
from gateway.upstreams.sending import SendMark, watch_sending

__all__ = [
    "KEEP_ALIVE",
    "Answer",
    "ChatPipeline",
    "DeltaBatch",
    "KeepAlive",
    "PassThrough",
    "Scorer",
    "StreamBroke",
    "StreamingAnswer",
    "StreamingDeltas",
]

_log = structlog.get_logger("gateway.pipeline")

_KEEP_ALIVE_S = 1.0
_CHECK_EVERY = 64
"""Every so many chunks a stream's relay yields to the event loop and measures what the upstream
has written (t110: a fast upstream's chunks, buffered already, were relayed without the task ever
waiting on a future that was not done: anyio never delivered the cancellation of a client that had
hung up, the upstream was read until its total timeout, and other requests waited behind it)."""
_CHARS_PER_TOKEN = 16
"""What a stream may write, at most, per token the request allows (its ``max_tokens``, else the model's
context window), in characters: past that the upstream is broken, and the stream is cut (t110: one
that wrote for ever grew the worker by ~1 MB/s until the model's total timeout). A token is about
4 characters of English, and 1 or 2 of Chinese; 16 leaves room for long ones (URLs, base64).
Never less than :data:`_LEAST_CHARS`: one token can be a run of 80 spaces."""
_LEAST_CHARS = 65_536
_BIG_PIECE = 16_384
"""A piece this long (its bytes, or a batch's text) is measured at once, not after :data:`_CHECK_EVERY` pieces."""
_ANTHROPIC_OVERLOADED = 529
"""Anthropic's status for an overloaded model, which its SDKs raise as their own error class."""
"""How often a client that has its whole answer and waits for the usage is told the stream is
alive, while the upstream writes on past a stop string the gateway applied (t58)."""


BodyReader = Callable[[int, float, Principal], Awaitable[bytes]]
"""Reads the request body: PayloadTooLargeError past the byte limit, RequestTimeoutError past the seconds."""
Translate = Callable[[bytes, Principal], Awaitable[core.Request]]
"""Decodes another protocol's body into the internal model, by its codec for the authenticated
caller (its tenant, and the names it may call); a GatewayError for a bad body."""


class PromptScore(Protocol):
    @property
    def p_large(self) -> float: ...
    @property
    def embedding(self) -> np.ndarray[Any, Any]: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def features(self) -> np.ndarray[Any, Any] | None: ...


class Scorer(Protocol):
    """The router's classifier: one forward pass gives the routing score and the cache embedding."""

    async def score(self, text: str, tenant: str) -> PromptScore:
        """The tenant's prompts wait their turn with other tenants', not behind a burst of one's (t51)."""
        ...


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    typed: core.Answer | None = None
    """A successful answer for a request that came in another protocol than chat (from the
    upstream, or a cache hit): for that protocol's codec to render, as a body or, a cache hit
    to a client that asked to stream, as a stream (``body`` is then empty)."""


@dataclass(slots=True)
class StreamingAnswer:
    headers: dict[str, str]
    events: AsyncIterator[bytes]
    """SSE bytes, ``data: [DONE]`` included; the request is logged when it ends."""


@dataclass(slots=True, frozen=True)
class StreamBroke:
    """The stream failed after it began: the error as chat's error chunk (``{"error": {...}}``)."""

    chunk: dict[str, Any]

    @property
    def error(self) -> dict[str, Any]:
        error = self.chunk.get("error")
        return error if isinstance(error, dict) else {}


@dataclass(slots=True, frozen=True)
class KeepAlive:
    """Nothing new: the client waits for the usage of an answer it has whole (t58); an edge sends
    what its clients' SDKs skip (an SSE comment, Anthropic's ``ping``)."""


KEEP_ALIVE = KeepAlive()

DeltaBatch = list[core.Delta] | StreamBroke | KeepAlive | None
"""One step of a :class:`StreamingDeltas`: the next deltas, the failure, a keep-alive, or (None)
the clean end."""


@dataclass(slots=True)
class StreamingDeltas:
    """A streamed answer in the internal model, for a client of another protocol than chat:
    batches of deltas, the usage last, then None; or a :class:`StreamBroke`, and nothing after.
    The iterator goes on after either (the cache is filled and the request logged when it ends)."""

    headers: dict[str, str]
    deltas: AsyncIterator[DeltaBatch]
    prompt_tokens: int = 0
    """The gateway's count of the prompt, for protocols that tell it when the stream starts."""
    usage: core.Usage | None = None
    """The whole answer's usage, known before it streams: a cache hit's replay."""


@dataclass(slots=True)
class PassThrough:
    """A request sent upstream as the client wrote it, when both sides speak its protocol.

    The pipeline still reads it in the internal model (auth, limits, counting, routing, the log);
    only the call upstream differs (:meth:`Provider.relay`), and the answer (a body or a
    framed stream) comes back untouched. It is neither served from nor stored in the cache:
    the cache holds internal answers, which a relayed body is not read into, and some of these
    name upstream state (a response's id).
    """

    body: dict[str, Any] | None = None
    """The request as the client sent it; None: the route cannot pass it through (translated)."""
    headers: dict[str, str] = field(default_factory=dict)
    """The client's headers that shape the request upstream (``anthropic-beta``)."""
    held_by: str | None = None
    """The model whose upstream keeps the state the request continues (a previous response)."""
    asked: PricedOptions = field(default_factory=PricedOptions)
    """What the body asks for that its upstream bills above the token prices (t59: fast mode,
    US-only inference, web search), read by the edge that knows the wire format."""


_NO_REQUEST = core.Request(model="", messages=[])
"""Until the body is read (an exchange that ends before, in a 401, has no request)."""
_NOTHING_PRICED = PricedOptions()


@dataclass(slots=True, eq=False)
class _ReadOn:
    """A cut stream's upstream, read on past its client's answer for the usage (t58, t65)."""

    why: str | None = None
    """Why it was not (or will not be) read to its end: ``no_read_allowance``, ``too_many_reads``,
    ``too_many_tenant_reads``, ``past_stop_timeout``, ``drain_deadline``, an upstream error's code,
    ``internal_error``."""
    tenant: str = ""
    """Whose read it is: a tenant holds at most half of a model's reads (t71)."""
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the request is settled (its usage known, or given up on)."""
    task: asyncio.Task[Any] | None = None
    reading: bool = False
    done: bool = False
    """The upstream is let go and the request settled: it is logged once its client's stream ended too."""

    def end(self, why: str) -> None:
        """Ended before the upstream's end (a newer read of the same tenant, the drain deadline):
        the request is settled on what was read."""
        if self.why is None:
            self.why = why
            if self.reading and self.task is not None:
                self.task.cancel()


@dataclass(slots=True)
class _Exchange:
    """One request's state on its way through the pipeline."""

    runtime: Runtime
    record: RequestRecord
    started: float
    at: float
    """``time.time()`` at the start (``record.started_at``): the usage and budgets count then."""
    info: DispatchInfo = field(default_factory=DispatchInfo)
    request: core.Request = _NO_REQUEST
    """The request in the internal model: what every step reads."""
    body: dict[str, Any] | None = None
    """A chat client's own body, sent as it came (the model replaced) to OpenAI-compatible
    upstreams; None for other protocols, which each provider encodes from :attr:`request`."""
    directives: Any = None
    """The chat body's ``gateway_cache`` field, taken out before the body goes upstream."""
    plan: RoutePlan | None = None
    asked: PricedOptions = _NOTHING_PRICED
    """What the request asks for that is billed above the token prices (t59)."""
    prompt_tokens: int = 0
    counted: bool = False
    cache: CachePlan | None = None
    lease: Lease | None = None
    similarity: float | None = None
    reservation: Reservation | None = None
    gave_back: bool = False
    """Its reservation was given back as it waited on an identical request in flight (:meth:`ChatPipeline._give_back`)."""
    slot: Slot | None = None
    """Its place among the key's and tenant's requests in flight (``max_concurrent``)."""
    score: PromptScore | None = None
    scored: bool = False
    unseen: bool = False
    """The scorer cannot read what the request asks: it has no text that shows, or its last user
    turn holds an image (the router leans large on it; :func:`gateway.classifier.text.unreadable`)."""
    downgrade: bool = False
    """The tenant's budget is nearly spent: a classifier route goes to the small model."""
    answered: str = ""
    """The answer's text, once settled (what shadow judging compares)."""
    failure: UpstreamError | None = None
    """Why the upstream gave no answer: what the requests coalesced on this one are told."""
    passthrough: PassThrough | None = None
    settled: bool = False
    """An answer's usage is on the record: a client leaving now is billed nothing more."""
    client_left: bool = False
    """The client hung up while the upstream wrote a whole answer, which is waited for."""
    sending: SendMark | None = None
    """Whether the upstream call at work was sent (a whole answer's: :meth:`ChatPipeline.client_left`)."""
    opening: ChatStream | None = None
    """The stream the attempt at work opened, while its first piece is awaited: what its upstream
    said before that piece (Anthropic's ``message_start`` and its usage) is in its tally."""
    replaying: bool = False
    """A cache hit's replay began: its end logs the request (:meth:`ChatPipeline._replay`)."""


class ChatPipeline:
    def __init__(
        self,
        holder: RuntimeHolder,
        metrics: Metrics,
        exact: ExactCache,
        semantic: SemanticCache,
        limiter: Limiter,
        scorer: Scorer | None,
        drain: Drain | None = None,
        audit: SemanticAudit | None = None,
        large_share: LargeShareTracker | None = None,
        learning: LearningLoop | None = None,
    ) -> None:
        self._holder = holder
        self._drain = drain or Drain(DEFAULT_DRAIN_S)
        self._metrics = metrics
        self._exact = exact
        self._semantic = semantic
        self._limiter = limiter
        self._in_flight = InFlight()
        self._whole_answers: dict[asyncio.Task[Any], _Exchange] = {}
        """Requests whose upstream writes a whole (non-streamed) answer, by their task."""
        self._reading_on: dict[str, list[_ReadOn]] = {}
        """Cut streams whose upstream is read on past the client's answer, by model, oldest first (t65)."""
        self._scorer = scorer
        self._audit = audit or SemanticAudit(metrics)
        self._large_share = large_share
        self._learning = learning

    def client_left(self, task: asyncio.Task[Any]) -> bool:
        """The edge saw ``task``'s client hang up: whether the request goes on (else the edge
        cancels it). An upstream bills the whole answer it was asked for (OpenAI's and Anthropic's
        go on after a hang-up), so one at work on it is waited for, with no retry or fallback for a
        client that is gone, billed, cached (the client's retry is a hit), and logged as a 499
        (t39: hanging up just before the answer cost the prompt alone, and never tripped a budget)."""
        x = self._whole_answers.get(task)
        if (
            x is None
            or self._drain.expired
            or not x.info.goes_on_without_client(x.sending, lambda: self._no_one_waits(x))
        ):
            return False
        x.client_left = True
        return True

    def _no_one_waits(self, x: _Exchange) -> bool:
        """No identical request waits on the answer of ``x``, whose client left: a failed try is
        the last. Those that wait when it fails are retried and fallen back for (t43); holding a
        lease with none waiting is not reason enough (t123)."""
        return x.lease is None or not self._exact.awaited(x.lease)

    async def handle(
        self,
        read_body: BodyReader,
        authorization: Credentials,
        cache_control: str | None,
        request_id: str,
        started: float,
        protocol: str = "openai.chat",
        passthrough: PassThrough | None = None,
        body_wait: Callable[[], float] | None = None,
        translate: Translate | None = None,
    ) -> Answer | StreamingAnswer | StreamingDeltas:
        """``protocol``: the API the client called, for the log. A client of another protocol than
        chat gets a stream in the internal model (:class:`StreamingDeltas`). ``body_wait()``: the
        seconds ``read_body`` waited for the client to send the body (not the gateway's overhead).
        ``translate``: reads another protocol's body (without it, the body is a chat request)."""
        runtime = self._holder.current  # one policy version for the whole request
        at = time.time()  # the request's start: its usage's day and month, and its line's started_at
        record = RequestRecord(
            request_id=request_id, key_id="-", tenant="-", policy_version=runtime.version, started_at=utc_stamp(at)
        )
        if protocol != "openai.chat":
            record.protocol = protocol
        x = _Exchange(runtime, record, started, at)
        streaming_started = False
        task = self._drain.track()  # ended with a 503 at the drain deadline, not cut by the server's kill
        try:
            principal = runtime.auth.authenticate(authorization)
            record.key_id, record.tenant = principal.key_id, principal.tenant
            limits = runtime.policy.limits
            try:
                raw = await read_body(limits.max_body_bytes, limits.body_read_timeout_s, principal)
            finally:
                if body_wait is not None:
                    x.info.client_seconds = body_wait()
            try:
                if translate is not None:
                    x.request = await translate(raw, principal)
                    scoped_request(x.request, principal.tenant)
                elif len(raw) < LARGE_BODY_BYTES:
                    x.body, x.directives, x.request = _read_chat(raw, principal)
                else:  # off the event loop (t51: bodies of 100,000 messages held it for seconds)
                    caller = principal
                    x.body, x.directives, x.request = await read_off_loop(raw, lambda: _read_chat(raw, caller))
            except GatewayError as refused:  # a refused body is logged with the stream it asked for all the same (t175)
                record.stream = await read_off_loop(raw, lambda: _asks_stream(raw))
                if refused.status_code == 400:  # an unknown model is named first, whatever else is wrong
                    runtime.router.refuse_unknown(await read_off_loop(raw, lambda: named_model(raw)), principal.allowed)
                raise
            record.stream = x.request.stream
            x.request.tenant = principal.tenant
            if passthrough is not None and passthrough.body is not None:
                anthropic = protocol == "anthropic.messages"
                passthrough.body = scoped_body(passthrough.body, principal.tenant, anthropic=anthropic)
                x.passthrough = passthrough
                record.passthrough = True
                x.asked = passthrough.asked
            tier = x.request.extra.get("service_tier")
            if tier is not None:
                x.asked = replace(x.asked, service_tier=_asked_tier(tier))
            if x.body is not None and (
                x.request.unreadable is not None or not _PRICED_CHAT.isdisjoint(x.request.extra)
            ):
                x.asked = _chat_priced(x.asked, x.request, x.body)  # a chat client's (other edges read their own)
            x.plan = runtime.router.chat_plan(x.request.model, principal.allowed)
            record.route, record.decision = x.plan.route, x.plan.decision
            record.baseline_model = x.plan.baseline
            tenant = runtime.policy.tenants.get(principal.tenant)
            x.slot = self._in_flight.enter(
                principal.key_id,
                principal.tenant,
                principal.limits.max_concurrent,
                tenant.limits.max_concurrent if tenant is not None else None,
            )
            self._refuse_unpriced(x)
            if self._limiter.enforces(runtime.policy, principal):
                await self._count_prompt(x)  # the limits need the estimate before anything is served
            await self._reserve(x, principal)
            cached = await self._from_cache(x, cache_control)
            if cached is not None:
                streaming_started = not isinstance(cached, Answer)  # a replay is logged at its end
                return cached  # a hit carries its own token counts: no tokenizing
            if x.gave_back:  # it waited on an identical request that left it no answer: it asks upstream itself
                await self._reserve(x, principal)
            await self._route(x, principal)
            x.sending = watch_sending()  # a client leaving before anything was sent is billed nothing (t48)
            if x.request.stream:
                await self._count_prompt(x)  # the stream's cost header, and its usage should the upstream send none
                answer = await self._start_stream(x)
                streaming_started = True
                return answer
            relay = x.passthrough
            if task is not None:
                self._whole_answers[task] = x
            completion = await dispatch(
                x.plan.candidates,
                runtime.providers,
                self._holder.breakers.for_tenant(x.record.tenant),
                x.plan.retry or runtime.policy.retry,
                _completer(x.request, x.body) if relay is None else _relayed(relay, x.request.tenant),
                x.info,
            )
            provider = x.info.provider
            assert provider is not None
            if completion.usage is None or _untrue(
                completion.usage, x.request, provider, completion.said or completion.text
            ):
                await self._count_prompt(x)  # tokenized only when the upstream does not say, or says what cannot be
            await self._settle_off_loop(
                x,
                provider,
                completion.usage,
                completion.text,
                completion.said,
                tier=completion.service_tier,
                tools=completion.server_tools,
            )
            record.upstream_status, record.finish_reason = 200, completion.finish_reason
            _record_speculation(record, completion)
            typed, storing = relay is None and record.protocol != "openai.chat", self._storing(x)
            if typed and _unsayable(completion.finish_reason, record.protocol):  # billed: the upstream did the work
                raise _unfinished(provider, completion.finish_reason)
            whole = storable = completion.answer
            fingerprint: str | None = None
            if whole is None and (typed or storing):  # a chat upstream's completion, read once
                data = msgspec.json.decode(completion.body)
                whole, storable = answer_from_completion(data), storable_answer(data)
                said = data.get("system_fingerprint")
                fingerprint = said if isinstance(said, str) else None
            if storing:
                counts = (
                    await self._cut_counts(x, provider, completion.said or completion.text) if completion.cut else None
                )
                await self._fill_cache(x, storable, counts, fingerprint)
            # else the client is told the gateway's count it is billed (a relayed answer, in its
            # own API, keeps the usage its upstream wrote in it)
            told = record.tokens_source == "upstream" or (relay is not None and completion.usage is not None)
            if typed:
                if not told and whole is not None:
                    whole = msgspec.structs.replace(whole, usage=_usage_of(record))
                return Answer(200, b"", self._headers(x), typed=whole)
            body = completion.body if told else _with_billed_usage(completion.body, record)
            return Answer(200, body, self._headers(x))
        except GatewayError as exc:
            if isinstance(exc, UpstreamError):
                x.failure = exc.with_traceback(None)  # its frames hold x: a cycle (f205)
                record.speculation = record.speculation or _failed_speculation(x.info.failures)
            return self._error_answer(x, exc)
        except Exception as exc:  # a bug of ours: answered and logged as what it is, never a lost request
            return self._error_answer(x, _internal_error(x, exc))
        except asyncio.CancelledError:
            ended = self._drain.ended_by_deadline(task)
            sent = x.sending is not None and x.sending.sent  # one still queued for a connection costs nothing (t48)
            if x.info.asked is not None and sent and not x.settled:  # the upstream was at work: its prompt is billed,
                try:  # as a cut stream's is (t43: $0 at the drain deadline)
                    await _to_the_end(self._count_prompt(x))
                except asyncio.CancelledError:  # cancelled again (its client left after the drain's deadline)
                    ended = False  # no one is left to answer
                if x.opening is None:
                    self._settle(x, x.info.asked, None, "")
                else:  # f106: on the usage its upstream opened with (cached tokens), as a later leave is
                    self._settle_cut_now(x, x.info.asked, x.opening.tally)
            if record.model is None:
                self._name_the_last_failure(x)  # left between attempts: one model was tried (t72)
            if ended:
                return self._error_answer(
                    x,
                    ShuttingDownError(
                        "the gateway is shutting down; the answer did not come before its drain deadline"
                    ),
                )
            record.status, record.error_type = 499, "client_disconnected"
            raise
        finally:
            self._drain.untrack(task)
            if not streaming_started:
                if task is not None:
                    self._whole_answers.pop(task, None)
                await self._let_go(x)

    async def _let_go(self, x: _Exchange) -> None:
        """The end of a request answered whole, or not at all: its lease released (an answer stored:
        the requests coalesced on it are given it), then its place among the requests in flight
        given back and its line logged, however the release ends (t95: a client that left while it
        was released held a place of its tenant's ``max_concurrent`` for good, and was never logged)."""
        try:
            await self._release_lease(x)
        except asyncio.CancelledError:  # its client left meanwhile: the answer goes to no one
            x.record.status, x.record.error_type = 499, "client_disconnected"
            raise
        finally:
            if x.client_left:
                x.record.status, x.record.error_type = 499, "client_disconnected"
            self._finish(x, x.info.upstream_seconds, x.info.client_seconds)

    def refused_method(self, authorization: Credentials, request_id: str, protocol: str, started: float) -> None:
        """A model endpoint's 405 (a method it does not take), answered before its body is read:
        logged as any refusal is (t191: it wrote no line), its key's when it authenticates."""
        runtime = self._holder.current
        at = time.time()
        record = RequestRecord(
            request_id=request_id, key_id="-", tenant="-", policy_version=runtime.version, started_at=utc_stamp(at)
        )
        record.protocol = protocol
        with contextlib.suppress(GatewayError):  # the 405 stands whatever the key: the line says whose it was
            principal = runtime.auth.authenticate(authorization)
            record.key_id, record.tenant = principal.key_id, principal.tenant
        record.status, record.error_type = 405, InvalidRequestError.error_type
        self._finish(_Exchange(runtime, record, started, at), 0.0, 0.0)

    # -- steps -------------------------------------------------------------------

    async def _count_prompt(self, x: _Exchange) -> None:
        """Prompt tokens with tiktoken, once per request (long prompts off the event loop)."""
        if x.counted:
            return
        assert x.plan is not None
        first = x.runtime.policy.models[x.plan.candidates[0]]
        encoding, provider = first.encoding, first.provider
        if prompt_chars(x.request) > x.runtime.policy.limits.long_prompt_chars:
            x.prompt_tokens = await asyncio.to_thread(count_prompt, x.request, encoding, provider=provider)
        else:
            x.prompt_tokens = count_prompt(x.request, encoding, provider=provider)
        x.counted = True

    def _reachable(self, x: _Exchange) -> tuple[str, ...]:
        """Every model the request may end at. Any of them prices it: a classifier route may pick
        the pair's large model, and a fallback may be dearer than the first model (when the cheap
        one is down, a budget priced at its rate was overspent 4 times over)."""
        assert x.plan is not None
        reachable = tuple(x.runtime.router.ends(x.plan))
        relay = x.passthrough
        if relay is not None and relay.held_by in x.runtime.policy.models:  # continuing it may end there
            reachable = (*reachable, relay.held_by)
        return reachable

    def _refuse_unpriced(self, x: _Exchange) -> None:
        """A request asking for an option its upstream bills above the token prices (fast mode,
        US-only inference, web search), where a model it may end at has no price for it, is
        refused before it costs anything: it would be billed, and count against budgets, at the
        base price (t59: 6x fast mode went through at 1x)."""
        if x.asked == _NOTHING_PRICED:
            return
        models = x.runtime.policy.models
        for name in self._reachable(x):
            # a tier asked is not refused: upstreams without tiers (vLLM) serve it at their one price
            missing = [one for one in unpriced(models[name].price, x.asked) if one.param != "service_tier"]
            if missing:
                first = missing[0]
                raise InvalidRequestError(
                    f"{first.asked} is billed above the base price, and the gateway's policy sets no price for it "
                    f"on model '{name}' (models.{name}.price.{first.field} in policies.yaml); leave it out, or "
                    "ask the gateway's operators to price it",
                    param=first.param,
                )

    async def _reserve(self, x: _Exchange, principal: Principal) -> None:
        """Check the key's and tenant's limits against this request's estimate, and reserve it."""
        assert x.plan is not None
        policy = x.runtime.policy
        reachable = self._reachable(x)
        # No model writes past its context window: a max_tokens of 10**9 is not a $10,000 estimate
        # that refuses the request as over budget (the upstream answers for the value itself).
        window = max(policy.models[name].context_window for name in reachable)
        completion = min(x.request.max_tokens or policy.limits.default_completion_tokens, window)
        completion *= _answers_asked(x.request)
        asked = x.asked  # fast mode multiplies the estimate too, and each web search allowed adds its fee (t59)
        estimate = max(
            cost_usd(
                policy.models[name].price,
                x.prompt_tokens,
                completion,
                audio_prompt_tokens=x.prompt_tokens if asked.audio_input is not None else 0,  # all at the audio price
                audio_completion_tokens=completion if asked.audio_output is not None else 0,
                speed=asked.speed,
                inference_geo=asked.inference_geo,
                service_tier=asked.service_tier,
                server_tool_requests=asked.tool_uses(),
            )
            for name in reachable
        )
        tokens = x.prompt_tokens + completion
        requests = 0 if x.gave_back else 1  # it gave its first reservation back (_give_back): in rpm already
        x.reservation = await self._limiter.reserve(policy, principal, tokens, estimate, x.at, requests=requests)
        tenant = policy.tenants.get(principal.tenant)
        x.downgrade = (
            tenant is not None
            and tenant.downgrade_auto_at is not None
            and x.reservation.budget_share >= tenant.downgrade_auto_at
        )

    async def _score(self, x: _Exchange) -> PromptScore | None:
        """The classifier's one forward pass (routing score and cache embedding), at most once per request."""
        if not x.scored:
            x.scored = True
            if self._scorer is not None:
                text = request_text(x.request.messages)
                # a part the internal model has no place for (a PDF, audio) is as unseen as an image (t64)
                x.unseen = x.request.unreadable is not None or request_unreadable(x.request.messages, text)
                try:
                    x.score = await self._scorer.score(text, x.record.tenant)
                except ClassifierError as exc:
                    _log.warning("classifier_failed", request_id=x.record.request_id, error=str(exc)[:200])
        return x.score

    async def _route(self, x: _Exchange, principal: Principal) -> None:
        """Classifier routes pick small or large; a request that continues a response an upstream
        keeps goes where that response is (a classifier's pick that cannot see it would 404)."""
        assert x.plan is not None
        if x.plan.threshold is not None:
            await self._classify(x)
        relay = x.passthrough
        if relay is not None and relay.held_by is not None:
            x.plan = x.runtime.router.continuing(x.plan, relay.held_by, principal.allowed)
            x.record.decision = x.plan.decision

    async def _classify(self, x: _Exchange) -> None:
        """Small or large by ``p_large``; the route's default when there is no score."""
        assert x.plan is not None
        router = x.runtime.router
        if x.downgrade:
            x.plan = router.downgrade(x.plan)
        else:
            score = await self._score(x)
            if score is None:
                return
            plan, tenant, tracker, target = x.plan, x.record.tenant, self._large_share, x.plan.target_large_share
            p_large = score.p_large
            if x.unseen:  # what the router cannot read, it cannot place: it leans large (t28)
                p_large = 1.0
            elif plan.learning is not None and self._learning is not None:
                learned = await self._learning.routers.in_force(tenant, pooled=plan.learning.scope == "global")
                if learned is not None:
                    p_large = learned.apply(p_large, score.embedding, score.features)
                    x.record.router_version = learned.version
            if tracker is None or target is None or plan.threshold is None:
                x.plan = router.classify(plan, p_large)
            elif x.unseen:
                # large, and outside the target share: counted in, such prompts (images, 40 % of a
                # tenant's traffic) filled the share at 1.0 and every hard text prompt went small (t51)
                x.plan = router.classify(plan, p_large, tracker.threshold(tenant, plan.route, target, plan.threshold))
            else:
                await tracker.prepare(tenant, plan.route, target)
                threshold = tracker.threshold(tenant, plan.route, target, plan.threshold)
                score_ranked = ranked(p_large)
                x.plan = router.classify(plan, score_ranked, threshold)
                tracker.observe(tenant, plan.route, score_ranked, target, plan.threshold, x.record.router_version or "")
            if x.unseen:  # large, but not the classifier's pick: kept apart in logs and dashboards (t72)
                x.plan = replace(x.plan, decision="unreadable")
            x.record.p_large = round(p_large, 4)
            if x.plan.threshold is not None:
                x.record.threshold = round(x.plan.threshold, 4)
        x.record.decision = x.plan.decision

    async def _from_cache(
        self, x: _Exchange, cache_control: str | None
    ) -> Answer | StreamingAnswer | StreamingDeltas | None:
        """Exact hit, then semantic hit, then a coalesced answer; None means: ask upstream."""
        assert x.plan is not None
        if x.passthrough is not None:
            return None
        policy = x.runtime.policy.cache
        scope = x.runtime.router.cache_scope(x.plan.route)  # the route and the models behind it (t56)
        x.cache = plan = plan_cache(policy, x.record.tenant, scope, x.request, cache_control, x.directives)
        if plan is None:
            return None
        x.record.cache = "miss" if plan.read else "bypass"  # no-cache: not looked up (the answer is stored)
        timeout_s = policy.redis_timeout_ms / 1000
        if plan.read:
            try:
                hit = await self._exact.get(plan.exact_key, timeout_s)
            except StoreUnavailable:  # down, hung or slow: go on without the cache, and say so
                x.record.cache, x.cache = "bypass", None
                return None
            if hit is not None:
                return self._cached_answer(x, hit, "exact")
        score = await self._score(x) if plan.semantic_set is not None else None
        if score is not None and plan.semantic_set is not None and plan.read:
            served = await self._semantic_hit(x, plan.semantic_set, score, plan.prompt, timeout_s)
            if served is not None:
                return served
        if plan.write and plan.read and policy.coalesce.enabled:
            began = time.perf_counter()
            give_back = partial(self._give_back, x) if x.reservation is not None and x.reservation.cost_usd else None
            answer, x.lease = await self._exact.join_or_lead(
                plan.exact_key, policy.coalesce.wait_s, timeout_s, give_back
            )
            if x.lease is None or x.lease.waited:  # it waited on an identical request's upstream call:
                x.info.upstream_seconds += time.perf_counter() - began  # upstream time, not overhead (t70)
            if isinstance(answer, UpstreamError):
                x.record.coalesced = True
                raise answer  # the identical request this one waited on failed upstream: so would this one
            if answer is not None:
                x.record.coalesced = True
                return self._cached_answer(x, answer, "exact")
        return None

    def _give_back(self, x: _Exchange) -> None:
        """A request waiting on an identical one in flight is answered from its answer at $0: its
        estimate is given back now, not held to its end (t162: four identical requests held four
        estimates, and a fifth, itself free, was refused as held by requests in flight). One that
        calls upstream after all (its wait ran out, its leader's client left) reserves again, its
        tokens and cost but not its request, which its ``rpm`` counts once (f173); one answered
        counts in its usage, not in its ``tpm``."""
        reservation, x.reservation = x.reservation, None
        if reservation is not None:
            x.gave_back = True
            self._limiter.settle_later(x.runtime.policy, reservation, UsageFigures())

    async def _semantic_hit(
        self, x: _Exchange, semantic_set: str, score: PromptScore, prompt: str, timeout_s: float
    ) -> Answer | StreamingAnswer | StreamingDeltas | None:
        assert x.plan is not None
        semantic = x.runtime.policy.cache.semantic
        tenant, route = x.record.tenant, x.plan.route
        bar = ServeBar.of(semantic)
        raised = self._audit.raised_by(semantic.audit, bar, tenant, route)
        if raised is None:  # the audits found too many wrong hits here: stopped
            return None
        tightened_by = raised
        found = await self._semantic.lookup(
            semantic_set,
            score.embedding,
            prompt,
            semantic.threshold,
            bar.raised(lambda t: effective_threshold(t, tightened_by)),
            semantic.guard,
            timeout_s,
            verify_timeout_s=semantic.verify_timeout_ms / 1000,
        )
        x.record.semantic_guard_refusals = found.refused or None
        if found.timed_out is not None:
            self._metrics.semantic_timeout(found.timed_out)
        if found.hit is None:
            return None
        if found.hit.answer.prompt == prompt:
            # The same prompt, stored since this request's exact lookup (it raced its twin, which
            # a coalescing wait would have caught a moment later): an exact hit, and no audit.
            return self._cached_answer(x, found.hit.answer, "exact")
        x.similarity = found.hit.similarity
        x.record.cache_p_same = round(found.hit.p_same, 4)
        await self._count_prompt(x)  # a semantic hit reports this request's prompt, not the stored one's
        answer = self._cached_answer(x, found.hit.answer, "semantic")
        if self._audit.sample(semantic.audit, x.record.tenant):
            self._start_audit(x, found.hit.answer, prompt, semantic_set, bar, timeout_s)
        return answer

    def _start_audit(
        self, x: _Exchange, hit: CachedAnswer, prompt: str, semantic_set: str, bar: ServeBar, timeout_s: float
    ) -> None:
        """Ask upstream what the cached answer stood in for, after it was served (gateway/cache/audit.py)."""
        assert x.plan is not None
        runtime, plan, semantic = x.runtime, x.plan, x.runtime.policy.cache.semantic
        request, body = _unstreamed(x.request, x.body)
        ask = self._asker(x)
        judge_model = semantic.audit.judge_model

        async def judge(cached: str, fresh: str) -> bool | None:
            assert judge_model is not None
            verdict, _ = await ask((judge_model,), judge_request(judge_model, prompt, cached, fresh))
            return parse_yes_no(verdict)

        self._audit.start(
            AuditJob(
                semantic.audit,
                bar,
                x.record.tenant,
                plan.route,
                hit.answer.text or "",
                lambda: ask(plan.candidates, request, body),
                judge if judge_model is not None and judge_model in runtime.providers else None,
                lambda: self._semantic.retire(semantic_set, hit.prompt or "", timeout_s),
            )
        )

    def _asker(self, x: _Exchange) -> _Ask:
        """Ask models off the request path (audits, shadow judging): the answer's text and its cost."""
        assert x.plan is not None
        runtime = x.runtime
        retry = x.plan.retry or runtime.policy.retry
        tenant = x.record.tenant
        breakers = self._holder.breakers.off_the_path(tenant)

        async def ask(
            candidates: tuple[str, ...], request: core.Request, body: dict[str, Any] | None = None, whole: bool = False
        ) -> tuple[str, float]:
            """The answer's text (``whole``: what it said, tool calls included, when it has no text) and its cost."""
            request.tenant = tenant  # a judge's prompt holds the tenant's text: salted as the tenant's own
            info = DispatchInfo()
            completion = await dispatch(candidates, runtime.providers, breakers, retry, _completer(request, body), info)
            usage, provider = completion.usage, info.provider
            cost = 0.0
            if provider is not None:
                said = completion.said or completion.text or ""
                if usage is not None and _untrue(usage, request, provider, said) is None:
                    prompt, written = usage.prompt_tokens, usage.completion_tokens
                else:  # counted, as a client's request is: at $0 a judge's daily cap never bound (t32)
                    encoding = provider.config.encoding
                    prompt = await asyncio.to_thread(count_prompt, request, encoding, provider=provider.config.provider)
                    written = count_text(said, encoding)
                cost = cost_usd(provider.config.price, prompt, written)
            return (completion.text or completion.said or "") if whole else completion.text, cost

        return ask

    def _teach(self, x: _Exchange) -> None:
        """A routed request was answered: hand the learning loop what the router saw."""
        plan, score, learning = x.plan, x.score, self._learning
        if learning is None or plan is None or plan.learning is None or score is None or score.features is None:
            return
        if plan.decision not in ("small", "large") or x.record.status != 200 or not x.answered:
            return
        if x.unseen:  # (t64) sent large for what the router cannot read: its score is no lesson
            return
        small, large = x.runtime.router.pair
        side: Side = "small" if x.record.model == small else "large"
        if x.record.model not in (small, large):
            return  # a fallback outside the pair answered: nothing to learn about the pair
        other = large if side == "small" else small
        judge_model = plan.learning.judge or large
        if other not in x.runtime.providers or judge_model not in x.runtime.providers:
            return
        ask, request, body = self._asker(x), x.request, x.body

        async def ask_other() -> tuple[str, float]:
            return await ask((other,), *_unstreamed(request, body), whole=True)

        async def judge(small_answer: str, large_answer: str) -> tuple[str, float]:
            # built only for the sampled few: most routed requests are never judged
            conversation = judged_conversation(request.messages)
            return await ask(
                (judge_model,), shadow_judge_request(judge_model, conversation, small_answer, large_answer)
            )

        learning.after_answer(
            plan.learning,
            tenant=x.record.tenant,
            key_id=x.record.key_id,
            request_id=x.record.request_id,
            route=plan.route,
            side=side,
            p_base=score.p_large,
            embedding=score.embedding,
            features=score.features,
            answered=x.answered,
            ask_other=ask_other,
            judge=judge,
            max_labels=x.runtime.router.labels_kept,
            costs=lambda: _shadow_costs(x, other, judge_model),
        )

    def _cached_answer(self, x: _Exchange, hit: CachedAnswer, kind: str) -> Answer | StreamingAnswer | StreamingDeltas:
        record = x.record
        record.cache, record.model, record.provider = kind, hit.model, hit.provider
        # a semantic hit answers another prompt: its own is the one counted here
        answer = hit.served_as(f"chatcmpl-{record.request_id}", x.prompt_tokens if kind == "semantic" else None)
        usage = answer.usage
        record.prompt_tokens, record.completion_tokens, record.tokens_source = (
            usage.input_tokens,
            usage.output_tokens,
            "cache",
        )
        # no upstream read or wrote its prompt cache for this request (t158): those counts stay 0;
        # the reasoning tokens are the answer's, as its completion tokens are
        record.reasoning_tokens = usage.reasoning_tokens
        record.cost_usd = 0.0
        record.cache_saved_usd = hit.cost_usd
        record.cache_similarity = None if x.similarity is None else round(x.similarity, 4)
        baseline = x.runtime.policy.models.get(record.baseline_model or "")
        if baseline is not None:  # on the miss's split of the tokens: a hit saves what the miss cost, no more
            split = msgspec.structs.replace(
                record,
                cached_prompt_tokens=usage.cached_input_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                cache_write_1h_tokens=usage.cache_write_1h_tokens,
            )
            record.baseline_cost_usd = _cost(baseline.price, split)
        if record.decision is not None:
            record.decision = "cache"  # not the classifier's "default": nothing was routed
        headers = self._headers(x)
        if record.protocol != "openai.chat":
            if not x.request.stream:
                return Answer(200, b"", headers, typed=answer)  # the asking protocol renders it
            batches: list[DeltaBatch] = [[delta] for delta in deltas_of(answer)]  # each piece an event, as live
            batches.append(None)
            replay = self._replayed(x, batches, typed=True)
            return StreamingDeltas(headers, cast(AsyncIterator[DeltaBatch], replay), usage.input_tokens, usage)
        serving = None if hit.system_fingerprint is None else {"system_fingerprint": hit.system_fingerprint}
        if not x.request.stream:
            return Answer(200, completion_from_answer(answer, answer.usage, serving=serving), headers)
        events = stream_from_answer(answer, int(time.time()), _includes_usage(x.body), serving=serving)
        return StreamingAnswer(headers, cast(AsyncIterator[bytes], self._replayed(x, events, typed=False)))

    def _replayed(
        self, x: _Exchange, items: Sequence[bytes] | Sequence[DeltaBatch], *, typed: bool
    ) -> AsyncIterator[bytes | DeltaBatch]:
        replay = self._replay(x, items, typed)
        # one dropped before it began (its client gone as it was handed over) runs no end of its own
        weakref.finalize(replay, self._never_replayed, x).atexit = False
        return replay

    async def _replay(
        self, x: _Exchange, items: Sequence[bytes] | Sequence[DeltaBatch], typed: bool
    ) -> AsyncIterator[bytes | DeltaBatch]:
        """A cache hit told as a stream, logged once it ended, as a live stream is (t195: it was
        logged 200 before its replay began, a client that left it mid-way too): a 499 when its
        client left first, its client's pace in ``client_wait_ms``, ended in-band at the drain
        deadline (:meth:`_relay`). It costs what any hit does: nothing."""
        x.replaying = True
        record, drain = x.record, self._drain
        task = drain.track()
        waited, since, logged = 0.0, None, False
        try:
            for item in items:
                since = time.perf_counter()
                yield item
                waited += time.perf_counter() - since
                since = None
                # From memory, with a send() that returns at once once its client has left, the replay
                # would never pause: let the client's leaving, or the drain's deadline, land here.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not drain.ended_by_deadline(task):
                record.error_type, record.status = "client_disconnected", 499
                raise
            error = ShuttingDownError("the gateway is shutting down; the answer was cut at its drain deadline")
            record.error_type, record.status = error.code, error.status_code
            # Logged now, as a live stream is (_relay): the error waits behind what a slow client has
            # yet to take, which can outlast the server's kill timeout.
            logged = True
            self._finish(x, x.info.upstream_seconds, x.info.client_seconds + waited)
            yield StreamBroke(msgspec.json.decode(error.to_body())) if typed else b"data: " + error.to_body() + b"\n\n"
        except GeneratorExit:
            record.error_type, record.status = "client_disconnected", 499
            raise
        finally:
            drain.untrack(task)
            if not logged:
                if since is not None:  # the event out when its client left
                    waited += time.perf_counter() - since
                self._finish(x, x.info.upstream_seconds, x.info.client_seconds + waited)

    def _never_replayed(self, x: _Exchange) -> None:
        if not x.replaying:
            x.record.error_type, x.record.status = "client_disconnected", 499
            self._finish(x, x.info.upstream_seconds, x.info.client_seconds)

    @staticmethod
    def _storing(x: _Exchange) -> bool:
        plan = x.cache
        if x.downgrade and x.plan is not None and x.plan.decision == "budget_downgrade":
            return False  # t61: the budget's pick, not the route's: cached, it outlived the budget's reset
        return plan is not None and plan.write and x.record.status == 200 and x.info.provider is not None

    async def _fill_cache(
        self,
        x: _Exchange,
        answer: core.Answer | None,
        counts: RequestRecord | None = None,
        fingerprint: str | None = None,
    ) -> CachedAnswer | None:
        """Store a complete, successful answer (exact, and semantic where it applies), when
        :meth:`_storing`; ``answer`` None: the internal answer cannot hold all of it (a refusal,
        annotations, ...), and nothing is stored (a lease held is released when the request ends).
        ``counts``: the answer's tokens and cost, when they are not the request's own;
        ``fingerprint``: the ``system_fingerprint`` an OpenAI chat upstream said."""
        plan = x.cache
        if plan is None or answer is None or not _complete(answer):
            return None
        policy = x.runtime.policy.cache
        timeout_s = policy.redis_timeout_ms / 1000
        record = x.record if counts is None else counts
        entry = CachedAnswer(
            answer=msgspec.structs.replace(answer, id="", usage=core.Usage()),
            model=record.model or "",
            provider=record.provider or "",
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cost_usd=record.cost_usd,
            created_at=time.time(),
            prompt=plan.prompt if plan.semantic_set is not None else None,
            cached_prompt_tokens=record.cached_prompt_tokens,
            cache_write_tokens=record.cache_write_tokens,
            reasoning_tokens=record.reasoning_tokens,
            cache_write_1h_tokens=record.cache_write_1h_tokens,
            system_fingerprint=fingerprint,
        )
        await self._exact.put(plan.exact_key, entry, policy.exact.ttl_s, timeout_s, x.lease)
        x.lease = None  # released with the answer (a cancelled put leaves it to _release_lease)
        if plan.semantic_set is not None and x.score is not None:  # the same forward pass the lookup used
            await self._semantic.store(
                plan.semantic_set,
                x.score.embedding,
                entry,
                policy.semantic.ttl_s,
                policy.semantic.max_entries,
                timeout_s,
            )
        return entry

    async def _release_lease(self, x: _Exchange) -> None:
        """Drop the request's lease and tell the requests coalesced on it; to the end, even when
        the task is cancelled meanwhile (the cancellation is raised after: :func:`_to_the_end`)."""
        if x.lease is not None:
            lease, x.lease = x.lease, None
            outcome = LEADER_LEFT if x.failure is None and x.record.status == 499 else x.failure
            await _to_the_end(self._exact.release(lease, outcome, x.runtime.policy.cache.redis_timeout_ms / 1000))

    async def _close_upstream(self, x: _Exchange, stream: ChatStream) -> None:
        """Let a stream's upstream go and release its lease: the lease even if the closing is cut short."""
        try:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        finally:
            await self._release_lease(x)

    async def _start_stream(self, x: _Exchange) -> StreamingAnswer | StreamingDeltas:
        assert x.plan is not None
        runtime, relay = x.runtime, x.passthrough
        typed = relay is None and x.record.protocol != "openai.chat"
        stream, first = await dispatch(
            x.plan.candidates,
            runtime.providers,
            self._holder.breakers.for_tenant(x.record.tenant),
            x.plan.retry or runtime.policy.retry,
            _stream_opener(x, typed) if relay is None else _open_relayed(x, relay),
            x.info,
        )
        # from the body's arrival (t159): client_seconds is, until the stream begins, the body's upload
        x.record.ttft_ms = (time.perf_counter() - x.started - x.info.client_seconds) * 1000
        x.record.upstream_status = 200
        provider = x.info.provider
        assert provider is not None
        x.record.model, x.record.provider = provider.name, provider.kind
        asked = x.asked
        prompt_cost = cost_usd(
            provider.config.price,
            x.prompt_tokens,
            0,
            audio_prompt_tokens=x.prompt_tokens if asked.audio_input is not None else 0,
            speed=asked.speed,
            inference_geo=asked.inference_geo,
            service_tier=asked.service_tier,
        )
        headers = self._headers(x, cost=prompt_cost)
        include_usage = _includes_usage(x.body)
        items = self._relay(x, stream, first, include_usage, typed)
        if x.slot is not None:  # a stream never iterated (its client gone first) gives its place back too
            weakref.finalize(items, x.slot.release)
        if typed:
            return StreamingDeltas(headers, cast(AsyncIterator[DeltaBatch], items), x.prompt_tokens)
        return StreamingAnswer(headers, cast(AsyncIterator[bytes], items))

    async def _relay(
        self, x: _Exchange, stream: ChatStream, first: _Piece | None, include_usage: bool, typed: bool
    ) -> AsyncIterator[bytes | DeltaBatch]:
        """The stream to the client: SSE bytes, or with ``typed`` the deltas (:class:`StreamingDeltas`)."""
        provider = x.info.provider
        assert provider is not None
        record = x.record
        upstream_wait = x.info.upstream_seconds
        drain = self._drain
        task = drain.track()
        framed = stream.framed
        prefix, suffix = (b"", b"") if framed else (b"data: ", b"\n\n")
        read: Callable[[], Awaitable[_Piece]] = stream.next_deltas if typed else stream.__anext__

        def frame(piece: _Piece) -> bytes | DeltaBatch:
            return prefix + piece + suffix if isinstance(piece, bytes) else piece

        logged = False
        rest: _ReadOn | None = None
        """The upstream of a stream cut short, handed to a task that reads it to its end, settles
        the request and logs it."""
        ended: tuple[float, float, float] | None = None
        """When the client's stream ended, and the upstream and client waits until then: what the request
        is timed by (t65: a cut stream's latency and overhead counted the read past its end)."""

        def finish() -> None:
            nonlocal logged
            if not logged:
                logged = True
                _record_speculation(record, stream)
                if ended is None:
                    self._finish(x, upstream_wait, x.info.client_seconds + pace.client_wait())
                else:
                    self._finish(x, ended[1], ended[2], ended[0])

        def rest_done() -> None:
            if ended is not None:  # else logged when the client's stream ends
                finish()

        def client_ended() -> None:
            """The client's stream is over while its upstream may still be read on: logged once both are."""
            nonlocal ended
            assert rest is not None
            ended = (time.perf_counter(), upstream_wait, x.info.client_seconds + pace.client_wait())
            if rest.done:
                finish()

        def stalled() -> None:
            """The client stopped taking what it holds the upstream for: settled and logged now, not
            whenever it hangs up (its in-band error waits behind the same full buffers); what it was
            sent is counted off the event loop when long, as at any cut (t191: 14 MB counted in the
            pace's timer held every tenant's requests for 0.5 s)."""
            nonlocal logged
            logged = True  # by the task below, whatever the relay meets meanwhile
            record.error_type, record.status = ClientStalled.code, ClientStalled.status_code
            _record_speculation(record, stream)
            if x.slot is not None:  # its upstream is let go now
                x.slot.release()
            settling = self._settle_cut_as_it_is(x, provider, stream.tally)
            at, waited, client_wait = time.perf_counter(), upstream_wait, x.info.client_seconds + pace.client_wait()

            async def settle_then_log() -> None:
                try:
                    await settling
                finally:
                    self._finish(x, waited, client_wait, at)

            drain.keep(settle_then_log(), "stream-stalled")
            # Its in-band error waits behind the client's full buffers: it gets another idle timeout
            # to go out, then the connection is reset (the pace's timer runs in the task's context).
            reset = CONNECTION_RESET.get()
            if reset is not None and task is not None:
                drain.reset_later(task, reset, provider.config.timeouts.idle)

        pace = ClientPace(stream, read, _piece_size, provider.config.timeouts, x.started, stalled)
        most = _most_chars(x.request, provider)
        countdown = _CHECK_EVERY
        try:
            if first is not None:
                if (len(first) if isinstance(first, bytes) else _text_chars(first)) > _BIG_PIECE:
                    await _checkpoint(stream.tally, most, provider)
                pace.offer()
                yield frame(first)
                pace.taken()
                while True:
                    countdown -= 1
                    if not countdown:
                        countdown = _CHECK_EVERY
                        await _checkpoint(stream.tally, most, provider)
                    elif drain.expired:
                        # The deadline's cancel, landed in a slow client's send and delivered again
                        # (send_events), lands here: the next piece may be read without a wait, and
                        # the cancel would land in the next send, where it cuts the stream (499).
                        await asyncio.sleep(0)
                    waited_from = time.perf_counter()
                    try:
                        piece = await pace.next()
                    except StopAsyncIteration:
                        break
                    finally:
                        upstream_wait += time.perf_counter() - waited_from
                    if (len(piece) if isinstance(piece, bytes) else _text_chars(piece)) > _BIG_PIECE:
                        # measured before it goes out, a batch of deltas too (f179): a few such
                        # pieces pass any bound (t111)
                        await _checkpoint(stream.tally, most, provider)
                    pace.offer()
                    yield frame(piece)
                    pace.taken()
            await _checkpoint(stream.tally, most, provider)  # the end too: pieces since the last measure (f179)
            tally = stream.tally
            if stream.cut_short:  # (t58) the answer is whole; its upstream writes on past the stop
                record.finish_reason = tally.finish_reason
                rest = self._read_rest(x, provider, stream, rest_done)
                if typed or include_usage:  # the usage comes at the upstream's end
                    waited_from = time.perf_counter()
                    try:
                        while not rest.settled.is_set():
                            try:
                                await asyncio.wait_for(rest.settled.wait(), _KEEP_ALIVE_S)
                            except TimeoutError:
                                yield KEEP_ALIVE if typed else b": keep-alive\n\n"
                    finally:  # time spent waiting on the upstream (t65)
                        upstream_wait += time.perf_counter() - waited_from
                for ending in pace.hand_over_last(_ending(tally, record, typed, include_usage)):
                    yield ending
                return
            # No finish reason (an OpenAI-style stream whose [DONE] came first): the usage may
            # be a placeholder, as for a cut stream
            await self._settle_tally(x, provider, tally, cut=tally.finish_reason is None)
            record.finish_reason = tally.finish_reason
            if framed:  # the upstream's own events said all there is to say
                if tally.failure is not None:  # ... and that the answer failed
                    rejected = tally.failure_status == 400  # the request's own fault
                    record.error_type = "upstream_rejected_request" if rejected else "upstream_error"
                    record.status = tally.failure_status
                return
            if tally.finish_reason is None or (typed and _unsayable(tally.finish_reason, record.protocol)):
                # The upstream never said it finished (its [DONE] came first: the answer may be cut, t143),
                # or said it gave up: a chat client sees the latter as it is, while a Messages or
                # Responses client would be told end_turn / completed.
                unfinished = _unfinished(provider, tally.finish_reason)
                record.error_type, record.status = unfinished.code, unfinished.status_code
                x.failure = unfinished
                yield _failure(stream, unfinished, typed)
                return
            for ending in pace.hand_over_last(_ending(tally, record, typed, include_usage)):
                yield ending
            if tally.replayable and self._storing(x):
                with anyio.CancelScope(shield=True):
                    await self._fill_cache(
                        x, tally.answer(), fingerprint=tally.said_of_serving.get("system_fingerprint")
                    )
        except ClientStalled as exc:  # the client's doing (settled when it stalled): no circuit is charged
            yield _failure(stream, exc, typed)
        except UpstreamError as exc:
            # Headers are gone: tell the client in-band, as OpenAI does; never retry mid-stream.
            self._metrics.upstream_error(exc.upstream, exc.code)
            # 200 went out with the headers; the outcome is the error's, for usage, reports and
            # metrics to count it as the failure it is (as an internal error here counts 500).
            record.error_type, record.status = exc.code, exc.status_code
            # the requests coalesced on it are told it, not each sent upstream at once (t116); without
            # its traceback, whose frames hold x: a cycle that kept the answer in memory (f205)
            x.failure = exc.with_traceback(None)
            breaker = self._holder.breakers.for_tenant(record.tenant).get(provider.name)
            if breaker is not None and says_upstream_is_unhealthy(exc):  # not the request's own 400
                breaker.record_broken()
            await self._settle_cut(x, provider, stream.tally)
            yield _failure(stream, exc, typed)
        except Exception as exc:
            record.status = 500
            yield _failure(stream, _internal_error(x, exc), typed)
        except asyncio.CancelledError:
            if logged:  # it stalled, and then went
                raise
            pace.stop()
            by_deadline = drain.ended_by_deadline(task)
            if not by_deadline:
                record.error_type, record.status = "client_disconnected", 499
            if not stream.cut_short and not x.settled:  # else settled on the upstream's usage once read to its end
                await self._settle_cut(x, provider, stream.tally)
            if not by_deadline:
                raise
            if rest is not None:  # (t68) the answer is whole: it ends as a read past_stop cut short does
                rest.end("drain_deadline")
                await rest.settled.wait()
                # Logged now (once its upstream is let go), as below: its end waits behind what a slow
                # client has yet to take.
                client_ended()
                for ending in _ending(stream.tally, record, typed, include_usage):
                    yield ending
                return
            error = ShuttingDownError("the gateway is shutting down; the answer was cut at its drain deadline")
            record.error_type, record.status = error.code, error.status_code
            # Logged now: the error waits behind what a slow client has yet to take, which can
            # outlast the server's kill timeout (the line and the bill were lost with the worker).
            finish()
            yield _failure(stream, error, typed)
        except GeneratorExit:
            pace.stop()
            if not logged:
                record.error_type, record.status = "client_disconnected", 499
                if not stream.cut_short and not x.settled:
                    await self._settle_cut(x, provider, stream.tally)
            raise
        finally:
            drain.untrack(task)
            try:
                with anyio.CancelScope(shield=True):
                    await pace.aclose()
            finally:  # a Task.cancel() cuts a shielded await short: what follows is done all the same (t95)
                if rest is None and stream.cut_short and not logged:  # the client left after the cut
                    record.finish_reason = stream.tally.finish_reason
                    rest = self._read_rest(x, provider, stream, rest_done)
                if rest is not None:
                    if ended is None:
                        client_ended()
                else:
                    try:  # the client may be gone: still close upstream and log
                        await self._close_upstream(x, stream)
                    finally:
                        finish()

    def _read_rest(self, x: _Exchange, provider: Provider, stream: ChatStream, done: Callable[[], None]) -> _ReadOn:
        """Hand a stream cut short at a stop string the gateway applies to a task the gateway owns,
        which reads the upstream to its end whether the client stays or goes, then settles the
        request on the upstream's usage (t58: a client that left at the cut was logged 499 and
        billed the gateway's count of the cut text). ``done`` is called once it is done.

        The read holds an upstream connection: a model's cut streams may hold at most half of its
        ``max_connections`` so (t65: one tenant's cut streams filled the pool, and another's
        requests got 504 ``upstream_busy``); past that the upstream is let go at the cut. It holds
        no place among the key's requests in flight (t68: the key's next request, even one then
        refused, ended it), nor is it bounded by ``max_concurrent`` (t71: each cut turn of an
        agent loop under ``max_concurrent: 1`` ended the previous turn's read): see
        :meth:`_admit_read`."""
        if x.slot is not None:  # the client has its whole answer
            x.slot.release()
        rest = _ReadOn(tenant=x.record.tenant)
        self._admit_read(provider, rest)
        rest.task = self._drain.spawn(self._settle_rest(x, provider, stream, rest, done), "stream-rest")
        return rest

    def _admit_read(self, provider: Provider, rest: _ReadOn) -> None:
        """Count ``rest`` among the model's reads past the cut, or say why it is let go at the cut.

        A model reads at most ``max_connections // 2`` at once (t71: with a pool of 1, one tenant's
        read took the only connection and another tenant's request got 504 ``upstream_busy``), and
        a tenant holds at most half of them (rounded up): its new cut past that ends its own
        oldest read, never another tenant's, so no tenant can hold all of a model's reads."""
        allowance = provider.config.max_connections // 2
        if allowance < 1:
            rest.why = "no_read_allowance"
            return
        reads = self._reading_on.setdefault(provider.name, [])
        theirs = [read for read in reads if read.tenant == rest.tenant]
        share = -(-allowance // 2)
        while len(theirs) >= share:
            oldest = theirs.pop(0)
            reads.remove(oldest)
            oldest.end("too_many_tenant_reads")
        if len(reads) >= allowance:
            rest.why = "too_many_reads"
        else:
            reads.append(rest)

    def _drop_read(self, provider: Provider, rest: _ReadOn) -> None:
        reads = self._reading_on.get(provider.name, [])
        if rest in reads:  # else let go at the cut, or ended by a newer read and taken out then
            reads.remove(rest)
        if not reads:
            self._reading_on.pop(provider.name, None)

    async def _settle_rest(
        self, x: _Exchange, provider: Provider, stream: ChatStream, rest: _ReadOn, done: Callable[[], None]
    ) -> None:
        tally = stream.tally
        try:
            try:  # (t65) the answer is whole: its followers are not kept waiting
                await _to_the_end(self._store_cut(x, provider, tally))
            except asyncio.CancelledError:  # the drain deadline: settled on the cut text, as in _read_on
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                rest.why = rest.why or "drain_deadline"
            if rest.why is None:
                rest.why = await self._read_on(x, provider, stream, rest)
            await self._settle_tally(x, provider, tally, cut=rest.why is not None)
            if rest.why is not None:  # (t65) billed on the cut text alone: ops and finance are told
                _log.warning(
                    "stream_usage_unread",
                    request_id=x.record.request_id,
                    model=provider.name,
                    reason=rest.why,
                    completion_tokens=x.record.completion_tokens,
                )
        finally:
            self._drop_read(provider, rest)
            rest.settled.set()
            try:
                await self._close_upstream(x, stream)
            finally:  # logged once the client's stream has ended too, however the closing ends (t95)
                rest.done = True
                done()

    async def _read_on(self, x: _Exchange, provider: Provider, stream: ChatStream, rest: _ReadOn) -> str | None:
        """Read the upstream past the cut for its usage, for at most the model's ``timeouts.past_stop``
        (t65); why it was not read to its end, if it was not."""
        rest.reading = True
        try:
            async with asyncio.timeout(provider.config.timeouts.past_stop):
                await stream.read_rest()
            return None
        except TimeoutError:
            return "past_stop_timeout"
        except UpstreamError as exc:  # the client's answer stands: settled on what came
            self._metrics.upstream_error(exc.upstream, exc.code)
            return exc.code
        except asyncio.CancelledError:  # the drain deadline, or a newer read of the tenant's (t71)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return rest.why or "drain_deadline"
        except Exception as exc:
            _internal_error(x, exc)
            return "internal_error"
        finally:
            rest.reading = False

    async def _store_cut(self, x: _Exchange, provider: Provider, tally: StreamTally) -> None:
        """Store the answer cut at the stop (t65: the requests coalesced on it waited for the whole
        generation past the cut)."""
        if not (tally.replayable and self._storing(x)):
            return
        counts = await self._cut_counts(x, provider, tally.said if tally.said is not None else tally.text)
        await self._fill_cache(x, tally.answer(), counts, tally.said_of_serving.get("system_fingerprint"))

    async def _cut_counts(self, x: _Exchange, provider: Provider, said: str) -> RequestRecord:
        """What a cut answer is stored with: the tokens the gateway counts in it, streamed or not
        (t68: a whole one was stored with the upstream's usage, 400 times a streamed one's). What
        the upstream wrote past the cut is the asking request's bill, not the answer's, which a
        hit gives; and a stream is stored at the cut, before the upstream says what it wrote."""
        await self._count_prompt(x)
        counts = msgspec.structs.replace(
            x.record,
            prompt_tokens=x.prompt_tokens,
            completion_tokens=count_text(said, provider.config.encoding),
            cached_prompt_tokens=0,
            cache_write_tokens=0,
            cache_write_1h_tokens=0,
            reasoning_tokens=0,
            audio_prompt_tokens=0,
            audio_completion_tokens=0,
            speed=x.asked.speed,
            inference_geo=x.asked.inference_geo,
            service_tier=x.asked.service_tier,
            server_tool_requests=None,
        )
        counts.cost_usd = _cost(provider.config.price, counts)
        return counts

    async def aclose(self) -> None:
        """At the worker's end: wait for the upstreams still read past their clients' answers (t58)."""
        await self._drain.finish_work()

    # -- accounting ----------------------------------------------------------------

    async def _settle_cut(self, x: _Exchange, provider: Provider, tally: StreamTally) -> None:
        """A stream that ended early (broken, or its client gone): the tally's usage and text."""
        await self._settle_tally(x, provider, tally, cut=tally.finish_reason is None and not tally.usage_exact)

    async def _settle_tally(self, x: _Exchange, provider: Provider, tally: StreamTally, *, cut: bool) -> None:
        """A stream's bill from its tally: usage, text, service tier and the tool uses it showed."""
        await self._settle_off_loop(
            x, provider, tally.usage, tally.text, tally.said, cut=cut, tier=tally.service_tier, tools=tally.server_tools
        )

    def _settle_cut_now(self, x: _Exchange, provider: Provider, tally: StreamTally) -> None:
        """:meth:`_settle_cut` on the event loop, for a caller that cannot wait (a timer's)."""
        cut = tally.finish_reason is None and not tally.usage_exact
        self._settle(
            x, provider, tally.usage, tally.text, tally.said, cut=cut, tier=tally.service_tier, tools=tally.server_tools
        )

    def _settle_cut_as_it_is(self, x: _Exchange, provider: Provider, tally: StreamTally) -> Coroutine[Any, Any, None]:
        """:meth:`_settle_cut` on the tally as it is now, for a caller that cannot wait (a timer's)
        to run later: what the upstream wrote after is not the request's."""
        cut = tally.finish_reason is None and not tally.usage_exact
        tools = dict(tally.server_tools) if tally.server_tools else None
        return self._settle_off_loop(
            x, provider, tally.usage, tally.text, tally.said, cut=cut, tier=tally.service_tier, tools=tools
        )

    async def _settle_off_loop(
        self,
        x: _Exchange,
        provider: Provider,
        usage: Usage | None,
        text: str,
        said: str | None = None,
        *,
        cut: bool = False,
        tier: str | None = None,
        tools: dict[str, int] | None = None,
    ) -> None:
        """:meth:`_settle`, with a long answer the gateway counts counted off the event loop, as a long
        prompt is (t110: a stream of 41M tokens, counted at its cut, held the loop for 26 s); to its
        end whatever cancels the task meanwhile (the cancellation is raised once it is settled)."""
        written = said if said is not None else text
        counts = usage is None or cut or _untrue(usage, x.request, provider, written, cut=cut) is not None
        if not counts or len(written) <= x.runtime.policy.limits.long_prompt_chars:
            self._settle(x, provider, usage, text, said, cut=cut, tier=tier, tools=tools)
            return

        async def count_then_settle() -> None:
            counted = await asyncio.to_thread(count_text, written, provider.config.encoding)
            self._settle(x, provider, usage, text, said, cut=cut, tier=tier, tools=tools, counted=counted)

        await _to_the_end(count_then_settle())

    def _settle(
        self,
        x: _Exchange,
        provider: Provider,
        usage: Usage | None,
        text: str,
        said: str | None = None,
        *,
        cut: bool = False,
        tier: str | None = None,
        tools: dict[str, int] | None = None,
        counted: int | None = None,
    ) -> None:
        """Tokens (the upstream's usage when it sent one) and costs, actual and baseline.

        ``said``: all the model wrote (reasoning and tool calls too), counted when the upstream
        reported no usage; ``cut``: the answer ended early, so a usage it reported may be its
        opening placeholder (Anthropic's ``message_start`` says 1 output token): the output is
        then at least what was counted of it; ``tier``: the ``service_tier`` the answer said
        processed it, billed when there is no usage to carry it (t71: the asked one was billed);
        ``tools``: the hosted tools' uses a stream showed, billed likewise (f176);
        ``counted``: the tokens of what it wrote, counted already (:meth:`_settle_off_loop`).
        A usage no answer can have (:func:`_untrue`) is not billed either: the gateway counts, and
        the log says why (t103: a prompt of 10**15 tokens billed $10**9, and a tenant's budget
        with it).
        """
        record = x.record
        x.settled = True
        record.model, record.provider = provider.name, provider.kind
        x.answered = text or said or ""  # an agent's turn is often a tool call alone: it can be labelled too
        untrue = (
            _untrue(usage, x.request, provider, said if said is not None else text, cut=cut)
            if usage is not None
            else None
        )
        if untrue is not None:
            record.usage_refused, usage = untrue, None
            _log.warning("usage_refused", request_id=record.request_id, model=provider.name, reason=untrue)
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            record.cached_prompt_tokens, record.cache_write_tokens = (
                usage.cached_prompt_tokens,
                usage.cache_write_tokens,
            )
            record.cache_write_1h_tokens = usage.cache_write_1h_tokens
            record.reasoning_tokens = usage.reasoning_tokens
            record.audio_prompt_tokens = usage.audio_prompt_tokens
            record.audio_completion_tokens = usage.audio_completion_tokens
            record.speed, record.inference_geo = usage.speed, usage.inference_geo
            record.service_tier = usage.service_tier
            record.server_tool_requests = dict(usage.server_tool_requests) if usage.server_tool_requests else None
            record.tokens_source = "upstream"
            if cut:
                if counted is None:
                    counted = count_text(said if said is not None else text, provider.config.encoding)
                record.completion_tokens = max(record.completion_tokens, counted)
        else:
            record.prompt_tokens = x.prompt_tokens
            if counted is None:
                counted = count_text(said if said is not None else text, provider.config.encoding)
            record.completion_tokens = counted
            record.speed, record.inference_geo = x.asked.speed, x.asked.inference_geo  # as asked, unsaid
            record.service_tier = tier if tier is not None else x.asked.service_tier
            record.server_tool_requests = dict(tools) if tools else None
            record.tokens_source = "gateway"
        if record.tokens_source == "gateway" or cut:
            # what the gateway counted of a runaway upstream is not billed past what the request let it write (t111)
            record.completion_tokens = min(record.completion_tokens, _allowed_tokens(x.request, provider))
        if x.asked.web_search_options and provider.kind == "openai":
            # OpenAI's search models bill each chat request one search, which their usage does not count (t150)
            record.server_tool_requests = {**(record.server_tool_requests or {}), "web_search": 1}
        if (
            record.speed
            or record.inference_geo
            or record.service_tier
            or record.server_tool_requests
            or record.audio_prompt_tokens
            or record.audio_completion_tokens
        ):
            _warn_unpriced(provider, record)  # most answers ran with none of them
        record.cost_usd = _cost(provider.config.price, record)
        baseline = x.runtime.policy.models.get(record.baseline_model or "")
        if baseline is not None:
            record.baseline_cost_usd = _cost(baseline.price, record)

    def _headers(self, x: _Exchange, cost: float | None = None) -> dict[str, str]:
        record = x.record
        info = x.info
        overhead_ms = (time.perf_counter() - x.started - info.upstream_seconds - info.client_seconds) * 1000
        headers = {
            "x-request-id": record.request_id,
            "x-gateway-cache": record.cache,
            "x-gateway-cost-usd": f"{record.cost_usd if cost is None else cost:.8f}",
            "x-gateway-overhead-ms": f"{overhead_ms:.3f}",
            "x-gateway-policy-version": record.policy_version or "",
        }
        _name_the_model(headers, record.model, record.route)
        if record.cache_similarity is not None:
            headers["x-gateway-cache-similarity"] = f"{record.cache_similarity:.4f}"
        if record.cache_p_same is not None:
            headers["x-gateway-cache-p-same"] = f"{record.cache_p_same:.4f}"
        if record.decision is not None:
            headers["x-gateway-decision"] = record.decision
        if record.p_large is not None:
            headers["x-gateway-p-large"] = f"{record.p_large:.4f}"
            headers["x-gateway-router-version"] = record.router_version or "shipped"
            if record.threshold is not None:  # a target share moves it: the client sees what held (t178)
                headers["x-gateway-threshold"] = f"{record.threshold:.4f}"
        if (
            x.body is not None and record.model
        ):  # a chat client's request, which a translating upstream may not carry whole
            provider = x.runtime.providers.get(record.model)
            lost = provider.not_carried(x.request) if provider is not None else []
            dropped = dropped_header([*x.request.dropped, *lost])
            if dropped:
                headers["x-gateway-dropped"] = dropped
        return headers

    def _error_answer(self, x: _Exchange, exc: GatewayError) -> Answer:
        record = x.record
        status = exc.status_code
        if status == _ANTHROPIC_OVERLOADED and record.protocol != "anthropic.messages":
            status = 503  # OpenAI's word for it: its clients know no 529
        record.status = status
        record.error_type = exc.code or exc.error_type
        if isinstance(exc, UpstreamError):
            record.upstream_status = getattr(exc, "upstream_status", None)
            if record.model is None and not isinstance(exc, UpstreamUnavailableError):  # a skip: none called (t72)
                name_the_failed_model(record, x.runtime.providers.get(exc.upstream))
        headers = self._headers(x)
        headers.update(exc.headers)
        return Answer(status, exc.to_body(), headers)

    def _name_the_last_failure(self, x: _Exchange) -> None:
        """A request ended between attempts (its client gone in a backoff) is the failure of the model
        that was called last, as it is when the error reaches the client: it was logged with model
        null, and counted under ``model="-"`` (t72)."""
        failed = x.info.last_failure
        if failed is not None:
            name_the_failed_model(x.record, x.runtime.providers.get(failed.upstream))
            x.record.upstream_status = getattr(failed, "upstream_status", None)

    def _finish(
        self, x: _Exchange, upstream_seconds: float, client_seconds: float, ended_at: float | None = None
    ) -> None:
        """Time the request now (or at ``ended_at``, when its client's answer ended before its
        upstream was let go): its overhead is what waiting on the upstream and on the client
        leaves; account for it (metrics, log line, learning, limits) just after the answer went
        out: the client does not wait for its bookkeeping (~15 % of the proxy path's Python time)."""
        if x.slot is not None:
            x.slot.release()
        record = x.record
        elapsed = (time.perf_counter() if ended_at is None else ended_at) - x.started
        record.latency_ms = round(elapsed * 1000, 3)
        record.overhead_ms = round(max(0.0, elapsed - upstream_seconds - client_seconds) * 1000, 3)
        record.client_wait_ms = round(client_seconds * 1000, 3)
        record.retries = x.info.retries
        record.fallback_used = x.info.fallback_used
        if record.ttft_ms is not None:
            record.ttft_ms = round(record.ttft_ms, 3)
        asyncio.get_running_loop().call_soon(self._account, x)

    def _account(self, x: _Exchange) -> None:
        """The log line and the usage first: they are the bill, and a fault in the metrics or in
        learning must not cost them."""
        record = x.record
        log_request(record)
        if x.reservation is not None:
            self._limiter.settle_later(x.runtime.policy, x.reservation, UsageFigures.of_request(record))
        elif record.key_id != "-":  # authenticated, then refused
            self._limiter.record_unreserved(
                x.runtime.policy, record.tenant, record.key_id, UsageFigures.of_request(record), x.at
            )
        try:
            for failure in x.info.failures:
                self._metrics.upstream_error(failure.upstream, failure.code)
            self._metrics.observe(record)
            self._teach(x)
        except Exception as exc:  # a bug of ours: the request is billed and logged all the same
            _log.error("accounting_failed", request_id=record.request_id, error=type(exc).__name__,
                       where=exception_frames(exc))  # fmt: skip


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Run a request's cleanup (its lease released, its prompt counted for the bill) to its end,
    whatever cancels the task meanwhile; a cancellation that came is raised once it is done.

    ``anyio.CancelScope(shield=True)`` keeps out an anyio scope's cancellation only: the client
    leaving (:class:`~gateway.api.handoff.DisconnectWatch`) and the drain deadline call the task's
    ``cancel()``, which cut such an await short, and what came after it was never done (t95: a
    lease's release cut short left the request's place among its tenant's requests in flight held
    for good, and the request unlogged). On a task of its own, the work is not cut; the shield
    spares this wait an anyio scope's cancellation, delivered again at every turn of the loop."""
    done = asyncio.ensure_future(work)
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not done.done():
            try:
                await asyncio.wait((done,))
            except asyncio.CancelledError:
                cancelled = True
    if cancelled and (done.cancelled() or done.exception() is None):
        raise asyncio.CancelledError
    done.result()


async def _checkpoint(tally: StreamTally, most: int, provider: Provider) -> None:
    """Every :data:`_CHECK_EVERY` chunks of a stream: let the rest of the event loop run (the
    client's hang-up among it, whose cancellation lands here), and cut an upstream that writes
    far past what the request allows."""
    await asyncio.sleep(0)
    if tally.written() > most:
        raise UpstreamProtocolError(
            provider.name,
            f"the stream wrote over {most} characters, {_CHARS_PER_TOKEN} per token the request allows: cut there",
        )


def _allowed_tokens(request: core.Request, provider: Provider) -> int:
    """The most completion tokens an upstream can write (and bill) for the request: its
    ``max_tokens``, else the model's window, for each of the ``n`` answers."""
    window = provider.config.context_window
    return min(request.max_tokens or window, window) * _answers_asked(request)


def _most_chars(request: core.Request, provider: Provider) -> int:
    """What a stream may write before it is taken for broken (:data:`_CHARS_PER_TOKEN`)."""
    return max(_allowed_tokens(request, provider) * _CHARS_PER_TOKEN, _LEAST_CHARS)


_GIVEN_UP = frozenset({"abort", "error"})
"""Finish reasons that say the upstream gave the generation up, wherever it was (vLLM's and SGLang's
``abort``, Mistral's ``error``): chat and completions clients are told them as they came."""


def _unsayable(reason: str | None, protocol: str) -> bool:
    """The upstream gave the answer up, or never said it finished, and the client's API has no word
    for it: Messages and Responses clients would read ``end_turn`` / ``completed``, a whole turn
    (t121; f179: a whole answer whose ``finish_reason`` is null, as a stream without one)."""
    return (reason is None or reason in _GIVEN_UP) and protocol in ("anthropic.messages", "openai.responses")


def _unfinished(provider: Provider, reason: str | None) -> UpstreamError:
    """The upstream's failure for an answer it gave up (``reason``) or never said it finished (None)."""
    if reason is None:
        unsaid = UpstreamProtocolError(provider.name, "the answer ended without a finish reason")
        unsaid.upstream_status = 200  # it answered (t69)
        return unsaid
    return UpstreamGaveUpError(provider.name, f"it gave the answer up (finish_reason '{reason}'): it may be cut short")


_REPLAYED_FINISH = frozenset({"stop", "stop_sequence", "length", "model_context_window_exceeded", "tool_calls"})


def _complete(answer: core.Answer) -> bool:
    """Worth replaying: the model finished (or hit max_tokens or its context window, which the
    key's prompt and max_tokens decide) and said something. An empty answer, a content filter's
    stop or a stream that never said why it ended is what that one call got, not the answer to
    the prompt."""
    return answer.finish_reason in _REPLAYED_FINISH and bool(answer.text or answer.tool_calls)


def _unstreamed(request: core.Request, body: dict[str, Any] | None) -> tuple[core.Request, dict[str, Any] | None]:
    """The request asked again off the request path, whole."""
    if body is not None:
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return msgspec.structs.replace(request, stream=False), body


def _shadow_costs(x: _Exchange, other: str, judge: str) -> ShadowCosts:
    """What a shadow job of this answered request may cost, from the counts already made (t152):
    the other model asked as the request was reserved, the judge reading what it is shown of
    the request and of the answer."""
    policy, record, request, asked = x.runtime.policy, x.record, x.request, x.asked
    model = policy.models[other]
    written = min(request.max_tokens or policy.limits.default_completion_tokens, model.context_window)
    written *= _answers_asked(request)
    other_usd = cost_usd(
        model.price,
        record.prompt_tokens,
        written,
        speed=asked.speed,
        inference_geo=asked.inference_geo,
        service_tier=asked.service_tier,
        server_tool_requests=asked.server_tools,
    )
    read = read_tokens(record.prompt_tokens, prompt_chars(request))
    read += read_tokens(record.completion_tokens, len(x.answered))
    return ShadowCosts(other_usd, policy.models[judge].price, read, written)


def _includes_usage(body: dict[str, Any] | None) -> bool:
    """A chat client asked for the usage chunk at the end of its stream."""
    options = body.get("stream_options") if body is not None else None
    return isinstance(options, dict) and options.get("include_usage") is True


def _internal_error(x: _Exchange, exc: Exception) -> GatewayError:
    """Log an unexpected exception with the request's id (its type and place, never contents)."""
    x.record.error_type = "internal_error"
    _log.error("internal_error", request_id=x.record.request_id, error=type(exc).__name__, where=exception_frames(exc))
    return GatewayError("internal error in the gateway; the request id is in x-request-id", code="internal_error")


def _record_speculation(record: RequestRecord, result: Completion | ChatStream) -> None:
    stats = result.speculation
    if stats is not None:
        record.speculation = stats.to_log()


def _read_chat(raw: bytes, principal: Principal) -> tuple[dict[str, Any], Any, core.Request]:
    """A chat body: the body (its end-user ids the tenant's own, without the operator's engine
    fields but those the key may send), its ``gateway_cache`` directives, and the request in the
    internal model (a kept field in its ``extra``, so in the cache key, as unknown fields are)."""
    body, engine = without_engine_fields(
        scoped_body(parse_chat_request(raw), principal.tenant), principal.engine_fields
    )
    directives = body.pop("gateway_cache", None)
    if directives is not None:
        check_directives(directives)
    request = read_chat_request(body)
    request.dropped = engine
    return body, directives, request


class _Streamed(msgspec.Struct):
    stream: Any = None


def _asks_stream(raw: bytes) -> bool:
    """Whether a body its protocol refused asks for a stream: a JSON object whose ``stream`` is ``true``."""
    try:
        return msgspec.json.decode(raw, type=_Streamed).stream is True
    except (msgspec.DecodeError, RecursionError):  # not JSON, or not an object: it asks for nothing
        return False


_PRICED_CHAT = frozenset({"modalities", "audio", "web_search_options"})
"""Chat fields that may ask for what OpenAI bills above the text prices (t150)."""


def _chat_priced(asked: PricedOptions, request: core.Request, body: dict[str, Any]) -> PricedOptions:
    """What a chat request asks for that OpenAI bills above the text prices (t150): audio heard
    (an ``input_audio`` part, or an earlier spoken answer sent back by its ``audio.id``, which the
    model cannot read: :attr:`core.Request.unreadable`), audio spoken (any ``audio`` but null: t159,
    ``{}`` went on unpriced), a web search."""
    extra = request.extra
    modalities = extra.get("modalities")
    if modalities is not None and not isinstance(modalities, list):  # t159: "audio" went on, read as no audio
        raise InvalidRequestError("modalities: an array of strings is required", param="modalities")
    if modalities is not None and "audio" in modalities:
        speaks: str | None = "modalities"
    else:
        speaks = "audio" if extra.get("audio") is not None else None
    return replace(
        asked,
        audio_input="messages" if request.unreadable is not None and _hears(body) else None,
        audio_output=speaks,
        web_search_options=extra.get("web_search_options") is not None,
    )


def _hears(body: dict[str, Any]) -> bool:
    messages = body.get("messages")
    return isinstance(messages, list) and any(_holds_audio(message) for message in messages)


def _holds_audio(message: object) -> bool:
    """An ``input_audio`` part, or a spoken answer sent back (its ``audio.id``): audio tokens of the prompt."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") == "input_audio" for part in content
    ):
        return True
    return bool(message.get("audio"))


def _asked_tier(tier: object) -> str | None:
    """A chat body's ``service_tier``: OpenAI's priority and flex price the estimate too; another
    string is neither priced nor logged (free text in a dashboard's group), and what is no string
    is refused, as OpenAI refuses it (t67: a list was a 500)."""
    if not isinstance(tier, str):
        raise InvalidRequestError("service_tier: expected a string", param="service_tier")
    tier = tier.lower()  # as the upstream's answer is read (t68)
    return tier if tier in SERVICE_TIERS else None


def _untrue(usage: Usage, request: core.Request, provider: Provider, said: str, *, cut: bool = False) -> str | None:
    """Why ``usage`` cannot be the upstream's count of this answer, or None (t103). No prompt is
    longer than the model's context window, nor any of the ``n`` completions (reasoning
    included, as OpenAI's ``max_completion_tokens`` and Anthropic's ``max_tokens`` bound them)
    longer than the window or ``max_tokens``; text is never 0 tokens. A prompt an upstream-run
    tool (web search) grew over several turns is not bounded by the window. ``cut``: the stream
    ended early, and its usage may be the placeholder of one that had just begun."""
    answers = _answers_asked(request)
    window = provider.config.context_window
    if usage.prompt_tokens > window and not usage.server_tool_requests:
        return "prompt_over_window"
    if usage.completion_tokens > window * answers:
        return "completion_over_window"
    if request.max_tokens is not None and usage.completion_tokens > request.max_tokens * answers:
        return "completion_over_max_tokens"
    if usage.completion_tokens == 0 and said and not cut:
        return "no_completion_tokens"
    if usage.prompt_tokens == 0 and prompt_chars(request) > 0:
        return "no_prompt_tokens"
    return None


def _answers_asked(request: core.Request) -> int:
    """``n``: each answer writes (and is billed) its own completion, so the estimate holds n."""
    n = request.extra.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def _failed_speculation(failures: list[UpstreamError]) -> dict[str, Any] | None:
    """The speculative loop's work for the log of a request that failed: the last attempt that
    ran rounds (a retry that failed at once did none), else the last one that tried."""
    tried = [f.speculation for f in failures if f.speculation is not None]
    worked = [s for s in tried if s.get("rounds")]
    chosen = worked or tried
    return chosen[-1] if chosen else None


def _completer(request: core.Request, body: dict[str, Any] | None) -> Callable[[Provider], Awaitable[Completion]]:
    async def call(provider: Provider) -> Completion:
        return await provider.complete(request, _for(provider, body))

    return call


_Piece = bytes | list[core.Delta]
"""What a provider's stream gives: a chat chunk (or a passed-through event), or deltas."""


class _Ask(Protocol):
    """Asks models off the request path: the answer's text and what it cost."""

    async def __call__(
        self,
        candidates: tuple[str, ...],
        request: core.Request,
        body: dict[str, Any] | None = None,
        whole: bool = False,
    ) -> tuple[str, float]: ...


def _stream_opener(x: _Exchange, typed: bool) -> Callable[[Provider], Awaitable[tuple[ChatStream, _Piece | None]]]:
    request, body = x.request, x.body

    async def call(provider: Provider) -> tuple[ChatStream, _Piece | None]:
        return await _opened(x, provider.open_stream(request, _for(provider, body)), typed)

    return call


def _for(provider: Provider, body: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat client's body as this provider's upstream is sent it: its own model name."""
    return None if body is None else {**body, "model": provider.upstream_model}


def _text_chars(deltas: list[core.Delta]) -> int:
    """The text and tool arguments a batch of deltas adds (what :meth:`StreamTally.written` counts)."""
    chars = 0
    for delta in deltas:
        if isinstance(delta, core.TextDelta | core.ThinkingDelta | core.RefusalDelta):
            chars += len(delta.text)
        elif isinstance(delta, core.ToolArgumentsDelta):
            chars += len(delta.fragment)
    return chars


def _piece_size(piece: _Piece) -> int:
    """About what a piece read ahead of a slow client keeps in memory, Python's headers included.

    Counting the text alone let a stream of short deltas hold ~2.5 times its read-ahead bound.
    """
    if isinstance(piece, bytes):
        return 33 + len(piece)
    size = 56 + 8 * len(piece)
    for delta in piece:
        size += 48 + sum(49 + len(v) for v in msgspec.structs.astuple(delta) if isinstance(v, str))
    return size


async def _opened(
    x: _Exchange, opening: Awaitable[ChatStream], typed: bool = False
) -> tuple[ChatStream, _Piece | None]:
    """Open the stream and wait for its first chunk (or deltas), so failures before it can still
    be retried; meanwhile it is the exchange's :attr:`~_Exchange.opening`."""
    x.opening = None  # not a failed attempt's
    stream = x.opening = await opening
    try:
        return stream, await (stream.next_deltas() if typed else stream.__anext__())
    except StopAsyncIteration:
        return stream, None
    except BaseException as exc:
        if isinstance(exc, UpstreamProtocolError) and exc.upstream_status is None:
            exc.upstream_status = 200  # the stream was open: its upstream had answered (t69)
        await stream.aclose()
        raise


def _relayed(relay: PassThrough, tenant: str | None) -> Callable[[Provider], Awaitable[Completion]]:
    async def call(provider: Provider) -> Completion:
        return await provider.relay(provider.salted(_for(provider, relay.body) or {}, tenant), relay.headers)

    return call


def _open_relayed(
    x: _Exchange, relay: PassThrough
) -> Callable[[Provider], Awaitable[tuple[ChatStream, _Piece | None]]]:
    async def call(provider: Provider) -> tuple[ChatStream, _Piece | None]:
        body = provider.salted(_for(provider, relay.body) or {}, x.request.tenant)
        return await _opened(x, provider.open_relay(body, relay.headers))

    return call


def _failure(stream: ChatStream, error: GatewayError, typed: bool) -> bytes | StreamBroke:
    """How the client learns that the stream failed after it began."""
    return StreamBroke(msgspec.json.decode(error.to_body())) if typed else stream.error_event(error)


def _usage_of(record: RequestRecord) -> core.Usage:
    return core.Usage(
        input_tokens=record.prompt_tokens,
        output_tokens=record.completion_tokens,
        cached_input_tokens=record.cached_prompt_tokens,
        cache_write_tokens=record.cache_write_tokens,
        cache_write_1h_tokens=record.cache_write_1h_tokens,
        reasoning_tokens=record.reasoning_tokens,
        audio_input_tokens=record.audio_prompt_tokens,
        audio_output_tokens=record.audio_completion_tokens,
        speed=record.speed,
        inference_geo=record.inference_geo,
        service_tier=record.service_tier,
        server_tool_requests=dict(record.server_tool_requests or {}),
    )


def _cost(price: Price, record: RequestRecord) -> float:
    return cost_usd(
        price,
        record.prompt_tokens,
        record.completion_tokens,
        cached_prompt_tokens=record.cached_prompt_tokens,
        cache_write_tokens=record.cache_write_tokens,
        cache_write_1h_tokens=record.cache_write_1h_tokens,
        reasoning_tokens=record.reasoning_tokens,
        audio_prompt_tokens=record.audio_prompt_tokens,
        audio_completion_tokens=record.audio_completion_tokens,
        speed=record.speed,
        inference_geo=record.inference_geo,
        service_tier=record.service_tier,
        server_tool_requests=record.server_tool_requests,
    )


def _warn_unpriced(provider: Provider, record: RequestRecord) -> None:
    """An option the upstream says it used that the policy does not price (a workspace's default
    ``inference_geo`` the request did not ask for, a ``priority`` tier): billed at the base price,
    and said to ops (t59)."""
    asked = PricedOptions(
        record.speed,
        record.inference_geo,
        record.server_tool_requests or {},
        record.service_tier,
        audio_input="messages" if record.audio_prompt_tokens else None,
        audio_output="modalities" if record.audio_completion_tokens else None,
    )
    missing = unpriced(provider.config.price, asked)
    if missing:
        fields = [f"models.{provider.name}.price.{one.field}" for one in missing]
        _log.warning("unpriced_usage", request_id=record.request_id, model=provider.name, unpriced=fields)


def _ending(tally: StreamTally, record: RequestRecord, typed: bool, include_usage: bool) -> list[bytes | DeltaBatch]:
    """What ends a stream that went well: the usage (as the client asked for it) and the end."""
    if typed:
        return [[core.UsageReport(_usage_of(record))], None]
    if include_usage:
        return [b"data: " + _usage_chunk(tally, record) + b"\n\n", b"data: [DONE]\n\n"]
    return [b"data: [DONE]\n\n"]


def _usage_chunk(tally: StreamTally, record: RequestRecord) -> bytes:
    chunk_id = tally.id or f"chatcmpl-{record.request_id}"
    created, model = tally.created or int(time.time()), tally.model or record.model
    usage = _billed_usage(record)
    if record.tokens_source == "upstream" and tally.usage_said is not None:
        usage = _with_details_said(usage, tally.usage_said)
    return chunk_body(chunk_id, created, model, None, usage=usage, serving=tally.said_of_serving)


def _with_details_said(billed: dict[str, Any], said: dict[str, Any]) -> dict[str, Any]:
    """The billed usage with the rest of what the upstream's said (OpenAI's prediction and audio
    tokens), as the whole answer carries it (t150: a stream's usage chunk dropped them); the
    counts billed win where the two differ (an answer the gateway cut at a stop string)."""
    said = client_usage(said)  # OpenAI's fields alone: no router's cost of the operator's account (t159)
    usage = {**said, **billed}
    for name in ("prompt_tokens_details", "completion_tokens_details"):
        details = said.get(name)
        if isinstance(details, dict):
            usage[name] = {**details, **billed.get(name, {})}
    return usage


def _billed_usage(record: RequestRecord) -> dict[str, Any]:
    return usage_body(
        record.prompt_tokens, record.completion_tokens,
        cached_tokens=record.cached_prompt_tokens, reasoning_tokens=record.reasoning_tokens,
        cache_write_tokens=record.cache_write_tokens,
    )  # fmt: skip


def _with_billed_usage(body: bytes, record: RequestRecord) -> bytes:
    """A chat answer whose upstream sent no usage, or none that reads as counts: the client is
    told the counts it is billed, as a stream's usage chunk tells them (t69: no ``usage`` at all,
    or the upstream's nulls and strings, while the bill used the gateway's count). That they are
    the gateway's count is said in the log (``tokens_source``) only."""
    data = msgspec.json.decode(body)
    if not isinstance(data, dict):
        return body
    return msgspec.json.encode({**data, "usage": _billed_usage(record)})


def name_the_failed_model(record: RequestRecord, tried: Provider | None) -> None:
    """A request that failed upstream is the failure of the last model tried (the one whose error
    the client got): logged and counted with ``model="-"``, the error rate by model never showed a
    model that was down (t70). Tried is called: a model skipped for its open circuit is not (t72)."""
    if tried is not None:
        record.model, record.provider = tried.name, tried.kind


def _name_the_model(headers: dict[str, str], model: str | None, route: str | None) -> None:
    """``x-gateway-model`` and ``x-gateway-route``, where the request got that far: an error raised
    before routing (a malformed body) names none, rather than sending empty headers (t60)."""
    if model:
        headers["x-gateway-model"] = model
    if route:
        headers["x-gateway-route"] = route
