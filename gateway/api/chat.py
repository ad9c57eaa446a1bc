"""``POST /v1/chat/completions``: moves bytes between the client and :class:`ChatPipeline`."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.response import Stream

from gateway.api.handoff import hand_to_pipeline
from gateway.pipeline import Answer

__all__ = ["chat_completions"]

_CLIENT_GONE = Response(content=b"", status_code=499)


@post("/v1/chat/completions", request_max_body_size=None, status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    _, answer = await hand_to_pipeline(request)
    if answer is None:
        return _CLIENT_GONE
    if isinstance(answer, Answer):
        return Response(
            content=answer.body, status_code=answer.status, headers=answer.headers, media_type="application/json"
        )
    return Stream(
        answer.events,
        media_type="text/event-stream",
        headers={**answer.headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )
