"""The speculative loop's token-level calls read a vLLM server's corners as the server meant them."""

from __future__ import annotations

import httpx
import pytest

from gateway.errors import UpstreamStatusError
from gateway.speculative.token_api import TokenAPI
from tests.unit.fake_upstream import pair_provider

_CHUNK = b'{"id":"cmpl-1","object":"text_completion","created":0,"model":"large","choices":[{"index":0,"text":"a",'
_CHUNK += b'"logprobs":{"tokens":["token_id:7"],"token_logprobs":[-0.1],"top_logprobs":null},"finish_reason":null}]}'


def _mid_stream_error(request: httpx.Request) -> httpx.Response:
    error = b'{"error": {"message": "CUDA out of memory while decoding", "type": "InternalServerError"}}'
    body = b"data: " + _CHUNK + b"\n\ndata: " + error + b"\n\ndata: [DONE]\n\n"
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


async def test_an_error_event_mid_stream_is_passed_on_in_the_servers_words() -> None:
    """t76: vLLM's ``{"error": ...}`` event in the plain stream read as "not a completion chunk",
    and what the server said went wrong was lost."""
    provider = pair_provider("large", httpx.MockTransport(_mid_stream_error))
    tokens: list[int] = []
    with pytest.raises(UpstreamStatusError) as failed:
        async for generation in TokenAPI(provider).stream_generate([1, 2, 3], 8, temperature=0.0):
            tokens.extend(generation.tokens)
    await provider.aclose()
    assert tokens == [7] and "CUDA out of memory" in str(failed.value)
