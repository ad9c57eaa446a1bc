"""Live streams (answered by an upstream, not the cache) still open at the drain deadline, on every
streaming edge and under either server: each ends in-band, in its own protocol, and is logged once,
503, billed what it wrote, whether the gateway waits on a slow client's ``send()`` (a fast upstream
whose long answer the client takes little at a time) or on an upstream stalled mid-answer.

f220 (t198) found the deadline's cancellation landing in a slow client's ``send()`` for cache hits
(tests/e2e/test_streamed_hit_ends.py); these are the same ends for the upstream's streams.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, policy_text, start_gateway
from tests.loopback_app import serve_app

_MODELS = """  hose:
    base_url: {url}/v1
    tier: large
    context_window: 4000000
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 120, idle: 120}}
  stall:
    base_url: {url}/v1
    tier: large
    context_window: 4000000
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 120, idle: 120}}
"""


def _chunk(content: str, role: bool = False) -> bytes:
    delta = {"role": "assistant", "content": content} if role else {"content": content}
    payload = {"id": "chatcmpl-live", "object": "chat.completion.chunk", "created": 1, "model": "live",
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


_PIECES = _chunk("fox ") * 64
"""Tiny deltas: a Responses client's ``response.failed`` carries the whole output so far, which
stays small beside the megabytes of events a loopback socket's buffers take."""


async def _live_answer(request: web.Request) -> web.StreamResponse:
    """``hose``: tiny deltas as fast as the gateway takes them, never ending; ``stall``: a few, then
    nothing (an upstream stalled mid-answer). Each holds until the gateway lets it go."""
    model = (await request.json())["model"]
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    try:
        await response.write(_chunk("", role=True) + _PIECES)
        while model == "hose":
            await response.write(_PIECES)
        await asyncio.Event().wait()
    except ConnectionError:  # the gateway let it go
        pass
    return response


_ASKED = {
    "/v1/chat/completions": {},
    "/v1/completions": {"max_tokens": 2_000_000},
    "/v1/messages": {"max_tokens": 2_000_000},
    "/v1/responses": {"max_output_tokens": 2_000_000, "store": False},
}
"""What each API is asked, besides its question."""

_SAID: dict[str, dict[str, object]] = {"/v1/completions": {"prompt": "go"}, "/v1/responses": {"input": "go"}}
"""The question, where an API does not take chat messages."""

_IN_BAND = {
    "/v1/chat/completions": b'data: {"error":',
    "/v1/completions": b'data: {"error":',
    "/v1/messages": b"event: error\n",
    "/v1/responses": b"event: response.failed\n",
}
"""How each protocol's stream says it failed after it began."""


def _streamed(gateway: GatewayProcess, path: str, model: str, request_id: str) -> socket.socket:
    """The request streamed, on a raw connection with a 4 KB receive window."""
    said = _SAID.get(path, {"messages": [{"role": "user", "content": "go"}]})
    body = msgspec.json.encode({"model": model, "stream": True, **said, **_ASKED[path]})
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-request-id: {request_id}\r\nconnection: close\r\n\r\n")  # fmt: skip
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(60)
    client.connect(("127.0.0.1", gateway.port))
    client.sendall(head.encode() + body)
    return client


class _Reader:
    """Reads a connection to its end on a thread, at :attr:`pace`: ``slow`` takes 2 KB every 10 ms
    (a client slower than the answer), ``paused`` nothing, ``fast`` all there is. Keeps the start
    and the last 256 KB."""

    def __init__(self, client: socket.socket, pace: str) -> None:
        self.pace = pace
        self.head = b""
        self.tail = b""
        self.error: BaseException | None = None
        self._client = client
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with self._client as client:
                while True:
                    while self.pace == "paused":
                        time.sleep(0.01)
                    slow = self.pace == "slow"
                    chunk = client.recv(2048 if slow else 1 << 20)
                    if not chunk:
                        return
                    if len(self.head) < 4096:
                        self.head += chunk[: 4096 - len(self.head)]
                    self.tail = (self.tail + chunk)[-(256 << 10) :]
                    if slow:
                        time.sleep(0.01)
        except BaseException as exc:  # a cut connection: the test says so
            self.error = exc

    def under_way(self) -> bool:
        return b"fox" in self.head


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
@pytest.mark.parametrize("slow", ["client", "upstream"])
def test_live_streams_open_at_the_drain_deadline_end_in_band_and_are_logged_once(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream, server: str, slow: str,
) -> None:  # fmt: skip
    """f221: at the deadline a slow client's stream was cut and logged 499 on every edge, with an
    "Exception in ASGI application": the cancel f220 delivers again from the send landed in the
    next send, as the relay read its next piece, buffered already, without a wait. Once it ends
    in-band, its error waits behind what the client has yet to take: the line came only then, or
    at the server's kill timeout (granian: never), with a cut connection. Here the client pauses
    as the deadline comes, and reads on only once the line is written."""
    with serve_app({"/v1/chat/completions": _live_answer}, name="live-answer-upstream") as served:
        policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=served.url))
        env = {"REDIS_URL": redis_server.url}
        gateway = start_gateway(tmp_path, policy, env=env, server=server, serve_args=("--drain-s", "2"))
        try:
            readers: dict[str, tuple[str, _Reader]] = {}
            for path in _ASKED:
                request_id = f"drained-live-{path[4:].replace('/', '-')}-{time.monotonic_ns()}"
                client = _streamed(gateway, path, "hose" if slow == "client" else "stall", request_id)
                readers[request_id] = (path, _Reader(client, "slow" if slow == "client" else "fast"))
            deadline = time.monotonic() + 30
            while not all(reader.under_way() for _, reader in readers.values()):  # every stream is under way
                assert time.monotonic() < deadline, {rid: r.head[:300] for rid, (_, r) in readers.items()}
                time.sleep(0.05)
            for _, reader in readers.values():  # the gateway waits in send() when the deadline comes
                reader.pace = "paused" if slow == "client" else "fast"
            gateway.process.send_signal(signal.SIGTERM)
            for request_id in readers:  # logged at the deadline, whatever the client's pace (not at its kill)
                gateway.wait_for_record(request_id)
            for _, reader in readers.values():
                reader.pace = "fast"
            assert gateway.process.wait(30) == 0
            for _, reader in readers.values():
                reader.thread.join(30)
        finally:
            gateway.stop()
    for path, reader in readers.values():
        assert reader.error is None and not reader.thread.is_alive(), (path, reader.error)
        assert reader.head.startswith(b"HTTP/1.1 200"), (path, reader.head[:300])
        # the body's last chunk came (not a cut connection), after the protocol's error event
        assert reader.tail.endswith(b"\r\n0\r\n\r\n"), (path, reader.tail[-300:])
        error_at = reader.tail.rfind(_IN_BAND[path])
        assert error_at >= 0 and b"the gateway is shutting down" in reader.tail[error_at:], (path, reader.tail[-600:])
        assert not re.search(rb"fox|\[DONE\]", reader.tail[error_at:].split(b"\n\n", 1)[1]), path  # nothing after it
    records = [r for r in gateway.log_records() if r["request_id"] in readers]
    assert sorted((r["request_id"], r["status"], r["error_type"]) for r in records) == [
        (request_id, 503, "shutting_down") for request_id in sorted(readers)
    ]
    for record in records:  # billed the prompt and what was written
        assert record["stream"] is True and record["completion_tokens"] > 0 and record["cost_usd"] > 0, record
    assert "Exception in ASGI application" not in gateway.stderr_text()
    assert "Traceback" not in gateway.stderr_text()
