"""Shared fixtures: a real Redis 8, two simulated upstreams, and the gateway as a real process."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import anthropic
import httpx
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream, start_simulated_upstream
from tests.gateway_process import (
    GatewayProcess,
    policy_text,
    running_gateway,
    start_gateway,
    vllm_and_claude_models,
)
from tests.loopback_app import RecordingHandler, RecordingUpstream, serve_recording


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)
_open_clients: list[_Closable] = []


def closed_after_test(client: C) -> C:
    """An SDK client the test's teardown closes: one left open keeps pooled sockets that the
    garbage collector reports later, as a failure of whichever test it happens to run in."""
    _open_clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while _open_clients:
        _open_clients.pop().close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_embedded_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def small_upstream() -> Iterator[SimulatedUpstream]:
    with start_simulated_upstream("small") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def large_upstream() -> Iterator[SimulatedUpstream]:
    with start_simulated_upstream("large") as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _reset_upstreams(request: pytest.FixtureRequest) -> None:
    """Each test starts with no queued faults and zeroed stats on the upstreams it uses."""
    for name in ("small_upstream", "large_upstream"):
        if name in request.fixturenames:
            upstream: SimulatedUpstream = request.getfixturevalue(name)
            httpx.post(f"{upstream.root_url}/_control/reset").raise_for_status()


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    """The shared gateway. Tests that trip breakers or edit the policy start their own."""
    process = start_gateway(
        tmp_path_factory.mktemp("gateway"),
        policy_text(small_upstream, large_upstream),
        env={
            "REDIS_URL": redis_server.url,
            "TEST_LARGE_KEY": "sk-large-secret-123",
            "TEST_ANTHROPIC_KEY": "sk-ant-456",
        },
    )
    yield process
    process.stop()


class PairGateway(Protocol):
    def __call__(
        self, name: str, *, env: Mapping[str, str] = ..., edit: Callable[[str], str] | None = ..., **policy: str
    ) -> AbstractContextManager[GatewayProcess]: ...


@pytest.fixture(scope="session")
def pair_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> PairGateway:
    """A module's own gateway, for a block, on the shared pair and Redis: ``policy`` as
    :func:`policy_text` takes it (a test upstream's ``extra_models``, ``routes``, ``auth``...),
    then ``edit``-ed; ``env`` besides ``REDIS_URL``."""

    @contextmanager
    def started(
        name: str,
        *,
        env: Mapping[str, str] = MappingProxyType({}),
        edit: Callable[[str], str] | None = None,
        **policy: str,
    ) -> Iterator[GatewayProcess]:
        text = policy_text(small_upstream, large_upstream, **policy)
        workdir = tmp_path_factory.mktemp(name)
        with running_gateway(workdir, edit(text) if edit else text, env={"REDIS_URL": redis_server.url, **env}) as gw:
            yield gw

    return started


def recording_vllm_and_claude(
    name: str, chat: RecordingHandler, messages: RecordingHandler, **policy: str
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """A module's ``vllm`` and ``claude_upstream`` fixtures (recording upstreams answering chat
    completions with ``chat`` and Messages with ``messages``) and its ``gateway`` over them, with
    the models :func:`~tests.gateway_process.vllm_and_claude_models` names and ``policy``;
    assign them to those names: ``vllm, claude_upstream, gateway = recording_vllm_and_claude(...)``."""

    @pytest.fixture(scope="module", name="vllm")
    def vllm_fixture() -> Iterator[RecordingUpstream]:
        with serve_recording({"/v1/chat/completions": chat}, name=f"{name}-vllm") as upstream:
            yield upstream

    @pytest.fixture(scope="module", name="claude_upstream")
    def claude_fixture() -> Iterator[RecordingUpstream]:
        with serve_recording({"/v1/messages": messages}, name=f"{name}-claude") as upstream:
            yield upstream

    @pytest.fixture(scope="module", name="gateway")
    def gateway_fixture(
        pair_gateway: PairGateway, vllm: RecordingUpstream, claude_upstream: RecordingUpstream
    ) -> Iterator[GatewayProcess]:
        options: dict[str, Any] = {"extra_models": vllm_and_claude_models(vllm.url, claude_upstream.url), **policy}
        with pair_gateway(name, **options) as gw:
            yield gw

    return vllm_fixture, claude_fixture, gateway_fixture


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=10) as client:
        yield client


@pytest.fixture
def claude(gateway: GatewayProcess) -> Iterator[anthropic.Anthropic]:
    """The anthropic SDK on the module's ``gateway`` (the shared one unless a module starts its own)."""
    with anthropic.Anthropic(base_url=gateway.url, api_key="sk-unused", max_retries=0, timeout=15) as client:
        yield client


@pytest.fixture
async def aclient(gateway: GatewayProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=10) as client:
        yield client  # closed on the loop that opened it: its sockets must not outlive the test


def sdk_chat(
    client: openai.OpenAI, model: str, messages: Iterable[ChatCompletionMessageParam], *, stream: bool
) -> tuple[str, str, CompletionUsage | None]:
    """One chat request as an app makes it with the openai SDK, streamed (usage asked for) or not:
    its ``x-request-id``, the answer's text and the usage the SDK read."""
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}
        ) as response:
            chunks = list(response.parse())
            request_id = response.headers["x-request-id"]
        return request_id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    answer = raw.parse()
    return raw.headers["x-request-id"], answer.choices[0].message.content or "", answer.usage


def inject(upstream: SimulatedUpstream, *faults: Mapping[str, object]) -> None:
    httpx.post(f"{upstream.root_url}/_control/faults", json={"faults": list(faults)}).raise_for_status()


def upstream_stats(upstream: SimulatedUpstream) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{upstream.root_url}/_control/stats").json()
    return stats


def leave_once_upstream_has_it(
    url: str,
    body: Mapping[str, object],
    upstream: SimulatedUpstream,
    request_id: str,
    *,
    counter: str = "chat_requests",
    headers: Mapping[str, str] = MappingProxyType({}),
) -> None:
    """POST ``body`` to ``url`` on a raw connection and hang up once ``upstream`` has the request
    (its ``counter`` went up), not at a guessed client timeout: on a loaded machine a timeout of a
    few hundred ms could end before the gateway sent the request on, or after its answer came."""
    target = httpx.URL(url)
    before = upstream_stats(upstream)[counter]
    content = json.dumps(body).encode()
    more = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = (f"POST {target.raw_path.decode()} HTTP/1.1\r\nhost: {target.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(content)}\r\nx-request-id: {request_id}\r\n{more}\r\n")  # fmt: skip
    with socket.create_connection((target.host, target.port or 80)) as client:
        client.sendall(head.encode() + content)
        deadline = time.monotonic() + 30
        while upstream_stats(upstream)[counter] == before:
            assert time.monotonic() < deadline, f"the request never reached the upstream: {upstream_stats(upstream)}"
            time.sleep(0.02)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
