"""The gateway's HTTP/1.1 client against a loopback server that answers as scripted,
awkward corners included: chunked and until-close bodies, gzip, a kept-alive connection
the server closed, answers cut short, garbage, silence, and a full pool."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from gateway.config.loader import load_policy_text
from gateway.errors import UpstreamTimeoutError
from gateway.upstreams.http11 import BodyFailed, Http11Response, Http11Transport
from gateway.upstreams.registry import build_provider
from gateway.upstreams.sending import SendMark, watch_sending

Action = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]

_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


class ScriptedServer:
    """Each request read is answered by the next action (the last one repeats)."""

    def __init__(self, *actions: Action) -> None:
        self.actions = list(actions)
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> httpx.URL:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return httpx.URL(f"http://127.0.0.1:{port}/v1/chat/completions?x=1")

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                action = self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]
                await action(reader, writer, request)
                if writer.is_closing():
                    return
        finally:
            self._handlers.discard(task)
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for handler in list(self._handlers):  # a silent action still sleeping
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()


def answer(raw: bytes, *, close: bool = False) -> Action:
    async def act(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        writer.write(raw)
        await writer.drain()
        if close:
            writer.close()

    return act


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.close()


async def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    await asyncio.sleep(30)


Serve = Callable[..., Awaitable[ScriptedServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[ScriptedServer] = []

    async def start(*actions: Action) -> ScriptedServer:
        server = ScriptedServer(*actions)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def transport() -> AsyncIterator[Http11Transport]:
    client = Http11Transport(max_connections=4)
    yield client
    await client.aclose()
    await asyncio.sleep(0)  # let the closed sockets' connection_lost run


async def _post(
    transport: Http11Transport,
    url: httpx.URL,
    *,
    stream: bool = False,
    first_byte_s: float = 5.0,
    connect_s: float = 5.0,
    headers: dict[str, str] | None = None,
) -> Http11Response:
    return await transport.send(
        b"POST",
        url,
        (headers or {"content-type": "application/json"}).items(),
        b'{"model":"m"}',
        connect_timeout_s=connect_s,
        first_byte_timeout_s=first_byte_s,
        stream=stream,
    )


async def _until(done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Until ``done`` says so: what a fixed sleep stood for, which a loaded machine's stalled loop
    could end before the steps it waited for had run."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


async def test_a_kept_alive_connection_serves_the_next_request(serve: Serve, transport: Http11Transport) -> None:
    server = await serve(answer(_OK))
    first = await _post(transport, server.url)
    second = await _post(transport, server.url)
    assert first.status_code == second.status_code == 200
    assert second.content == b'{"ok":true}' and second.headers["content-type"] == "application/json"
    assert server.connections == 1
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in request and b"\r\ncontent-length: 13\r\n" in request
    assert request.endswith(b'\r\n\r\n{"model":"m"}')


async def test_a_chunked_answer_streams_in_pieces_and_reads_whole(serve: Serve, transport: Http11Transport) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = await serve(answer(chunked))
    response = await _post(transport, server.url, stream=True)
    pieces = [piece async for piece in response.aiter_bytes()]
    assert b"".join(pieces) == b"hello world"
    again = await _post(transport, server.url)
    assert again.content == b"hello world" and server.connections == 1


async def test_an_answer_without_length_runs_to_the_end_of_the_connection(
    serve: Serve, transport: Http11Transport
) -> None:
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it", close=True))
    assert (await _post(transport, server.url)).content == b"all of it"
    assert (await _post(transport, server.url)).content == b"all of it"
    assert server.connections == 2  # a connection the server closes is not reused


async def test_a_gzip_answer_is_decoded(serve: Serve, transport: Http11Transport) -> None:
    body = gzip.compress(b'{"text":"' + b"x" * 5000 + b'"}')
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    server = await serve(answer(raw))
    assert (await _post(transport, server.url)).content == b'{"text":"' + b"x" * 5000 + b'"}'


@pytest.mark.parametrize("coding", ["GZIP", "x-gzip", "deflate", "raw deflate"])
async def test_every_spelling_of_gzip_and_deflate_is_decoded(
    serve: Serve, transport: Http11Transport, coding: str
) -> None:
    """Codings are case-insensitive, x-gzip is gzip (RFC 9110), and some servers send deflate raw."""
    text = b'{"text":"' + b"y" * 3000 + b'"}'
    if coding == "raw deflate":
        squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = squeezer.compress(text) + squeezer.flush()
    else:
        body = zlib.compress(text) if coding == "deflate" else gzip.compress(text)
    header = b"deflate" if coding == "raw deflate" else coding.encode()
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: %s\r\ncontent-length: %d\r\n\r\n%s" % (header, len(body), body)
    server = await serve(answer(raw))
    assert (await _post(transport, server.url)).content == text
    assert b"\r\naccept-encoding: identity\r\n" in server.requests[0]  # what a proxy may encode in


async def test_a_coding_the_gateway_cannot_read_is_a_decoding_error(serve: Serve, transport: Http11Transport) -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 4\r\n\r\n\x0b\x01\x80\x03"
    server = await serve(answer(raw))
    with pytest.raises(BodyFailed) as caught:  # the status came: the error says it (t70)
        await _post(transport, server.url)
    assert caught.value.status_code == 200 and isinstance(caught.value.__cause__, httpx.DecodingError)


async def test_a_kept_alive_connection_the_server_dropped_is_retried_once_on_a_new_one(
    serve: Serve, transport: Http11Transport
) -> None:
    server = await serve(answer(_OK), hang_up, answer(_OK))
    await _post(transport, server.url)
    response = await _post(transport, server.url)  # sent on the kept connection, which the server hangs up
    assert response.status_code == 200
    assert server.connections == 2 and len(server.requests) == 3


async def test_a_new_connection_hung_up_without_an_answer_is_an_error_not_a_retry(
    serve: Serve, transport: Http11Transport
) -> None:
    server = await serve(hang_up)
    with pytest.raises(httpx.RemoteProtocolError):
        await _post(transport, server.url)
    assert len(server.requests) == 1


async def test_an_answer_cut_short_is_an_error(serve: Serve, transport: Http11Transport) -> None:
    server = await serve(answer(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial', close=True))
    with pytest.raises(BodyFailed) as caught:  # after a 200, which the log says (t70)
        await _post(transport, server.url)
    assert caught.value.status_code == 200 and isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    streamed = await _post(transport, server.url, stream=True)
    with pytest.raises(httpx.RemoteProtocolError):
        await streamed.aread()


async def test_garbage_is_a_protocol_error(serve: Serve, transport: Http11Transport) -> None:
    server = await serve(answer(b"SMTP ready\r\n\r\n"))
    with pytest.raises(httpx.RemoteProtocolError):
        await _post(transport, server.url)


async def test_silence_ends_at_the_first_byte_timeout_and_the_connection_is_dropped(
    serve: Serve, transport: Http11Transport
) -> None:
    server = await serve(stay_silent, answer(_OK))
    with pytest.raises(httpx.ReadTimeout):
        await _post(transport, server.url, first_byte_s=0.2)
    assert (await _post(transport, server.url)).status_code == 200
    assert server.connections == 2


async def test_a_full_pool_waits_for_a_connection_then_times_out(serve: Serve) -> None:
    server = await serve(stay_silent)
    transport = Http11Transport(max_connections=1)
    try:
        # it holds the connection 1.5 s past the server's having it, well past the other's 0.2 s wait
        hung = asyncio.create_task(_post(transport, server.url, first_byte_s=1.5))
        await _until(lambda: len(server.requests) == 1)
        with pytest.raises(httpx.PoolTimeout):
            await _post(transport, server.url, connect_s=0.2)
        with pytest.raises(httpx.ReadTimeout):
            await hung
    finally:
        await transport.aclose()


async def test_a_waiting_request_gets_the_connection_the_other_gives_back(serve: Serve) -> None:
    slow = answer(_OK)

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        await asyncio.sleep(0.1)
        await slow(reader, writer, request)

    server = await serve(late)
    transport = Http11Transport(max_connections=1)
    try:
        answers = await asyncio.gather(*(_post(transport, server.url) for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5
        assert server.connections == 1
    finally:
        await transport.aclose()


async def test_a_request_says_when_it_is_sent_not_while_it_waits_for_a_connection(serve: Serve) -> None:
    """t43: a client that left while its request waited for a pooled connection was billed for an
    answer the gateway then asked for anyway: what is not sent yet can still be called off."""
    server = await serve(stay_silent)
    transport = Http11Transport(max_connections=1)

    async def post_watched(first_byte_s: float) -> SendMark:
        mark = watch_sending()  # in this task, as the pipeline's request task sets it
        with contextlib.suppress(httpx.TimeoutException):
            await _post(transport, server.url, first_byte_s=first_byte_s)
        return mark

    try:
        holding = asyncio.create_task(post_watched(0.5))
        await asyncio.sleep(0.05)
        waiting_mark: list[SendMark] = []

        async def wait_for_the_pool() -> None:
            waiting_mark.append(watch_sending())
            await _post(transport, server.url, first_byte_s=0.1, connect_s=5.0)

        waiting = asyncio.create_task(wait_for_the_pool())
        await asyncio.sleep(0.05)
        assert waiting_mark[0].sent is False  # queued behind the held connection
        assert (await holding).sent is True
        with pytest.raises(httpx.ReadTimeout):
            await waiting
        assert waiting_mark[0].sent is True
    finally:
        await transport.aclose()


async def test_a_refused_connection_is_a_connect_error(transport: Http11Transport) -> None:
    with pytest.raises(httpx.ConnectError) as caught:
        await _post(transport, httpx.URL("http://127.0.0.1:9/v1/x"))
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


async def test_a_header_that_could_split_the_request_is_refused(serve: Serve, transport: Http11Transport) -> None:
    server = await serve(answer(_OK))
    with pytest.raises(httpx.LocalProtocolError):
        await _post(transport, server.url, headers={"anthropic-beta": "x\r\nhost: evil"})
    assert server.requests == []


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(
    serve: Serve, transport: Http11Transport
) -> None:
    server = await serve(stay_silent, answer(_OK))
    task = asyncio.create_task(_post(transport, server.url))
    await _until(lambda: len(server.requests) == 1)  # cancelled on a live connection, not before it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await _post(transport, server.url)).status_code == 200
    assert server.connections == 2


async def test_a_stream_closed_early_closes_its_connection(serve: Serve, transport: Http11Transport) -> None:
    body = b"data: x\n\n" * 10
    server = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + body), answer(_OK))
    response = await _post(transport, server.url, stream=True)
    async for _ in response.aiter_bytes():
        break
    await response.aclose()
    assert (await _post(transport, server.url)).status_code == 200
    assert server.connections == 2


async def test_an_unread_stream_stops_reading_the_socket_and_loses_nothing(
    serve: Serve, transport: Http11Transport
) -> None:
    size = 8 << 20
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + bytes(range(256)) * (size // 256)
    server = await serve(answer(raw))
    response = await _post(transport, server.url, stream=True)
    connection = response._connection
    assert connection is not None
    await _until(lambda: connection.paused)  # the server writes; the client must stop reading past its buffer
    assert response._unread < size
    body = await response.aread()
    assert len(body) == size and body[:512] == bytes(range(256)) * 2
    assert (await _post(transport, server.url, stream=False)).status_code == 200
    assert server.connections == 1


@pytest.mark.parametrize("size", [1_100_000, 1_200_000, 1_300_000, 2_000_000])
async def test_an_answer_that_completes_while_reading_is_paused_leaves_a_live_connection(
    serve: Serve, transport: Http11Transport, size: int
) -> None:
    """The read that crosses the pause mark may also end the message: the connection goes back
    to the pool then, and must not stay deaf for the next request (which would hang)."""
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size
    server = await serve(answer(raw), answer(_OK))
    response = await _post(transport, server.url, stream=True)
    await asyncio.sleep(0.3)  # a reader busy elsewhere (a slow client downstream)
    assert len(await response.aread()) == size
    await response.aclose()
    follow_up = await _post(transport, server.url)  # a deaf connection hangs to the 5 s first-byte timeout
    assert follow_up.content == b'{"ok":true}'
    assert server.connections == 1


async def test_an_interim_answer_is_skipped(serve: Serve, transport: Http11Transport) -> None:
    server = await serve(answer(b"HTTP/1.1 100 Continue\r\n\r\n" + _OK))
    response = await _post(transport, server.url)
    assert response.status_code == 200 and response.content == b'{"ok":true}'


async def test_httpx_callers_get_an_httpx_response(serve: Serve, transport: Http11Transport) -> None:
    server = await serve(answer(_OK))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(str(server.url), json={"model": "m"})
    assert response.status_code == 200 and response.json() == {"ok": True}


async def test_the_total_deadline_bounds_a_body_that_stops_coming(serve: Serve, transport: Http11Transport) -> None:
    stalled = answer(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial')

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        await stalled(reader, writer, request)
        await asyncio.sleep(30)

    server = await serve(stall, stay_silent)
    for _ in range(2):  # a stalled body, then no answer at all: the total is the shorter bound both times
        with pytest.raises(TimeoutError):
            await transport.send(
                b"POST",
                server.url,
                [],
                b"{}",
                connect_timeout_s=5,
                first_byte_timeout_s=5,
                stream=False,
                total_timeout_s=0.3,
            )


async def test_an_error_answer_whose_body_stops_coming_is_a_timeout_not_a_hang(serve: Serve) -> None:
    stalled = answer(b'HTTP/1.1 500 Internal Server Error\r\ncontent-length: 100\r\n\r\n{"error"')

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        await stalled(reader, writer, request)
        await asyncio.sleep(30)

    server = await serve(stall)
    base = server.url.copy_with(path="/v1", query=None)
    policy = f"""
pair: {{small: m, large: big}}
models:
  m: {{base_url: "{base}", price: {{input: 1, output: 1}}, tier: small, timeouts: {{total: 0.3}}}}
  big: {{base_url: "{base}", price: {{input: 1, output: 1}}, tier: large}}
routes: {{r: {{model: m}}}}
auth: {{mode: none}}
"""
    config = load_policy_text(policy, environ={}).policy.models["m"]
    provider = build_provider("m", config, {})
    try:
        for stream in (True, False):
            with pytest.raises(UpstreamTimeoutError):
                await provider.post("chat/completions", {"model": "m"}, {}, stream=stream)
    finally:
        await provider.aclose()
