"""The request path for ``/v1/chat/completions``: auth → policy → tokens → upstream → accounting.

The HTTP layer (``gateway.api``) only moves bytes; everything a request goes through
is here, in the order it happens, and every outcome ends in one log line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import structlog

from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import REQUEST_LOGGER, RequestRecord, request_event
from gateway.dispatch import DispatchInfo, dispatch
from gateway.errors import GatewayError, UpstreamError
from gateway.pricing import cost_usd
from gateway.protocol import ChatRequest, parse_chat_request
from gateway.routing import RoutePlan
from gateway.runtime import Runtime, RuntimeHolder
from gateway.tokens import count_chat_prompt, count_text, prompt_chars
from gateway.upstreams.base import ChatStream, Provider, Usage

__all__ = ["Answer", "ChatPipeline", "StreamingAnswer"]

_request_log = structlog.get_logger(REQUEST_LOGGER)

BodyReader = Callable[[int], Awaitable[bytes]]
"""Reads the request body, raising PayloadTooLargeError past the given byte limit."""


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class StreamingAnswer:
    headers: dict[str, str]
    events: AsyncIterator[bytes]
    """SSE bytes, ``data: [DONE]`` included; the request is logged when it ends."""


class ChatPipeline:
    def __init__(self, holder: RuntimeHolder, metrics: Metrics) -> None:
        self._holder = holder
        self._metrics = metrics

    async def handle(
        self, read_body: BodyReader, authorization: str | None, request_id: str, started: float
    ) -> Answer | StreamingAnswer:
        runtime = self._holder.current  # one policy version for the whole request
        record = RequestRecord(request_id=request_id, key_id="-", tenant="-", policy_version=runtime.version)
        info = DispatchInfo()
        try:
            principal = runtime.auth.authenticate(authorization)
            record.key_id, record.tenant = principal.key_id, principal.tenant
            body, request = parse_chat_request(await read_body(runtime.policy.limits.max_body_bytes))
            plan = runtime.router.plan(request.model)
            principal.check_model(plan.route)
            record.route, record.decision, record.stream = plan.route, plan.decision, request.stream
            record.baseline_model = plan.baseline
            prompt_tokens = await self._count_prompt(runtime, plan, body)
            if request.stream:
                return await self._start_stream(runtime, plan, body, request, prompt_tokens, record, info, started)
            completion = await dispatch(
                plan.candidates, runtime.providers, self._holder.breakers, runtime.policy.retry, body,
                _complete, info,
            )  # fmt: skip
            provider = info.provider
            assert provider is not None
            self._settle(runtime, record, provider, completion.usage, prompt_tokens, completion.text)
            record.upstream_status = 200
            return Answer(200, completion.body, self._headers(record, started, info))
        except GatewayError as exc:
            return self._error_answer(record, exc, started, info)
        except asyncio.CancelledError:
            record.status, record.error_type = 499, "client_disconnected"
            raise
        finally:
            if not record.stream or record.status != 200:
                self._finish(record, started, info.upstream_seconds, info)

    async def _count_prompt(self, runtime: Runtime, plan: RoutePlan, body: dict[str, Any]) -> int:
        encoding = runtime.policy.models[plan.candidates[0]].encoding
        messages, tools = body["messages"], body.get("tools")
        if prompt_chars(messages) > runtime.policy.limits.long_prompt_chars:
            return await asyncio.to_thread(count_chat_prompt, messages, encoding, tools)
        return count_chat_prompt(messages, encoding, tools)

    async def _start_stream(
        self,
        runtime: Runtime,
        plan: RoutePlan,
        body: dict[str, Any],
        request: ChatRequest,
        prompt_tokens: int,
        record: RequestRecord,
        info: DispatchInfo,
        started: float,
    ) -> StreamingAnswer:
        stream, first = await dispatch(
            plan.candidates, runtime.providers, self._holder.breakers, runtime.policy.retry, body,
            _open_stream, info,
        )  # fmt: skip
        record.ttft_ms = (time.perf_counter() - started) * 1000
        record.upstream_status = 200
        provider = info.provider
        assert provider is not None
        record.model, record.provider = provider.name, provider.kind
        headers = self._headers(record, started, info, cost=cost_usd(provider.config.price, prompt_tokens, 0))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = self._relay(runtime, stream, first, include_usage, prompt_tokens, record, info, started)
        return StreamingAnswer(headers, events)

    async def _relay(
        self,
        runtime: Runtime,
        stream: ChatStream,
        first: bytes | None,
        include_usage: bool,
        prompt_tokens: int,
        record: RequestRecord,
        info: DispatchInfo,
        started: float,
    ) -> AsyncIterator[bytes]:
        provider = info.provider
        assert provider is not None
        upstream_wait = info.upstream_seconds
        try:
            if first is not None:
                yield b"data: " + first + b"\n\n"
                while True:
                    waited_from = time.perf_counter()
                    try:
                        payload = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        upstream_wait += time.perf_counter() - waited_from
                    yield b"data: " + payload + b"\n\n"
            tally = stream.tally
            self._settle(runtime, record, provider, tally.usage, prompt_tokens, tally.text)
            record.finish_reason = tally.finish_reason
            if include_usage:
                yield b"data: " + _usage_chunk(tally.id, tally.created, tally.model, record) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except UpstreamError as exc:
            # Headers are gone: tell the client in-band, as OpenAI does; never retry mid-stream.
            self._metrics.upstream_error(exc.upstream, exc.code)
            record.error_type = exc.code
            self._settle(runtime, record, provider, None, prompt_tokens, stream.tally.text)
            yield b"data: " + exc.to_body() + b"\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            record.error_type = "client_disconnected"
            record.status = 499
            self._settle(runtime, record, provider, stream.tally.usage, prompt_tokens, stream.tally.text)
            raise
        finally:
            with anyio.CancelScope(shield=True):  # the client may be gone: still close upstream and log
                await stream.aclose()
            self._finish(record, started, upstream_wait, info)

    def _settle(
        self, runtime: Runtime, record: RequestRecord, provider: Provider, usage: Usage | None, prompt_tokens: int, text: str
    ) -> None:
        """Tokens (the upstream's usage when it sent one) and costs, actual and baseline."""
        record.model, record.provider = provider.name, provider.kind
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            record.tokens_source = "upstream"
        else:
            record.prompt_tokens = prompt_tokens
            record.completion_tokens = count_text(text, provider.config.encoding)
            record.tokens_source = "gateway"
        record.cost_usd = cost_usd(provider.config.price, record.prompt_tokens, record.completion_tokens)
        baseline = runtime.policy.models.get(record.baseline_model or "")
        if baseline is not None:
            record.baseline_cost_usd = cost_usd(baseline.price, record.prompt_tokens, record.completion_tokens)

    def _headers(
        self, record: RequestRecord, started: float, info: DispatchInfo, cost: float | None = None
    ) -> dict[str, str]:
        overhead_ms = (time.perf_counter() - started - info.upstream_seconds) * 1000
        return {
            "x-request-id": record.request_id,
            "x-gateway-model": record.model or "",
            "x-gateway-route": record.route or "",
            "x-gateway-cache": record.cache,
            "x-gateway-cost-usd": f"{record.cost_usd if cost is None else cost:.8f}",
            "x-gateway-overhead-ms": f"{overhead_ms:.3f}",
            "x-gateway-policy-version": record.policy_version or "",
        }

    def _error_answer(self, record: RequestRecord, exc: GatewayError, started: float, info: DispatchInfo) -> Answer:
        record.status = exc.status_code
        record.error_type = exc.code or exc.error_type
        if isinstance(exc, UpstreamError):
            record.upstream_status = getattr(exc, "upstream_status", None)
        headers = self._headers(record, started, info)
        headers.update(exc.headers)
        return Answer(exc.status_code, exc.to_body(), headers)

    def _finish(self, record: RequestRecord, started: float, upstream_seconds: float, info: DispatchInfo) -> None:
        elapsed = time.perf_counter() - started
        record.latency_ms = round(elapsed * 1000, 3)
        record.overhead_ms = round(max(0.0, elapsed - upstream_seconds) * 1000, 3)
        record.retries = info.retries
        record.fallback_used = info.fallback_used
        if record.ttft_ms is not None:
            record.ttft_ms = round(record.ttft_ms, 3)
        for failure in info.failures:
            self._metrics.upstream_error(failure.upstream, failure.code)
        self._metrics.observe(record)
        _request_log.info("request", **request_event(record))


async def _complete(provider: Provider, body: dict[str, Any]):  # noqa: ANN202
    return await provider.complete(body)


async def _open_stream(provider: Provider, body: dict[str, Any]) -> tuple[ChatStream, bytes | None]:
    """Open the stream and wait for its first chunk, so failures before it can still be retried."""
    stream = await provider.open_stream(body)
    try:
        return stream, await stream.__anext__()
    except StopAsyncIteration:
        return stream, None
    except BaseException:
        await stream.aclose()
        raise


def _usage_chunk(chunk_id: str | None, created: int | None, model: str | None, record: RequestRecord) -> bytes:
    return msgspec.json.encode(
        {
            "id": chunk_id or f"chatcmpl-{record.request_id}",
            "object": "chat.completion.chunk",
            "created": created or int(time.time()),
            "model": model or record.model,
            "choices": [],
            "usage": {
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "total_tokens": record.prompt_tokens + record.completion_tokens,
            },
        }
    )
