"""A client that hangs up: a stream is cut upstream, a whole answer is waited for and billed; both are logged as 499."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anthropic
import httpx
import pytest
from aiohttp import web

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from gateway.store.redis import kv as redis_kv
from tests.conftest import PairGateway, inject, leave_once_upstream_has_it, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway
from tests.loopback_app import RecordingUpstream, serve_recording, write_sse

T = TypeVar("T")


def _poll(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float, step_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(step_s)
        value = probe()
    return value


def _record_with_id(gateway: GatewayProcess, request_id: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """The log line of a request we only know by the x-request-id we sent, among all of them (a
    generous deadline: the poll ends when the line is there, and a busy machine writes it late)."""
    found = _poll(lambda: [r for r in gateway.log_records() if r["request_id"] == request_id], bool, timeout_s)
    assert len(found) <= 1, found
    return found[0] if found else None


def _read_then_leave(url: str, body: dict[str, object], marker: str, lines: int = 2) -> tuple[str, list[str]]:
    """Start a stream, read its first ``lines`` lines that start with ``marker``, and hang up:
    the request's id and those lines."""
    read: list[str] = []
    with httpx.Client(timeout=5) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith(marker):
                read.append(line)
            if len(read) == lines:
                break
    return request_id, read


def _body(content: str, **extra: object) -> dict[str, object]:
    return {"model": "fast", "messages": [{"role": "user", "content": content}], **extra}


def _leave_after(gateway: GatewayProcess, body: dict[str, object], wait_s: float = 0.3) -> str:
    request_id = f"disconnect-{uuid.uuid4().hex}"
    with httpx.Client(timeout=wait_s) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/chat/completions", json=body, headers={"x-request-id": request_id})
    return request_id


