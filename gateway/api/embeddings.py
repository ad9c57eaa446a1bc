"""``POST /v1/embeddings``: bytes between the client and :class:`~gateway.embeddings.EmbeddingsPipeline`."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post

from gateway.api.handoff import hand_to_pipeline
from gateway.pipeline import Answer

__all__ = ["create_embeddings"]

_CLIENT_GONE = Response(content=b"", status_code=499)


@post("/v1/embeddings", request_max_body_size=None, status_code=200)
async def create_embeddings(request: Request[Any, Any, Any]) -> Response[bytes]:
    _, answer = await hand_to_pipeline(request, protocol="openai.embeddings", embeddings=True)
    if answer is None:
        return _CLIENT_GONE
    assert isinstance(answer, Answer)  # embeddings are never streamed
    return Response(
        content=answer.body, status_code=answer.status, headers=answer.headers, media_type="application/json"
    )
