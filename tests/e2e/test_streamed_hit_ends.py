"""A streamed cache hit is logged once its replay ended, as a live stream is (t195).

A hit was logged by the pipeline as it handed the answer over, and replayed after: a client that
left a long replay mid-way was logged 200, and one reading it slowly was logged at once, its
latency the gateway's alone. The answer here is longer than the sockets' and the server's buffers
hold, so its replay waits on a client that takes little at a time.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, policy_text, running_gateway, start_gateway
from tests.loopback_app import serve_app

_LONG = "The quick brown fox jumps over the lazy dog again; " * 180_000
"""9 MB."""

_MODELS = """  long:
    base_url: {url}/v1
    tier: large
    context_window: 4000000
    price: {{input: 1, output: 2}}
    timeouts: {{connect: 2, first_byte: 10, total: 30}}
"""


async def _long_answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    message = {"role": "assistant", "content": _LONG}
    usage = {"prompt_tokens": 12, "completion_tokens": 1_980_000, "total_tokens": 1_980_012}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body = {"id": "chatcmpl-long", "object": "chat.completion", "created": 1, "model": "long", "choices": [choice]}
    return web.json_response({**body, "usage": usage})


def _policy(long_answers_url: str, small: SimulatedUpstream, large: SimulatedUpstream) -> str:
    """The test policy with the long answers' model, and an exact cache that Redis has time for."""
    return policy_text(
        small,
        large,
        extra_models=_MODELS.format(url=long_answers_url),
        cache="{enabled: true, semantic: {enabled: false}, redis_timeout_ms: 2000}",
    )


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    with serve_app({"/v1/chat/completions": _long_answer}, name="long-answer-upstream") as served:
        policy = _policy(served.url, small_upstream, large_upstream)
        workdir: Path = tmp_path_factory.mktemp("streamedhit")
        with running_gateway(workdir, policy, env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"}) as process:
            yield process


_ASKED = {
    "/v1/chat/completions": {},
    "/v1/messages": {"max_tokens": 2_000_000},
    "/v1/responses": {"max_output_tokens": 2_000_000, "store": False},
}
"""What each API is asked, besides its question."""


def _filled(gateway: GatewayProcess, path: str) -> dict[str, object]:
    """A question in ``path``'s API whose long answer is in the cache."""
    question = f"All of it. {time.monotonic_ns()}"
    said = {"input": question} if path == "/v1/responses" else {"messages": [{"role": "user", "content": question}]}
    ask = {"model": "long", "temperature": 0, **said, **_ASKED[path]}
    filled = httpx.post(f"{gateway.url}{path}", json=ask, timeout=30)
    assert filled.status_code == 200 and filled.headers["x-gateway-cache"] == "miss", filled.text[:300]
    return ask


def _streamed_hit(gateway: GatewayProcess, path: str, ask: dict[str, object], request_id: str) -> socket.socket:
    """The request streamed, on a raw connection that takes little at a time (a 4 KB receive window)."""
    target = httpx.URL(gateway.url)
    body = json.dumps({**ask, "stream": True}).encode()
    head = (f"POST {path} HTTP/1.1\r\nhost: {target.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n")  # fmt: skip
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(30)
    client.connect((target.host, target.port or 80))
    client.sendall(head.encode() + body)
    return client


@pytest.mark.parametrize("path", list(_ASKED))
def test_a_client_leaving_a_long_streamed_hit_is_logged_499(gateway: GatewayProcess, path: str) -> None:
    ask, request_id = _filled(gateway, path), f"left-replay-{time.monotonic_ns()}"
    with _streamed_hit(gateway, path, ask, request_id) as client:
        read = b""
        while len(read) < 400:
            read += client.recv(4096)
    assert read.startswith(b"HTTP/1.1 200") and b"x-gateway-cache: exact" in read
    record = gateway.wait_for_record(request_id)
    assert (record["status"], record["error_type"], record["cache"]) == (499, "client_disconnected", "exact")
    # a hit costs nothing, whether its client stays or not; it says what the answer saved
    assert (record["cost_usd"], record["completion_tokens"]) == (0, 1_980_000) and record["cache_saved_usd"] > 0


def test_a_streamed_hits_line_is_written_once_its_slow_client_read_it(gateway: GatewayProcess) -> None:
    path = "/v1/chat/completions"
    ask, request_id = _filled(gateway, path), f"slow-replay-{time.monotonic_ns()}"
    with _streamed_hit(gateway, path, ask, request_id) as client:
        read = client.recv(4096)
        time.sleep(1.0)
        assert not [r for r in gateway.log_records() if r["request_id"] == request_id], "logged mid-replay"
        while chunk := client.recv(1 << 20):
            read += chunk
    assert b"data: [DONE]" in read[-64:]
    record = gateway.wait_for_record(request_id)
    assert (record["status"], record["cache"], record["cost_usd"]) == (200, "exact", 0)
    # its latency is the client's pace, not the gateway's time
    assert record["latency_ms"] >= 1000 and record["client_wait_ms"] >= 900, record


def _read_slowly(client: socket.socket, read: list[bytes]) -> None:
    """2 KB every 10 ms until the gateway closes: a client slower than the answer, never stalled."""
    with client:
        while chunk := client.recv(2048):
            read.append(chunk[-600:])
            time.sleep(0.01)


def test_streamed_hits_to_slow_clients_at_the_drain_deadline_end_in_band_and_are_logged(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t198: a hit replaying to a slow client is waiting in the server's send, not in the replay,
    when the deadline comes: chat's was logged 499, the other protocols' not at all, with an
    "Exception in ASGI application" each. Each ends as a live stream there does: in-band, 503."""
    with serve_app({"/v1/chat/completions": _long_answer}, name="long-answer-upstream") as served:
        policy = _policy(served.url, small_upstream, large_upstream)
        env = {"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k"}
        gateway = start_gateway(tmp_path, policy, env=env, serve_args=("--drain-s", "2"))
        try:
            # (a Responses client is sent the whole output so far in its response.failed: megabytes, too slow here)
            paths = ["/v1/chat/completions", "/v1/messages"]
            asked = {path: _filled(gateway, path) for path in paths}
            reads: dict[str, list[bytes]] = {}
            readers = []
            for path in paths:
                request_id = f"drained-replay-{path.rsplit('/', 1)[1]}-{time.monotonic_ns()}"
                reads[request_id] = []
                client = _streamed_hit(gateway, path, asked[path], request_id)
                readers.append(threading.Thread(target=_read_slowly, args=(client, reads[request_id])))
            for reader in readers:
                reader.start()
            while not all(len(read) > 10 for read in reads.values()):  # every replay is under way
                time.sleep(0.05)
            gateway.process.send_signal(signal.SIGTERM)
            for reader in readers:
                reader.join(60)
            assert gateway.process.wait(30) == 0
        finally:
            gateway.stop()
    records = [r for r in gateway.log_records() if r["request_id"] in reads]
    assert sorted((r["request_id"], r["status"], r["error_type"]) for r in records) == [
        (request_id, 503, "shutting_down") for request_id in sorted(reads)
    ]
    for request_id, read in reads.items():
        assert b"the gateway is shutting down" in b"".join(read[-3:]), (request_id, read[-3:])  # in its own protocol
    assert "Exception in ASGI application" not in gateway.stderr_text()
