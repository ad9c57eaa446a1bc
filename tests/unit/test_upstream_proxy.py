"""An upstream the environment sends through a proxy (``HTTP_PROXY``, ``NO_PROXY``) is reached through it."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.protocols.openai_chat import read_chat_request
from tests.unit.fake_upstream import pair_provider

_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "small",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "via the proxy"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}  # fmt: skip


@pytest.mark.parametrize("transport", ["http11", "httpx", "aiohttp"])
async def test_a_proxied_upstream_is_reached_through_the_proxy(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """f73: the provider sent through its own transport, not the client's proxy mounts, so with
    ``HTTP_PROXY`` set every request went straight out (here: to a host that does not resolve)."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        seen.append(head.split(b"\r\n")[0])
        body = json.dumps(_ANSWER).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    provider = pair_provider("small", transport)  # type: ignore[arg-type]
    try:
        request = read_chat_request({"model": "small", "messages": [{"role": "user", "content": "hi"}]})
        completion = await provider.complete(request)
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()
    assert completion.text == "via the proxy"
    assert seen == [b"POST http://small.test/v1/chat/completions HTTP/1.1"]
