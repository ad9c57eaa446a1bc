"""``POST /v1/completions``: OpenAI's legacy Completions API on the chat pipeline.

The text prompt is decoded into the internal model and handed to the pipeline as a
chat request with one user message, so auth, limits, the cache, routing, fallbacks and
the log apply unchanged; the pipeline's answer is encoded back as a ``text_completion``
(or its stream). Errors are OpenAI's already and pass through as they are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from gateway.api.answers import EventStream, StreamBroke, answer_of, delta_batches, dropped_header, streams
from gateway.api.handoff import hand_to_pipeline
from gateway.auth import Principal
from gateway.core import model as core
from gateway.pipeline import Answer, KeepAlive, StreamingDeltas
from gateway.protocols import openai_completions as completions
from gateway.protocols.body import read_off_loop

__all__ = ["create_completion"]

_CLIENT_GONE = Response(content=b"", status_code=499)
_PROTOCOL = "openai.completions"


@post("/v1/completions", request_max_body_size=None, status_code=200)
async def create_completion(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    asked: list[completions.Completion] = []

    async def translate(raw: bytes, principal: Principal) -> core.Request:
        decoded = await read_off_loop(raw, lambda: completions.decode_request(raw, principal.engine_fields))
        asked.append(decoded)
        return decoded.request

    request_id, answer = await hand_to_pipeline(request, protocol=_PROTOCOL, translate=translate)
    if answer is None:
        return _CLIENT_GONE
    headers = dict(answer.headers)
    if asked and (dropped := dropped_header(_dropped(request, asked[0].request, headers))):
        headers["x-gateway-dropped"] = dropped
    if not asked or (isinstance(answer, Answer) and answer.status != 200):
        assert isinstance(answer, Answer)  # nothing decoded: the pipeline answered with an error
        body = _in_completions_terms(answer.body)
        return Response(content=body, status_code=answer.status, headers=headers, media_type="application/json")
    decoded = asked[0]
    model, completion_id = decoded.request.model, f"cmpl-{request_id}"
    if not streams(answer):
        assert isinstance(answer, Answer)
        body = completions.encode_answer(answer_of(answer), completion_id, model, int(time.time()), decoded.echo)
        return Response(content=body, status_code=200, headers=headers, media_type="application/json")
    assert isinstance(answer, StreamingDeltas)  # nothing is passed through here
    encoder = completions.StreamEncoder(completion_id, model, echo=decoded.echo, include_usage=decoded.include_usage)
    return EventStream(
        _frames(answer, encoder),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _frames(answer: StreamingDeltas, encoder: completions.StreamEncoder) -> AsyncIterator[bytes]:
    """The pipeline's answer as completion frames; an error frame (the stream broke after it
    began) is passed on as it is, as OpenAI sends it."""
    start = encoder.start()
    if start:
        yield start
    async with contextlib.aclosing(delta_batches(answer)) as batches:
        async for batch in batches:
            if batch is None:
                yield encoder.finish()
            elif isinstance(batch, KeepAlive):
                yield b": keep-alive\n\n"  # an SSE comment: the SDKs skip it
            elif isinstance(batch, StreamBroke):
                yield b"data: " + msgspec.json.encode(batch.chunk) + b"\n\n"
            else:
                out = encoder.feed(batch)
                if out:
                    yield out


def _in_completions_terms(body: bytes) -> bytes:
    """An upstream that refused the chat request it was sent names ``messages``: the client sent ``prompt``."""
    if b'"param":"messages' not in body:
        return body
    error = msgspec.json.decode(body)
    error["error"]["param"] = "prompt"
    return msgspec.json.encode(error)


def _dropped(request: Request[Any, Any, Any], asked: core.Request, headers: Mapping[str, str]) -> list[str]:
    """What did not reach the model that answered: the codec's, and what that model's upstream is
    not sent (t55: a Claude route's ``top_p`` went unnamed to a completions client); nothing where
    no model was called (a refusal before any upstream, t206)."""
    if not headers.get("x-gateway-model"):
        return []
    provider = request.app.state.gateway.holder.current.providers.get(headers["x-gateway-model"])
    return [*asked.dropped, *(provider.not_carried(asked) if provider is not None else ())]  # the header dedupes