def test_a_client_that_leaves_a_whole_answer_is_billed_the_answer_the_upstream_writes(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """An upstream bills the whole answer it was asked for (OpenAI's and Anthropic's go on after a
    hang-up): hanging up just before it came cost the prompt alone, and never tripped a budget (t39)."""
    # its headers at once (the model's 1 s first-byte timeout is not in play), the rest 1.5 s on;
    # the client hangs up once the upstream has the request
    inject(small_upstream, {"stall_mid_body_ms": 1500})
    request_id = f"disconnect-{uuid.uuid4().hex}"
    leave_once_upstream_has_it(f"{gateway.base_url}/chat/completions", _body("please wait for me"), small_upstream,
                               request_id)  # fmt: skip
    record = _record_with_id(gateway, request_id)
    assert record is not None, "no log line for the abandoned request"
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert record["route"] == "fast" and record["stream"] is False and record["model"] == "small"
    assert record["latency_ms"] >= 1500  # logged when the answer came, with its bill
    assert record["tokens_source"] == "upstream" and record["completion_tokens"] > 0
    assert record["cost_usd"] > 0
    stats = upstream_stats(small_upstream)
    assert (stats["cancelled"], stats["chat_requests"]) == (0, 1)


def test_no_retry_or_fallback_is_made_for_a_client_that_left(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"delay_ms": 3000})  # past the 1 s first-byte timeout: a retryable failure
    request_id = f"disconnect-{uuid.uuid4().hex}"
    leave_once_upstream_has_it(f"{gateway.base_url}/chat/completions", _body("please wait for me"), small_upstream,
                               request_id)  # fmt: skip
    record = _record_with_id(gateway, request_id)
    assert record is not None and (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert record["latency_ms"] < 2500  # the one attempt's timeout, no more
    assert record["cost_usd"] == 0  # the upstream answered nothing: an error costs nothing
    time.sleep(0.3)
    assert upstream_stats(small_upstream)["chat_requests"] == 1
    assert upstream_stats(large_upstream)["chat_requests"] == 0


def test_a_client_that_leaves_in_a_retrys_backoff_is_the_failure_of_the_model_tried(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t72: small answered 500 and the client left while the gateway waited to retry: logged with
    model null (counted under model="-"), as if no model had been tried."""
    routes = "  patient: {model: small, fallbacks: [large], retry: {max_attempts: 2, backoff_initial_ms: 4000, backoff_max_ms: 4000}}\n"
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream, routes=routes),
                            env={"REDIS_URL": redis_server.url})  # fmt: skip
    try:
        for stream in (False, True):
            # answered at once; the retry waits 2-4 s, within small's 5 s total (with the default
            # backoff_max_ms of 2 s it waited 1-2 s, and leaving at 1 s once met the retry at work)
            inject(small_upstream, {"status": 500})
            request_id = _leave_after(gateway, {**_body(f"retry me later {stream}"), "model": "patient",
                                                "stream": stream}, wait_s=1.0)  # fmt: skip
            record = _record_with_id(gateway, request_id)
            assert record is not None and (record["status"], record["error_type"]) == (499, "client_disconnected")
            assert (record["model"], record["provider"], record["upstream_status"]) == ("small", "openai", 500)
            assert record["cost_usd"] == 0 and record["fallback_used"] is False
        calls = upstream_stats(small_upstream)["chat_requests"], upstream_stats(large_upstream)["chat_requests"]
        assert calls == (2, 0)  # no retry and no fallback for a client that is gone
        left = [
            line
            for line in httpx.get(f"{gateway.url}/metrics", timeout=5).text.splitlines()
            if line.startswith("gateway_requests_total{") and 'route="patient"' in line
        ]
        assert left and all('model="small"' in line for line in left), left
    finally:
        gateway.stop()


def test_streamed_disconnect_cancels_the_upstream_stream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    inject(small_upstream, {"chunk_delay_ms": 200})
    words = " ".join(f"word{i}" for i in range(12))
    request_id, events = _read_then_leave(f"{gateway.base_url}/chat/completions", _body(words, stream=True), "data: ")
    assert len(events) == 2 and "[DONE]" not in events[-1]

    stats = _poll(lambda: upstream_stats(small_upstream), lambda s: s["cancelled"] >= 1, timeout_s=30)
    assert stats["cancelled"] >= 1, f"the upstream stream was not cancelled: {stats}"
    assert stats["in_flight"] == 0

    record = gateway.wait_for_record(request_id)
    assert record["error_type"] == "client_disconnected"
    assert record["status"] == 499
    assert record["stream"] is True
    assert record["model"] == "small"
    # 12 words at 200 ms a token would take over 2 s: the stream was cut well before.
    assert record["latency_ms"] < 2000
    assert upstream_stats(large_upstream)["chat_requests"] == 0


def test_gateway_serves_normally_after_disconnects(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    # Leave twice more (one of each kind), then ask normally.
    inject(small_upstream, {"delay_ms": 2000}, {"chunk_delay_ms": 300})
    with httpx.Client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/chat/completions", json=_body("again"))
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", f"{gateway.base_url}/chat/completions", json=_body("a b c d e", stream=True)) as r:
            next(r.iter_lines())
    _poll(lambda: upstream_stats(small_upstream), lambda s: s["cancelled"] >= 2 and s["in_flight"] == 0, timeout_s=30)

    with httpx.Client(timeout=10) as client:
        answer = client.post(f"{gateway.base_url}/chat/completions", json=_body("one two three"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "[simulated small] three two one"
        assert answer.headers["x-gateway-model"] == "small"
        assert gateway.wait_for_record(answer.headers["x-request-id"])["status"] == 200

        with client.stream("POST", f"{gateway.base_url}/chat/completions", json=_body("x y", stream=True)) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        record = gateway.wait_for_record(response.headers["x-request-id"])
        assert (record["status"], record["error_type"]) == (200, None)

    assert httpx.get(f"{gateway.url}/readyz", timeout=5).json()["upstreams"]["small"] == "closed"


def test_a_messages_client_leaving_mid_stream_cancels_the_upstream_stream(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """The same for a stream that leaves the pipeline as deltas (an Anthropic client's)."""
    inject(small_upstream, {"chunk_delay_ms": 200})
    words = " ".join(f"word{i}" for i in range(12))
    body = {"model": "fast", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": words}]}
    request_id, frames = _read_then_leave(f"{gateway.url}/v1/messages", body, "event: content_block_delta")
    assert len(frames) == 2
    stats = _poll(lambda: upstream_stats(small_upstream), lambda s: s["cancelled"] >= 1, timeout_s=30)
    assert stats["cancelled"] >= 1, f"the upstream stream was not cancelled: {stats}"
    record = gateway.wait_for_record(request_id)
    assert record["status"] == 499 and record["error_type"] == "client_disconnected"
    assert record["protocol"] == "anthropic.messages" and record["latency_ms"] < 2000


def test_an_embeddings_client_leaving_is_logged_as_499(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """It was logged and counted as a 200 (an outside tester)."""
    inject(small_upstream, {"delay_ms": 3000})
    request_id = f"disconnect-{uuid.uuid4().hex}"
    with httpx.Client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/embeddings", json={"model": "embed", "input": ["please wait"]},
                    headers={"x-request-id": request_id})  # fmt: skip
    record = _record_with_id(gateway, request_id)
    assert record is not None and (record["status"], record["error_type"]) == (499, "client_disconnected")


@pytest.mark.parametrize("stream", [False, True])
def test_a_pipelined_request_whose_client_leaves_is_logged_as_499(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, stream: bool
) -> None:
    """Two requests in one write, and the client gone before the first answer: the first was logged
    and counted as a 200 (uvicorn told the second request of the disconnect, the one queued behind
    the first; an outside tester)."""
    # streamed: its first chunk at once, the next ones 1 s apart (700 ms before the first byte was 300 ms
    # from the 1 s first-byte timeout, whose retry a gateway that heard the hang-up late sent upstream);
    # whole: its headers at once, the rest 1.5 s on, so that its answer and bill come
    inject(small_upstream, {"chunk_delay_ms": 1000} if stream else {"stall_mid_body_ms": 1500})
    request_id = f"pipelined-{uuid.uuid4().hex}"
    requests = _raw_chat(_body("pipelined request 0", stream=stream), request_id)
    requests += _raw_chat(_body("pipelined request 1", stream=stream))
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:  # a raw client, to pipeline
        client.sendall(requests)
        stats = _poll(lambda: upstream_stats(small_upstream), lambda s: s["chat_requests"] >= 1, timeout_s=30.0)
        assert stats["chat_requests"] == 1, stats
    record = gateway.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    if not stream:  # a whole answer is waited for, and billed
        assert record["tokens_source"] == "upstream" and record["cost_usd"] > 0
    assert upstream_stats(small_upstream)["chat_requests"] == 1  # the second was never dispatched


_GARBAGE = b"NOT HTTP\r\n\r\n"
_HEAD_TOO_LARGE = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * 1_000_000  # past the 64 KiB bound


@pytest.mark.parametrize(
    ("behind", "stream"),
    [(_GARBAGE, False), (_GARBAGE, True), (_HEAD_TOO_LARGE, False)],
    ids=["garbage", "garbage-stream", "head-too-large"],
)
def test_a_request_refused_behind_one_unanswered_closes_the_connection_unanswered(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream, behind: bytes, stream: bool
) -> None:
    """A valid request, then garbage on the same connection: uvicorn answered the garbage 400 at
    once (a head too large was answered 431), which the client read as the answer to its first
    request, while that one went upstream and was logged 200 (an outside tester). The connection
    is closed unanswered now, and the first request hears its client gone."""
    inject(small_upstream, {"delay_ms": 700})  # within the model's 1 s first-byte timeout
    request_id = f"refused-behind-{uuid.uuid4().hex}"
    received = b""
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:  # a raw client, to pipeline
        client.settimeout(10)
        try:
            client.sendall(_raw_chat(_body("answer me first", stream=stream), request_id) + behind)
            while data := client.recv(65536):
                received += data
        except ConnectionError:
            pass  # closed with what we sent still unread
    assert received == b""  # no answer the client would take for its first request's
    record = gateway.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    if behind == _GARBAGE:  # in the read that brought the first request: it was never sent on
        assert upstream_stats(small_upstream)["chat_requests"] == 0


def test_a_malformed_request_with_none_unanswered_before_it_is_still_answered_400(gateway: GatewayProcess) -> None:
    """On a new connection, and on one whose earlier request was answered, the 400 answers no one else's."""
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.settimeout(10)
        client.sendall(_raw_chat(_body("answered first")))
        answer = http.client.HTTPResponse(client)  # read whole, the connection kept alive
        answer.begin()
        answer.read()
        assert answer.status == 200
        client.sendall(_GARBAGE)
        assert client.recv(65536).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.settimeout(10)
        client.sendall(_GARBAGE)
        assert client.recv(65536).startswith(b"HTTP/1.1 400 ")


def _raw_chat(body: dict[str, object], request_id: str | None = None) -> bytes:
    """A chat request as a raw client writes it (to pipeline, or to follow it with garbage)."""
    content = json.dumps(body).encode()
    request_id_header = f"x-request-id: {request_id}\r\n" if request_id else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(content)}\r\n{request_id_header}\r\n")  # fmt: skip
    return head.encode() + content


class _HeldRedis:
    """A TCP proxy in front of Redis that holds the first command carrying ``marker`` (and what
    follows it on its connection) until :meth:`let_go`: a round trip as slow as the test needs."""

    def __init__(self, redis: EmbeddedRedis, marker: bytes) -> None:
        self._redis = redis
        self._marker = marker
        self.holding = threading.Event()
        self._go = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        secret = quote(redis.password, safe="")
        self.url = f"redis://:{secret}@127.0.0.1:{self._server.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def let_go(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._go.set()
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._redis.port is not None:
                redis = socket.create_connection(("127.0.0.1", self._redis.port))
            else:
                redis = socket.socket(socket.AF_UNIX)
                redis.connect(str(self._redis.socket_path))
            threading.Thread(target=self._pipe, args=(client, redis, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(redis, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, outgoing: bool) -> None:
        try:
            while data := source.recv(65536):
                if outgoing and self._marker in data and not self.holding.is_set():
                    self.holding.set()
                    self._go.wait(30)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()


@contextmanager
def _loopback_server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server that hands each connection to ``answer`` in a thread of its own and
    closes them all at the end (the port)."""
    server = socket.create_server(("127.0.0.1", 0))
    answered: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            answered.append(connection)
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()
        for connection in answered:
            connection.close()


@contextmanager
def _stalling_upstream() -> Iterator[str]:
    """An upstream that answers 200, its headers and half its JSON body, then says nothing more
    (the base URL)."""

    def answer(connection: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (data := connection.recv(65536)):
            head += data
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
                           b'{"id": "chatcmpl-stalled", "object": "chat.comp')  # fmt: skip

    with _loopback_server(answer) as port:
        yield f"http://127.0.0.1:{port}/v1"


def test_a_client_leaving_while_a_failed_requests_lease_is_released_gives_its_place_back(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t95: the upstream sent half a body and went silent; the gateway gave up and released the
    request's coalescing lease in Redis, and the client hung up during that round trip. The
    cancellation cut the release short (through its anyio shield), and what came after it never
    ran: no log line, and the tenant's place in flight held for good (429s under ``max_concurrent: 1``
    until a restart). Here the round trip is held open while the client leaves."""
    release_sha = hashlib.sha1(redis_kv._RELEASE.encode()).hexdigest().encode()
    held = _HeldRedis(redis_server, release_sha)
    with _stalling_upstream() as stalled_url:
        models = (f"  stalled:\n    base_url: {stalled_url}\n    price: {{input: 1, output: 1}}\n    tier: small\n"
                  "    timeouts: {connect: 1, first_byte: 1, total: 1}\n")  # fmt: skip
        policy = policy_text(
            small_upstream, large_upstream, extra_models=models,
            routes="  stalling: {model: stalled, retry: {max_attempts: 1}}\n",
            cache="{enabled: true, redis_timeout_ms: 5000, coalesce: {enabled: true, wait_s: 5}}",
        ) + "tenants:\n  default: {limits: {max_concurrent: 1}}\n"  # fmt: skip
        gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": held.url})
        try:
            request_id = f"leaves-at-release-{uuid.uuid4().hex}"
            body = json.dumps(_body("stall, please", model="stalling")).encode()
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\n\r\n")  # fmt: skip
            with socket.create_connection(("127.0.0.1", gateway.port)) as client:  # a raw client, to hang up at will
                client.sendall(head.encode() + body)
                assert held.holding.wait(10), "the gateway never released the failed request's lease"
            time.sleep(0.5)  # the gateway sees the client gone while the release is still on its way
            held.let_go()
            record = gateway.wait_for_record(request_id)
            assert (record["status"], record["error_type"]) == (499, "client_disconnected")
            assert record["route"] == "stalling" and record["model"] == "stalled"
            answer = httpx.post(f"{gateway.base_url}/chat/completions", json=_body("my turn"), timeout=10)
            assert answer.status_code == 200, answer.text  # the tenant's one place came back
        finally:
            gateway.stop()
            held.close()


_STARTED = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 2000,
    "output_tokens": 1,
}
"""The usage a long prompt, mostly cached, opens its stream with."""


def _sse_chunk(kind: str, data: dict[str, object]) -> bytes:
    event = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


@contextmanager
def _claude_still_reading() -> Iterator[str]:
    """An Anthropic upstream that opens each stream with ``message_start`` (its usage) and a
    ``ping``, then says nothing more, as one still reading a long prompt does (the base URL)."""

    def answer(connection: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (data := connection.recv(65536)):
            head += data
        length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)  # fmt: skip
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < length and (data := connection.recv(65536)):
            body += data
        model = json.loads(body)["model"]
        start: dict[str, object] = {"type": "message_start", "message": {"id": "msg_still_reading", "type": "message",
                 "role": "assistant", "model": model, "content": [], "stop_reason": None,
                 "stop_sequence": None, "usage": _STARTED}}  # fmt: skip
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                           + _sse_chunk("message_start", start) + _sse_chunk("ping", {"type": "ping"}))  # fmt: skip

    with _loopback_server(answer) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def claude_still_reading(
    tmp_path_factory: pytest.TempPathFactory, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> Iterator[GatewayProcess]:
    with _claude_still_reading() as url:
        models = (f"  reading:\n    provider: anthropic\n    base_url: {url}\n    upstream_model: claude-sim\n"
                  "    price: {input: 3, cached_input: 0.3, cache_write: 3.75, output: 15}\n    tier: large\n"
                  "    timeouts: {connect: 1, first_byte: 5, idle: 30, total: 30}\n")  # fmt: skip
        policy = policy_text(small_upstream, large_upstream, extra_models=models,
                             routes="  still-reading: {model: reading, retry: {max_attempts: 1}}\n")  # fmt: skip
        gateway = start_gateway(tmp_path_factory.mktemp("still-reading"), policy)
        try:
            yield gateway
        finally:
            gateway.stop()


@pytest.mark.parametrize("passed_through", [False, True])
def test_a_client_leaving_before_the_first_content_is_billed_the_usage_its_upstream_opened_with(
    claude_still_reading: GatewayProcess, passed_through: bool
) -> None:
    """f106: Anthropic's ``message_start`` says the prompt's tokens, those read from and written to
    its cache among them, and the gateway holds it until the first content. A client that left
    in between (a long prompt, mostly cached, still being read) was billed the gateway's own
    count of the prompt, every token at the input price, as if none were cached."""
    request_id = f"still-reading-{passed_through}"
    extra: dict[str, object] = {"context_management": {"edits": []}} if passed_through else {}
    # the client leaves 3 s on: its upstream's message_start reached the gateway on a loaded machine too
    claude = anthropic.Anthropic(base_url=claude_still_reading.url, api_key="k", max_retries=0, timeout=3)
    with claude, pytest.raises(anthropic.APITimeoutError):
        claude.messages.create(
            model="still-reading",
            max_tokens=64,
            messages=[{"role": "user", "content": "Summarise the repository we discussed."}],
            stream=True,
            extra_body=extra,
            extra_headers={"x-request-id": request_id},
        )
    record = claude_still_reading.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert record["passthrough"] is (True if passed_through else None)
    assert record["tokens_source"] == "upstream"
    assert (record["prompt_tokens"], record["cached_prompt_tokens"], record["cache_write_tokens"]) == (3025, 2000, 1000)
    assert record["completion_tokens"] == 1
    assert record["cost_usd"] == pytest.approx((25 * 3 + 2000 * 0.3 + 1000 * 3.75 + 1 * 15) / 1e6)


_PAUSE_S = 10.0
"""How long the pausing upstream is silent after its first event (a long thinking or prefill pause)."""
_LEFT: set[str] = set()
"""The marker of each request whose gateway connection closed while its upstream was silent."""
_BEFORE_TEXT = "before any text"
Events = list[tuple[str, dict[str, Any]]]


async def _silent_after_start(request: web.Request, marker: str, opening: Events, rest: Events) -> web.StreamResponse:
    """Stream ``opening`` (its first event alone for a ``marker`` that says ``_BEFORE_TEXT``), be
    silent up to ``_PAUSE_S`` (noting in ``_LEFT`` the gateway leaving), then the rest."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    if _BEFORE_TEXT in marker:
        opening, rest = opening[:1], [*opening[1:], *rest]
    for kind, data in opening:
        await write_sse(response, data, kind)
    deadline = time.monotonic() + _PAUSE_S
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if request.transport is None or request.transport.is_closing():
            _LEFT.add(marker)
            return response
    for kind, data in rest:
        await write_sse(response, data, kind)
    return response


async def _pausing_messages(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    message = {"id": "msg_pausing", "type": "message", "role": "assistant", "model": body["model"], "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": _STARTED}  # fmt: skip
    block = {"type": "text", "text": ""}
    ended = {"stop_reason": "end_turn", "stop_sequence": None}
    opening: Events = [
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        _text_delta("Let me think."),
    ]
    rest: Events = [
        _text_delta(" Thought it over."),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": ended, "usage": {"output_tokens": 40}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return await _silent_after_start(request, str(body["messages"][0]["content"]), opening, rest)


def _text_delta(text: str) -> tuple[str, dict[str, Any]]:
    delta = {"type": "text_delta", "text": text}
    return "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}


async def _pausing_responses(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    response: dict[str, Any] = {"id": "resp_pausing", "object": "response", "created_at": 1, "status": "in_progress",
                                "model": body["model"], "output": [], "usage": None}  # fmt: skip
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    at = {"output_index": 0, "item_id": "msg_1", "content_index": 0}
    opening: Events = [
        ("response.created", {"type": "response.created", "response": response}),
        ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": item}),
        ("response.content_part.added", {"type": "response.content_part.added", **at, "part": part}),
        ("response.output_text.delta", {"type": "response.output_text.delta", **at, "delta": "Let me think."}),
    ]
    said = {**part, "text": "Let me think."}
    whole = {**item, "status": "completed", "content": [said]}
    usage = {"input_tokens": 30, "output_tokens": 40, "total_tokens": 70}
    rest: Events = [
        ("response.output_text.done", {"type": "response.output_text.done", **at, "text": "Let me think."}),
        ("response.content_part.done", {"type": "response.content_part.done", **at, "part": said}),
        ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": whole}),
        ("response.completed", {"type": "response.completed",
                                "response": {**response, "status": "completed", "output": [whole], "usage": usage}}),
    ]  # fmt: skip
    numbered = [(kind, {**event, "sequence_number": n}) for n, (kind, event) in enumerate([*opening, *rest])]
    return await _silent_after_start(request, str(body["input"]), numbered[: len(opening)], numbered[len(opening) :])


@pytest.fixture(scope="module")
def pausing_gateway(pair_gateway: PairGateway) -> Iterator[GatewayProcess]:
    routes = {"/v1/messages": _pausing_messages, "/v1/responses": _pausing_responses}
    with serve_recording(routes, name="pausing-upstream") as upstream:
        models = (f"  pausing-claude:\n    provider: anthropic\n    base_url: {upstream.url}\n"
                  "    upstream_model: claude-sim\n    price: {input: 3, cached_input: 0.3, cache_write: 3.75, output: 15}\n"
                  "    tier: large\n    timeouts: {connect: 1, first_byte: 5, idle: 30, total: 30}\n"
                  f"  pausing-gpt:\n    base_url: {upstream.url}/v1\n    upstream_model: gpt-5\n    responses_api: true\n"
                  "    price: {input: 2, output: 8}\n    tier: small\n"
                  "    timeouts: {connect: 1, first_byte: 5, idle: 30, total: 30}\n")  # fmt: skip
        routes_text = "  thinking-claude: {model: pausing-claude}\n  thinking-gpt: {model: pausing-gpt}\n"
        with pair_gateway("pausing", extra_models=models, routes=routes_text) as process:
            yield process


@pytest.mark.parametrize("before_text", [False, True], ids=["after-text", "before-text"])
@pytest.mark.parametrize(
    ("path", "asked"),
    [
        ("/v1/messages", {"model": "thinking-claude", "max_tokens": 64}),
        ("/v1/messages", {"model": "thinking-claude", "max_tokens": 64, "context_management": {"edits": []}}),
        ("/v1/responses", {"model": "thinking-gpt"}),
        ("/v1/responses", {"model": "thinking-claude"}),
        ("/v1/chat/completions", {"model": "thinking-claude"}),
        ("/v1/completions", {"model": "thinking-claude"}),
    ],
    ids=[
        "messages-translated",
        "messages-passed-through",
        "responses-passed-through",
        "responses-translated",
        "chat",
        "completions",
    ],
)
def test_a_client_leaving_while_its_upstream_is_silent_cuts_the_upstream(
    pausing_gateway: GatewayProcess, path: str, asked: dict[str, Any], before_text: bool
) -> None:
    """t186: a client that leaves while its upstream says nothing (a long thinking or prefill
    pause), before the first text (the gateway holds the stream until then) or after some, is
    seen without a byte being written: the upstream is let go, the request logged 499 and billed
    what was streamed (an Anthropic upstream's ``message_start`` counts, and the output so far)."""
    marker = f"think it over {_BEFORE_TEXT if before_text else ''} {uuid.uuid4().hex}"
    prompts: dict[str, dict[str, object]] = {"/v1/responses": {"input": marker}, "/v1/completions": {"prompt": marker}}
    said = prompts.get(path, {"messages": [{"role": "user", "content": marker}]})
    request_id = f"silent-{uuid.uuid4().hex}"
    headers = {"x-request-id": request_id, "anthropic-version": "2023-06-01"}
    body = {**asked, **said, "stream": True}
    if before_text:  # nothing comes: the client gives up
        with httpx.Client(timeout=1) as client, pytest.raises(httpx.ReadTimeout):
            client.post(f"{pausing_gateway.url}{path}", json=body, headers=headers)
    else:
        with httpx.Client(timeout=5) as client:
            with client.stream("POST", f"{pausing_gateway.url}{path}", json=body, headers=headers) as response:
                assert response.status_code == 200
                assert any("Let me think." in line for line in response.iter_lines())
    record = pausing_gateway.wait_for_record(request_id)
    assert (record["status"], record["error_type"]) == (499, "client_disconnected")
    assert _poll(lambda: any(marker in left for left in _LEFT), bool, timeout_s=30), (
        "the upstream was read on after the client left"
    )
    if "claude" in str(asked["model"]):
        assert record["tokens_source"] == "upstream"
        assert (record["prompt_tokens"], record["cached_prompt_tokens"], record["cache_write_tokens"]) == (
            3025,
            2000,
            1000,
        )
        assert 1 <= record["completion_tokens"] < 40  # what was written, not the whole answer
        prompt_usd = (25 * 3 + 2000 * 0.3 + 1000 * 3.75) / 1e6
        assert record["cost_usd"] == pytest.approx(prompt_usd + record["completion_tokens"] * 15 / 1e6)
