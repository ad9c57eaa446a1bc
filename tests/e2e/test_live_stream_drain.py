"""Live streams (answered by an upstream, not the cache) still open at the drain deadline, on every
streaming edge and under either server: each ends in-band, in its own protocol, and is logged once,
503, billed what it wrote, whether the gateway waits on a slow client's ``send()`` (a fast upstream
whose long answer the client takes little at a time) or on an upstream stalled mid-answer.

f220 (t198) found the deadline's cancellation landing in a slow client's ``send()`` for cache hits
(tests/e2e/test_streamed_hit_ends.py); these are the same ends for the upstream's streams. Streamed
hits, and streams cut at a stop string the gateway applies, whose client stops reading, are here too:
each is logged at the deadline, not once its client has taken its last events (f227).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
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
  long:
    base_url: {url}/v1
    tier: large
    context_window: 4000000
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 120}}
  reasoner:
    base_url: {url}/v1
    upstream_model: o4-mini
    tier: large
    context_window: 4000000
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 120, idle: 120, past_stop: 120}}
"""

_CACHED = "{enabled: true, semantic: {enabled: false}, redis_timeout_ms: 2000}"


def _chunk(content: str, role: bool = False) -> bytes:
    delta = {"role": "assistant", "content": content} if role else {"content": content}
    payload = {"id": "chatcmpl-live", "object": "chat.completion.chunk", "created": 1, "model": "live",
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


_PIECES = _chunk("fox ") * 64
"""Tiny deltas: a Responses client's ``response.failed`` carries the whole output so far, which
stays small beside the megabytes of events a loopback socket's buffers take."""


_LONG = "The quick brown fox jumps over the lazy dog again; " * 180_000
"""``long``'s whole answer, 9 MB: more than the sockets' and the servers' buffers hold."""


def _kernel_holds() -> int:
    """What a loopback connection holds, written to and never read, with a 4 KB receive window."""
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        served, _ = listener.accept()
        with served:
            served.setblocking(False)
            held = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    held += served.send(bytes(1 << 16))
            return held


@functools.cache
def _before_the_stop() -> list[str]:
    """``reasoner``'s answer up to its stop string, event by event (each under the 1 MB an SSE line
    may hold): the sockets' fill less 400 KB, then 900 KB. To a client that reads none of it, the
    server writes it all, the last 500 KB or so over the sockets' fill: the server's sends wait from
    then on (uvicorn's at 64 KB), the stream at its stop having been handed all of it."""
    first = max(_kernel_holds() - (400 << 10), 0) // 4
    return ["fox " * (900_000 // 4) for _ in range(first // 225_000)] + ["fox " * (first % 225_000), "fox " * 225_000]


_STOP = "Observation:"


async def _live_answer(request: web.Request) -> web.StreamResponse:
    """``hose``: tiny deltas as fast as the gateway takes them, never ending; ``stall``: a few, then
    nothing (an upstream stalled mid-answer); ``o4-mini`` (``reasoner``, which refuses ``stop`` as
    OpenAI's reasoning models do): its answer past the stop string, then nothing; ``long``: its whole
    answer at once (not streamed). Each stream holds until the gateway lets it go."""
    body = await request.json()
    model = body["model"]
    if model == "long":
        message = {"role": "assistant", "content": _LONG}
        usage = {"prompt_tokens": 12, "completion_tokens": 1_980_000, "total_tokens": 1_980_012}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({"id": "chatcmpl-long", "object": "chat.completion", "created": 1, "model": "long",
                                  "choices": [choice], "usage": usage})  # fmt: skip
    if model == "o4-mini" and body.get("stop") is not None:  # OpenAI's own words for a reasoning model
        error = {"message": "Unsupported parameter: 'stop' is not supported with this model.", "param": "stop",
                 "type": "invalid_request_error", "code": "unsupported_parameter"}  # fmt: skip
        return web.json_response({"error": error}, status=400)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    try:
        if model == "o4-mini":
            await response.write(_chunk("", role=True))
            *texts, last = _before_the_stop()
            for text in texts:
                await response.write(_chunk(text))
            await response.write(_chunk(f"{last}{_STOP} made up"))
            await asyncio.Event().wait()
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

_QUESTION_AS = {"/v1/completions": "prompt", "/v1/responses": "input"}
"""Where the question goes, in an API that does not take chat messages."""

_IN_BAND = {
    "/v1/chat/completions": b'data: {"error":',
    "/v1/completions": b'data: {"error":',
    "/v1/messages": b"event: error\n",
    "/v1/responses": b"event: response.failed\n",
}
"""How each protocol's stream says it failed after it began."""


def _asked(path: str, model: str, question: str = "go") -> dict[str, object]:
    """The request in ``path``'s API, not streamed."""
    field = _QUESTION_AS.get(path)
    said = {field: question} if field else {"messages": [{"role": "user", "content": question}]}
    return {"model": model, **said, **_ASKED[path]}


def _streamed(gateway: GatewayProcess, path: str, asked: dict[str, object], request_id: str) -> socket.socket:
    """The request streamed, on a raw connection with a 4 KB receive window."""
    body = msgspec.json.encode({**asked, "stream": True})
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
    (a client slower than the answer), ``paused`` nothing, ``fast`` all there is, ``head`` 2 KB at
    a time until the answer is under way, then nothing (a client that stopped reading). Keeps the
    start and the last ``keep`` bytes."""

    def __init__(self, client: socket.socket, pace: str, keep: int = 256 << 10) -> None:
        self.pace = pace
        self.head = b""
        self.tail = bytearray()
        self._keep = keep
        self.error: BaseException | None = None
        self._client = client
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with self._client as client:
                while True:
                    while self.pace == "paused" or (self.pace == "head" and self.under_way()):
                        time.sleep(0.01)
                    slow = self.pace in ("slow", "head")
                    chunk = client.recv(2048 if slow else 1 << 20)
                    if not chunk:
                        return
                    if len(self.head) < 4096:
                        self.head += chunk[: 4096 - len(self.head)]
                    self.tail += chunk
                    if len(self.tail) > 2 * self._keep:
                        del self.tail[: -self._keep]
                    if self.pace == "slow":
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
                client = _streamed(gateway, path, _asked(path, "hose" if slow == "client" else "stall"), request_id)
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


_KILLED = ("timeout graceful shutdown exceeded", "refused to gracefully stop")
"""What uvicorn and granian say when a worker's requests outlast their kill timeout."""


def _stopped_at_the_deadline(
    gateway: GatewayProcess, asked: dict[str, tuple[str, dict[str, object]]], keep: int = 256 << 10
) -> dict[str, tuple[str, _Reader]]:
    """Each request streamed to a client that stops reading once its answer is under way, with far
    more of it than the buffers hold yet to take; SIGTERM; each request's line is awaited while its
    client reads nothing (the drain deadline, 2 s on, ends its stream), then its client reads on."""
    readers: dict[str, tuple[str, _Reader]] = {}
    for request_id, (path, ask) in asked.items():  # one by one: the first teaches the gateway that ``stop`` is refused
        reader = _Reader(_streamed(gateway, path, ask, request_id), "head", keep)
        readers[request_id] = (path, reader)
        deadline = time.monotonic() + 30
        while not reader.under_way():
            assert time.monotonic() < deadline, (path, reader.head)
            time.sleep(0.05)
    gateway.process.send_signal(signal.SIGTERM)
    for request_id in readers:  # logged at the deadline, not once its client has taken all
        gateway.wait_for_record(request_id)
    for _, reader in readers.values():
        reader.pace = "fast"
    assert gateway.process.wait(30) == 0
    for _, reader in readers.values():
        reader.thread.join(30)
    return readers


def _ended_whole(path: str, reader: _Reader) -> None:
    assert reader.error is None and not reader.thread.is_alive(), (path, reader.error)
    assert reader.head.startswith(b"HTTP/1.1 200"), (path, reader.head[:300])
    assert reader.tail.endswith(b"\r\n0\r\n\r\n"), (path, reader.tail[-300:])  # the body's last chunk, not a cut


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_streamed_hits_whose_clients_stopped_reading_are_logged_at_the_drain_deadline(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream, server: str,
) -> None:  # fmt: skip
    """f227: a hit's replay the deadline ended in-band was logged only once its error event went out:
    behind all its client had yet to take. A client that stopped reading held the line until the
    server's kill timeout: under uvicorn, which then cut the connection, late; under granian, which
    killed the worker, never."""
    with serve_app({"/v1/chat/completions": _live_answer}, name="live-answer-upstream") as served:
        policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=served.url), cache=_CACHED)
        gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, server=server,
                                serve_args=("--drain-s", "2"))  # fmt: skip
        try:
            asked: dict[str, tuple[str, dict[str, object]]] = {}
            for path in _ASKED:
                ask = {**_asked(path, "long", f"All of it. {time.monotonic_ns()}"), "temperature": 0}
                filled = httpx.post(f"{gateway.url}{path}", json=ask, timeout=30)
                assert filled.status_code == 200 and filled.headers["x-gateway-cache"] == "miss", filled.text[:300]
                asked[f"drained-hit-{path[4:].replace('/', '-')}-{time.monotonic_ns()}"] = (path, ask)
            # (the whole of each: a Responses client's response.failed carries the 9 MB output so far)
            readers = _stopped_at_the_deadline(gateway, asked, keep=32 << 20)
        finally:
            gateway.stop()
    for path, reader in readers.values():
        _ended_whole(path, reader)
        assert b"x-gateway-cache: exact" in reader.head, (path, reader.head[:600])
        error_at = reader.tail.rfind(_IN_BAND[path])
        assert error_at >= 0 and b"the gateway is shutting down" in reader.tail[error_at:], (path, reader.tail[-600:])
    records = [r for r in gateway.log_records() if r["request_id"] in readers]
    assert sorted((r["request_id"], r["status"], r["error_type"], r["cache"]) for r in records) == [
        (request_id, 503, "shutting_down", "exact") for request_id in sorted(readers)
    ]
    said = gateway.stderr_text()
    assert not [words for words in _KILLED if words in said], said[-2000:]
    assert "Traceback" not in said and "Exception in ASGI application" not in said, said[-2000:]


