"""A client's end-user and prompt-cache identifiers reach an upstream as its tenant's own.

Every tenant's requests go upstream under the operator's key: two tenants' ``"user-1"`` must be
two end users there (OpenAI's abuse enforcement blocks by them), and two tenants'
``prompt_cache_key`` two cache groups. Checked on what the simulated upstreams received, for each
inbound API and both upstream protocols.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.auth import hash_key
from gateway.protocols.tenant_ids import scoped
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

_AUTH = f"""auth:
  mode: keys
  keys:
    - {{id: a, tenant: team-a, hash: "{hash_key("key-a")}"}}
    - {{id: b, tenant: team-b, hash: "{hash_key("key-b")}"}}
"""


@pytest.fixture(scope="module")
def two_tenants(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(small_upstream, large_upstream, auth=_AUTH)
    process = start_gateway(
        tmp_path_factory.mktemp("tenant-ids"),
        policy,
        env={"REDIS_URL": redis_server.url, "TEST_ANTHROPIC_KEY": "sk-ant", "TEST_LARGE_KEY": "sk-large"},
    )
    yield process
    process.stop()


def _openai(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=10))


def _anthropic(gateway: GatewayProcess, key: str) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=10))


def _sent(upstream: SimulatedUpstream) -> dict[str, Any]:
    body: dict[str, Any] = upstream_stats(upstream)["last_request"]["body"]
    return body


_HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_a_chat_clients_identifiers_are_its_tenants_own(
    two_tenants: GatewayProcess, small_upstream: SimulatedUpstream, tenant: str
) -> None:
    ids = {"user": "user-1", "safety_identifier": "user-1", "prompt_cache_key": "session-1"}
    _openai(two_tenants, f"key-{tenant}").chat.completions.create(model="fast", messages=_HELLO, **ids)  # type: ignore[call-overload]
    sent = _sent(small_upstream)
    assert {name: sent[name] for name in ids} == {name: scoped(f"team-{tenant}", value) for name, value in ids.items()}
    assert len(sent["safety_identifier"]) <= 64  # OpenAI's limit


def test_two_tenants_same_end_user_are_two_end_users_upstream(
    two_tenants: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    seen: dict[str, set[str]] = {"chat": set(), "responses": set(), "messages": set(), "to-anthropic": set()}
    for key in ("key-a", "key-b"):
        oai, claude = _openai(two_tenants, key), _anthropic(two_tenants, key)
        oai.chat.completions.create(model="fast", messages=_HELLO, user="user-1")
        seen["chat"].add(_sent(small_upstream)["user"])
        oai.responses.create(model="fast", input="Say hello.", safety_identifier="user-1")
        seen["responses"].add(_sent(small_upstream)["safety_identifier"])  # a chat upstream's field too
        claude.messages.create(model="fast", max_tokens=32, messages=_HELLO, metadata={"user_id": "user-1"})
        seen["messages"].add(_sent(small_upstream)["user"])
        oai.chat.completions.create(model="claude", messages=_HELLO, user="user-1")
        seen["to-anthropic"].add(_sent(large_upstream)["metadata"]["user_id"])
    expected = {scoped("team-a", "user-1"), scoped("team-b", "user-1")}
    assert seen == {name: expected for name in seen}


def test_an_anthropic_clients_end_user_passed_through_is_its_tenants_own(
    two_tenants: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    _anthropic(two_tenants, "key-a").messages.create(
        model="claude", max_tokens=32, messages=_HELLO, metadata={"user_id": "user-1"}
    )
    assert _sent(large_upstream)["metadata"] == {"user_id": scoped("team-a", "user-1")}


@pytest.mark.parametrize("stream", [False, True])
def test_a_passed_through_response_tells_the_client_its_own_identifiers_back(
    two_tenants: GatewayProcess, small_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t43: the upstream echoes the request in its response object, and the client read the
    gateway's digests back instead of its own values."""
    ids = {"user": "user-1", "safety_identifier": "user-1", "prompt_cache_key": "session-1"}
    oai = _openai(two_tenants, "key-a")
    if stream:
        with oai.responses.stream(model="gpt", input="Say hello.", **ids) as events:  # type: ignore[call-overload]
            response = events.get_final_response()
    else:
        response = oai.responses.create(model="gpt", input="Say hello.", **ids)  # type: ignore[call-overload]
    assert (response.user, response.safety_identifier, response.prompt_cache_key) == ("user-1", "user-1", "session-1")
    sent = _sent(small_upstream)
    assert (sent["user"], sent["prompt_cache_key"]) == (scoped("team-a", "user-1"), scoped("team-a", "session-1"))


