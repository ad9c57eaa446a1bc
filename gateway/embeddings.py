"""``POST /v1/embeddings``: the chat pipeline's steps for embedding models.

Auth, the route (a model or route of ``kind: embedding``), limits and budgets on the
input tokens, an exact cache per input string (a batch whose inputs were seen before
pays only for the new ones), retries, fallbacks and breakers through :func:`dispatch`,
and one request-log line with ``protocol`` ``openai.embeddings``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import structlog

from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import RequestRecord, exception_frames, log_request, utc_stamp
from gateway.accounting.usage import UsageFigures
from gateway.auth import Credentials
from gateway.cache.plan import directives
from gateway.core.headers import dropped_header
from gateway.dispatch import DispatchInfo, dispatch
from gateway.drain import DEFAULT_DRAIN_S, Drain
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    ShuttingDownError,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.limits import Limiter, Reservation
from gateway.pipeline import Answer, name_the_failed_model
from gateway.pricing import cost_usd
from gateway.protocols.body import check_fields, decode_body, named_model
from gateway.protocols.engine_fields import without_engine_fields
from gateway.protocols.tenant_ids import scoped_body
from gateway.routing import RoutePlan
from gateway.runtime import Runtime, RuntimeHolder
from gateway.store import keyspace
from gateway.store.base import KeyValue, StoreUnavailable
from gateway.tokens import count_text
from gateway.upstreams.base import Embeddings, Provider
from gateway.upstreams.sending import SendMark, watch_sending

__all__ = ["EmbeddingsPipeline"]

_log = structlog.get_logger("gateway.embeddings")
_MAX_INPUTS = 2048
_PER_KEY_S = 0.0001
"""What a batch's cache read or write may take per key above ``cache.redis_timeout_ms`` (t161:
2,048 keys in one MGET passed 50 ms on a loaded host); at most 2,048 keys: 205 ms more."""


class _EmbeddingsRequest(msgspec.Struct, forbid_unknown_fields=False):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: Any
    """A string, strings, token ids, or lists of token ids (checked in :func:`_parse`)."""
    encoding_format: Literal["float", "base64"] | None = None
    """None (unset, or null as the openai SDK sends for `encoding_format=None`): float."""
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


@dataclass(slots=True)
class _AtWork:
    """A request whose upstream may be at work on its batch when its client hangs up."""

    info: DispatchInfo
    sending: SendMark
    client_left: bool = False
    """The client hung up while the upstream embedded the batch, which is waited for."""


class EmbeddingsPipeline:
    def __init__(
        self, holder: RuntimeHolder, metrics: Metrics, store: KeyValue, limiter: Limiter, drain: Drain | None = None
    ) -> None:
        self._holder = holder
        self._metrics = metrics
        self._store = store
        self._limiter = limiter
        self._drain = drain or Drain(DEFAULT_DRAIN_S)
        self._at_work: dict[asyncio.Task[Any], _AtWork] = {}

    def client_left(self, task: asyncio.Task[Any]) -> bool:
        """The edge saw ``task``'s client hang up: whether the request goes on, as a chat request's
        whole answer does (:meth:`gateway.pipeline.ChatPipeline.client_left`): a batch sent upstream
        is billed there whatever the client does, so it is waited for, billed, cached (the client's
        retry is a hit) and logged as a 499 (t136: logged with 0 tokens and $0, and embedded and
        billed again on the retry). No identical request waits on it: a failed attempt is the last."""
        work = self._at_work.get(task)
        if work is None or self._drain.expired or not work.info.goes_on_without_client(work.sending, lambda: True):
            return False
        work.client_left = True
        return True

    async def handle(
        self,
        read_body: Callable[[int, float], Awaitable[bytes]],
        authorization: Credentials,
        cache_control: str | None,
        request_id: str,
        started: float,
        protocol: str = "openai.embeddings",
        body_wait: Callable[[], float] | None = None,
    ) -> Answer:
        """``body_wait()``: the seconds ``read_body`` waited for the client to send the body."""
        runtime = self._holder.current
        at = time.time()  # the request's start: its usage's day and month, and its line's started_at
        record = RequestRecord(
            request_id=request_id,
            key_id="-",
            tenant="-",
            policy_version=runtime.version,
            protocol=protocol,
            started_at=utc_stamp(at),
        )
        info = DispatchInfo()
        reservation: Reservation | None = None
        work: _AtWork | None = None
        engine: list[str] = []  # the operator's engine fields the client sent: not sent on (t177)
        task = self._drain.track()  # ended with a 503 at the drain deadline, not cut by the server's kill
        try:
            principal = runtime.auth.authenticate(authorization)
            record.key_id, record.tenant = principal.key_id, principal.tenant
            limits = runtime.policy.limits
            try:
                raw = await read_body(limits.max_body_bytes, limits.body_read_timeout_s)
            finally:
                if body_wait is not None:
                    info.client_seconds = body_wait()
            try:
                request, inputs, extra = _parse(raw)
            except InvalidRequestError:  # an unknown model is named first, whatever else is wrong
                runtime.router.refuse_unknown(named_model(raw), principal.allowed)
                raise
            extra, engine = without_engine_fields(scoped_body(extra, principal.tenant), principal.engine_fields)
            plan = runtime.router.plan(request.model, principal.allowed)
            record.route, record.decision = plan.route, plan.decision
            models = [runtime.policy.models[name] for name in plan.candidates]
            if any(model.kind != "embedding" for model in models):
                raise InvalidRequestError(
                    f"model '{request.model}' is a chat model; embeddings need a model of kind 'embedding'",
                    param="model",
                )
            first = models[0]
            counts = await _count(inputs, first.encoding, limits.long_prompt_chars)
            total_tokens = sum(counts)
            # Every key gets a reservation, one without limits too: settling it records the usage.
            # Priced at the dearest model the request may end at (a fallback may cost more).
            estimate = max(cost_usd(model.price, total_tokens, 0) for model in models)
            reservation = await self._limiter.reserve(
                runtime.policy, principal, total_tokens, estimate, at, inputs=True
            )
            work = _AtWork(info, watch_sending())  # a client leaving before anything was sent is billed nothing
            if task is not None:
                self._at_work[task] = work
            vectors = await self._answer(runtime, plan, request, inputs, extra, counts, record, info, cache_control)
            # The baseline is every input embedded by the route's model: what the cache saves shows
            # as savings, as for chat (without one, each request counted its cost as negative savings).
            # Its tokens are the ones billed (the upstream's count where it gave one), so a miss saves nothing.
            record.baseline_model = plan.candidates[0]
            record.baseline_cost_usd = cost_usd(first.price, record.prompt_tokens, 0)
            body = _response(request, vectors, record.model or request.model, record.prompt_tokens)
            return Answer(200, body, _headers(record, started, info, engine))
        except GatewayError as exc:
            if isinstance(exc, UpstreamError) and record.model is None:
                name_the_failed_model(record, runtime.providers.get(exc.upstream))
            return _error_answer(record, exc, started, info, engine)
        except Exception as exc:  # a bug of ours: answered and logged as what it is, never a lost request
            record.error_type = "internal_error"
            _log.error("internal_error", request_id=request_id, error=type(exc).__name__, where=exception_frames(exc))
            error = GatewayError(
                "internal error in the gateway; the request id is in x-request-id", code="internal_error"
            )
            return _error_answer(record, error, started, info)
        except asyncio.CancelledError:
            if self._drain.ended_by_deadline(task):
                error = ShuttingDownError(
                    "the gateway is shutting down; the answer did not come before its drain deadline"
                )
                return _error_answer(record, error, started, info)
            record.status, record.error_type = 499, "client_disconnected"  # logged as what it was, not a 200
            raise
        finally:
            self._drain.untrack(task)
            if task is not None:
                self._at_work.pop(task, None)
            if work is not None and work.client_left:
                record.status, record.error_type = 499, "client_disconnected"
            self._finish(runtime, record, info, started, at, reservation)

    async def _answer(
        self,
        runtime: Runtime,
        plan: RoutePlan,
        request: _EmbeddingsRequest,
        inputs: list[str] | list[list[int]],
        extra: dict[str, Any],
        counts: list[int],
        record: RequestRecord,
        info: DispatchInfo,
        cache_control: str | None,
    ) -> list[np.ndarray]:
        policy = runtime.policy.cache
        told = directives(cache_control)
        use_cache = policy.enabled and policy.exact.enabled
        read, write = use_cache and "no-cache" not in told, use_cache and "no-store" not in told
        timeout_s = policy.redis_timeout_ms / 1000
        primary = plan.candidates[0]
        # truncation changes a vector; an end user and a key's kept queue `priority` (f223) do not
        shaping = {name: value for name, value in extra.items() if name not in _NOT_SHAPING}
        model = runtime.policy.models[primary]
        # the server too: a policy that points the model elsewhere must not mix two spaces in one answer
        space = (primary, model.base_url, model.upstream_model or primary, request.dimensions, shaping)
        keys = [_key(record.tenant, space, item) for item in inputs]
        found: list[np.ndarray | None] = [None] * len(inputs)
        kept_tokens = list(counts)
        record.cache = "bypass"
        if read:
            try:
                raws = await self._store.get_many(keys, _batch_timeout_s(timeout_s, len(keys)))  # one round trip
                for index, raw in enumerate(raws):
                    if raw:
                        found[index], kept_tokens[index] = _cached(raw)
                record.cache = "miss"
            except StoreUnavailable:
                read = write = False
        missing = [i for i, vector in enumerate(found) if vector is None]
        price = runtime.policy.models[plan.candidates[0]].price
        hit_tokens = sum(kept_tokens[i] for i, vector in enumerate(found) if vector is not None)
        if not missing:
            record.cache, record.decision = "exact", "cache"  # as a chat hit says: nothing was routed
            record.model = plan.candidates[0]
            record.prompt_tokens, record.tokens_source = hit_tokens, "cache"  # as a chat hit says
            record.cost_usd = 0.0
            record.cache_saved_usd = cost_usd(price, hit_tokens, 0)
            return [vector for vector in found if vector is not None]
        asked = [inputs[i] for i in missing]

        async def embed(provider: Provider) -> Embeddings:
            # A fallback's vectors live in another space than the primary's cached ones: it embeds the whole batch.
            batch = asked if provider.name == primary else inputs
            try:
                return await provider.embed(batch, request.dimensions, extra)  # type: ignore[arg-type]
            except UpstreamStatusError as exc:
                if exc.code == "context_length_exceeded":  # the client's to shorten: another model is another space
                    exc.try_next = False
                raise

        answered = await dispatch(
            plan.candidates,
            runtime.providers,
            self._holder.breakers.for_tenant(record.tenant),
            plan.retry or runtime.policy.retry,
            embed,
            info,
        )
        provider = info.provider
        assert provider is not None
        if provider.name != primary:  # its vectors answer the whole batch and are not cached under the primary's keys
            write = False
            missing, hit_tokens, found = list(range(len(inputs))), 0, [None] * len(inputs)
        record.model, record.provider, record.upstream_status = provider.name, provider.kind, 200
        _note_refused(record, provider, answered)
        billed = answered.prompt_tokens if answered.prompt_tokens is not None else sum(counts[i] for i in missing)
        record.tokens_source = "upstream" if answered.prompt_tokens is not None else "gateway"
        record.cost_usd = cost_usd(provider.config.price, billed, 0)
        record.prompt_tokens = billed + hit_tokens  # the cached inputs as they were billed when embedded
        if hit_tokens:
            record.cache_saved_usd = cost_usd(price, hit_tokens, 0)
        new = [np.asarray(vector, dtype="<f4") for vector in answered.vectors]
        if new and any(vector is not None and len(vector) != len(new[0]) for vector in found):
            # the cached vectors are of another size than the server's now (it serves another model
            # under the same name): the whole batch is embedded again, none of it from the cache
            answered = await provider.embed(inputs, request.dimensions, extra)
            _note_refused(record, provider, answered)
            missing, hit_tokens, found = list(range(len(inputs))), 0, [None] * len(inputs)
            billed += answered.prompt_tokens if answered.prompt_tokens is not None else sum(counts)
            record.cost_usd = cost_usd(provider.config.price, billed, 0)
            record.prompt_tokens, record.cache_saved_usd = billed, None
            new = [np.asarray(vector, dtype="<f4") for vector in answered.vectors]
        for index, vector in zip(missing, new, strict=True):
            found[index] = vector
        if write:
            ttl_s = policy.exact.ttl_s
            tokens = _shared_out(answered.prompt_tokens, [counts[i] for i in missing])
            try:
                items = [
                    (keys[i], _entry(vector, count)) for i, vector, count in zip(missing, new, tokens, strict=True)
                ]
                await self._store.put_many(items, ttl_s, _batch_timeout_s(timeout_s, len(items)))
            except StoreUnavailable:
                pass  # a later miss, nothing worse
        return [vector for vector in found if vector is not None]

    def _finish(
        self,
        runtime: Runtime,
        record: RequestRecord,
        info: DispatchInfo,
        started: float,
        at: float,
        reservation: Reservation | None,
    ) -> None:
        elapsed = time.perf_counter() - started
        record.latency_ms = round(elapsed * 1000, 3)
        record.overhead_ms = round(max(0.0, elapsed - info.upstream_seconds - info.client_seconds) * 1000, 3)
        record.client_wait_ms = round(info.client_seconds * 1000, 3)
        record.retries, record.fallback_used = info.retries, info.fallback_used
        for failure in info.failures:
            self._metrics.upstream_error(failure.upstream, failure.code)
        self._metrics.observe(record)
        log_request(record)
        if reservation is not None:
            self._limiter.settle_later(runtime.policy, reservation, UsageFigures.of_request(record))
        elif record.key_id != "-":  # authenticated, then refused
            self._limiter.record_unreserved(
                runtime.policy, record.tenant, record.key_id, UsageFigures.of_request(record), at
            )


_READ = frozenset({"model", "input", "encoding_format", "dimensions"})
_NOT_SHAPING = frozenset({"user", "priority"})
"""Extra fields that do not change a vector, so not part of its cache key."""


def _parse(raw: bytes) -> tuple[_EmbeddingsRequest, list[str] | list[list[int]], dict[str, Any]]:
    """The request, its inputs, and the fields the gateway does not read (sent on upstream)."""
    body = decode_body(raw, dict[str, Any])
    request = check_fields(body, _EmbeddingsRequest)
    extra = {name: value for name, value in body.items() if name not in _READ}
    value: Any = request.input
    inputs: list[str] | list[list[int]]
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(_is_token(item) for item in value):
        inputs = [value]  # one prompt as token ids
    elif isinstance(value, list) and (
        all(isinstance(item, str) for item in value)
        or all(isinstance(item, list) and all(_is_token(t) for t in item) for item in value)
    ):
        inputs = value
    else:
        raise InvalidRequestError(
            "input must be a string, a list of strings, a list of token ids or a list of token-id lists", param="input"
        )
    if not inputs or len(inputs) > _MAX_INPUTS:
        raise InvalidRequestError(f"input must hold 1 to {_MAX_INPUTS} items", param="input")
    if any(not item for item in inputs):
        raise InvalidRequestError("input must not contain an empty string or an empty token list", param="input")
    return request, inputs, extra


def _batch_timeout_s(base_s: float, keys: int) -> float:
    return base_s + keys * _PER_KEY_S


def _is_token(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item >= 0


async def _count(inputs: list[str] | list[list[int]], encoding: str, long_chars: int) -> list[int]:
    if not inputs or isinstance(inputs[0], list):
        return [len(item) for item in inputs]
    texts: list[Any] = inputs
    if sum(len(text) for text in texts) > long_chars:
        return await asyncio.to_thread(lambda: [count_text(text, encoding) for text in texts])
    return [count_text(text, encoding) for text in texts]


def _key(tenant: str, space: tuple[str, str, str, int | None, dict[str, Any]], item: str | list[int]) -> str:
    """Per tenant and per vector space: the model (policy name, server and upstream model), the
    dimensions and the other fields that shape a vector (``truncate_prompt_tokens``, ...)."""
    digest = hashlib.sha256(msgspec.json.encode([_ENTRY_KIND, *space, item], order="sorted")).hexdigest()
    return keyspace.exact(tenant, digest)


_ENTRY_KIND = "embedding.2"
"""Entries hold the input's billed tokens before its vector (entries of the bare vector were
"embedding": a hit counted the input with tiktoken, and said 6 tokens where the upstream had billed 8)."""
_TOKENS = struct.Struct("<I")


def _entry(vector: np.ndarray, tokens: int) -> bytes:
    return _TOKENS.pack(tokens) + vector.tobytes()


def _cached(raw: bytes) -> tuple[np.ndarray, int]:
    return np.frombuffer(raw, dtype="<f4", offset=_TOKENS.size), _TOKENS.unpack_from(raw)[0]


def _shared_out(billed: int | None, counts: list[int]) -> list[int]:
    """Each input's share of the tokens the upstream billed for them together, in proportion to the
    gateway's own count of each (largest remainders get the odd tokens, the first input among
    equals): the shares add up to the bill, so the batch's hits together report what it cost (a
    share of 0 where the bill is smaller than the inputs). A lone input's share is its bill."""
    if billed is None:
        return counts
    weights = counts if sum(counts) > 0 else [1] * len(counts)
    total = sum(weights)
    shares = [billed * weight // total for weight in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(billed * weights[i] % total), i))
    for i in by_remainder[: billed - sum(shares)]:
        shares[i] += 1
    return shares


def _note_refused(record: RequestRecord, provider: Provider, answered: Embeddings) -> None:
    """Why the upstream's count is not billed, as a chat answer's log says it."""
    if answered.usage_refused is not None:
        record.usage_refused = answered.usage_refused
        _log.warning("usage_refused", request_id=record.request_id, model=provider.name, reason=answered.usage_refused)


def _response(request: _EmbeddingsRequest, vectors: list[np.ndarray], model: str, tokens: int) -> bytes:
    """``model``: the policy's model whose space the vectors are in (``x-gateway-model``'s, a
    fallback's too), as OpenAI names the model that answered."""
    encode: Callable[[np.ndarray], Any] = (
        (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode())
        if request.encoding_format == "base64"
        else (lambda v: v.astype(float).tolist())
    )
    data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return msgspec.json.encode({"object": "list", "data": data, "model": model, "usage": usage})


def _error_answer(
    record: RequestRecord, exc: GatewayError, started: float, info: DispatchInfo, dropped: Sequence[str] = ()
) -> Answer:
    record.status = exc.status_code
    record.error_type = exc.code or exc.error_type
    if isinstance(exc, UpstreamError):  # the status it answered with, as the chat log says it (t69)
        record.upstream_status = getattr(exc, "upstream_status", None)
    return Answer(exc.status_code, exc.to_body(), {**_headers(record, started, info, dropped), **exc.headers})


def _headers(record: RequestRecord, started: float, info: DispatchInfo, dropped: Sequence[str] = ()) -> dict[str, str]:
    overhead_ms = (time.perf_counter() - started - info.upstream_seconds - info.client_seconds) * 1000
    headers = {
        "x-request-id": record.request_id,
        "x-gateway-cache": record.cache,
        "x-gateway-cost-usd": f"{record.cost_usd:.8f}",
        "x-gateway-overhead-ms": f"{max(0.0, overhead_ms):.3f}",
        "x-gateway-policy-version": record.policy_version or "",
    }
    if record.model:  # an error before routing names no model (t60: no empty header)
        headers["x-gateway-model"] = record.model
    if record.route:
        headers["x-gateway-route"] = record.route
    if record.decision is not None:  # as a chat answer says it: ``cache`` for a whole hit
        headers["x-gateway-decision"] = record.decision
    if record.model and (said := dropped_header(dropped)):  # none where no model was called (t206)
        headers["x-gateway-dropped"] = said
    return headers