_STOPPED_AT: dict[str, tuple[dict[str, object], bytes]] = {
    "/v1/chat/completions": ({"stop": [_STOP], "stream_options": {"include_usage": True}}, b"data: [DONE]\n\n"),
    "/v1/completions": ({"stop": [_STOP]}, b"data: [DONE]\n\n"),
    "/v1/messages": ({"stop_sequences": [_STOP]}, b"event: message_stop\n"),
}
"""How each API asks for a stop string (Responses has none), and how its stream ends."""


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_streams_cut_at_a_stop_whose_clients_stopped_reading_are_logged_at_the_drain_deadline(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream, server: str,
) -> None:  # fmt: skip
    """f227: a stream cut at a stop string the gateway applies, waiting for its upstream's usage when
    the deadline came, was settled on the cut text (t68) and logged only once its usage and its end
    went out, behind all its client had yet to take: under uvicorn, whose send waits once the
    connection holds 64 KB unsent, a client that stopped reading held the line until the kill
    timeout, which then cut the connection. (Granian's send took the end as it stood.)"""
    with serve_app({"/v1/chat/completions": _live_answer}, name="live-answer-upstream") as served:
        policy = policy_text(small_upstream, large_upstream, extra_models=_MODELS.format(url=served.url))
        gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, server=server,
                                serve_args=("--drain-s", "2"))  # fmt: skip
        try:
            asked = {}
            for path, (stop, _) in _STOPPED_AT.items():
                asked[f"drained-cut-{path[4:].replace('/', '-')}-{time.monotonic_ns()}"] = (
                    path,
                    {**_asked(path, "reasoner"), **stop},
                )
            readers = _stopped_at_the_deadline(gateway, asked)
        finally:
            gateway.stop()
    for path, reader in readers.values():
        _ended_whole(path, reader)
        ends = _STOPPED_AT[path][1]
        assert ends in reader.tail[-300:] and b"made up" not in reader.tail, (path, reader.tail[-600:])
    records = [r for r in gateway.log_records() if r["request_id"] in readers]
    assert sorted((r["request_id"], r["status"], r["error_type"], r["finish_reason"]) for r in records) == [
        (request_id, 200, None, "stop") for request_id in sorted(readers)
    ]
    for record in records:  # billed the cut text, the usage unread
        assert record["tokens_source"] == "gateway" and record["completion_tokens"] > 0, record
    said = gateway.stderr_text()
    assert not [words for words in _KILLED if words in said], said[-2000:]
    assert "Traceback" not in said and "Exception in ASGI application" not in said, said[-2000:]