_IDS = {"user": "user-1", "safety_identifier": "safe-1", "prompt_cache_key": "session-1"}


def _own(response: Any) -> tuple[str | None, str | None, str | None]:
    return response.user, response.safety_identifier, response.prompt_cache_key


@pytest.mark.parametrize("stream", [False, True])
def test_a_passed_through_response_read_back_tells_the_client_its_own_identifiers(
    two_tenants: GatewayProcess, small_upstream: SimulatedUpstream, stream: bool
) -> None:
    """t48: the create told the client its own values, but GET gave the digests the upstream keeps."""
    oai = _openai(two_tenants, "key-a")
    if stream:
        with oai.responses.stream(model="gpt", input="Say hello.", **_IDS) as events:  # type: ignore[call-overload]
            created = events.get_final_response()
    else:
        created = oai.responses.create(model="gpt", input="Say hello.", **_IDS)  # type: ignore[call-overload]
    upstreams = httpx.get(f"{small_upstream.url}/responses/{created.id}", timeout=10).json()
    assert (upstreams["user"], upstreams["prompt_cache_key"]) == (
        scoped("team-a", "user-1"),
        scoped("team-a", "session-1"),
    )
    assert _own(oai.responses.retrieve(created.id)) == ("user-1", "safe-1", "session-1")


def test_a_continued_passed_through_response_reads_back_each_turns_own_identifiers(
    two_tenants: GatewayProcess,
) -> None:
    oai = _openai(two_tenants, "key-a")
    first = oai.responses.create(model="gpt", input="Say hello.", **_IDS)  # type: ignore[call-overload]
    second = oai.responses.create(
        model="gpt", input="Again.", previous_response_id=first.id, user="user-2", prompt_cache_key="session-2"
    )
    assert _own(second) == ("user-2", None, "session-2")
    assert _own(oai.responses.retrieve(second.id)) == ("user-2", None, "session-2")
    assert _own(oai.responses.retrieve(first.id)) == ("user-1", "safe-1", "session-1")


def test_an_identifier_too_long_to_keep_is_read_back_as_null_not_as_the_digest(two_tenants: GatewayProcess) -> None:
    """What the ownership record keeps is bounded: it stays about a kilobyte of the tenant's cap."""
    oai = _openai(two_tenants, "key-a")
    long = "u" * 300
    created = oai.responses.create(model="gpt", input="Say hello.", user=long, prompt_cache_key="session-1")
    assert _own(created) == (long, None, "session-1")  # the create tells back what the client wrote
    assert _own(oai.responses.retrieve(created.id)) == (None, None, "session-1")


def test_a_translated_response_carries_every_identifier_to_a_chat_upstream(
    two_tenants: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t48: ``prompt_cache_key`` went nowhere, unnamed, and ``safety_identifier`` was lost beside ``user``."""
    raw = _openai(two_tenants, "key-a").responses.with_raw_response.create(model="fast", input="Say hello.", **_IDS)  # type: ignore[call-overload]
    sent = _sent(small_upstream)
    assert {name: sent[name] for name in _IDS} == {name: scoped("team-a", value) for name, value in _IDS.items()}
    assert "x-gateway-dropped" not in raw.headers
    assert _own(raw.parse()) == ("user-1", "safe-1", "session-1")


def test_a_translated_response_names_the_identifiers_an_anthropic_upstream_is_not_sent(
    two_tenants: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """Anthropic has one end-user field (``metadata.user_id``) and no prompt-cache key: what does
    not reach it is named, as for a chat client; a safety identifier alone is its end user."""
    oai = _openai(two_tenants, "key-a")
    raw = oai.responses.with_raw_response.create(model="claude", input="Say hello.", **_IDS)  # type: ignore[call-overload]
    assert _sent(large_upstream)["metadata"] == {"user_id": scoped("team-a", "user-1")}
    assert raw.headers["x-gateway-dropped"] == "safety_identifier,prompt_cache_key"
    alone = oai.responses.with_raw_response.create(model="claude", input="Say hello.", safety_identifier="safe-1")
    assert _sent(large_upstream)["metadata"] == {"user_id": scoped("team-a", "safe-1")}
    assert "x-gateway-dropped" not in alone.headers
    chat = oai.chat.completions.with_raw_response.create(model="claude", messages=_HELLO, **_IDS)  # type: ignore[call-overload]
    assert set(chat.headers["x-gateway-dropped"].split(",")) == {"safety_identifier", "prompt_cache_key"}  # the same
