"""``POST /v1/messages/count_tokens`` counted by an Anthropic upstream, with the anthropic SDK.

The upstream is sent only what Anthropic's ``count_tokens`` takes (t59), and one that has no such
endpoint (a 404: Anthropic-compatible proxies and shims often lack it) is not asked again (t61).
This module has a gateway of its own: what a provider learns stays with that gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    process = start_gateway(
        Path(tmp_path_factory.mktemp("count_tokens")),
        policy_text(small_upstream, large_upstream),
        env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "sk-large", "TEST_ANTHROPIC_KEY": "sk-ant"},
    )
    yield process
    process.stop()


_ASK = {
    "model": "claude",
    "system": "You are terse.",
    "messages": [{"role": "user", "content": "How many tokens is this?"}],
    "tools": [{"name": "lookup", "description": "Look it up.", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"},
}


def test_only_what_count_tokens_takes_reaches_it(
    claude: anthropic.Anthropic, large_upstream: SimulatedUpstream
) -> None:
    """(t59) The client's whole body went up: ``metadata.user_id`` as the client wrote it (not the
    tenant's digest), and ``max_tokens``/``stream``, which Anthropic's count_tokens refuses."""
    body = {**_ASK, "max_tokens": 1024, "stream": True, "metadata": {"user_id": "alice@example.com"}}
    counted = claude.post("/v1/messages/count_tokens", body=body, cast_to=dict[str, int])  # as Claude Code sends it
    sent = upstream_stats(large_upstream)["last_request"]
    assert sent["path"] == "/v1/messages/count_tokens"
    assert sent["body"] == {**_ASK, "model": "claude-sim"}
    assert counted["input_tokens"] > 0


def test_an_upstream_without_count_tokens_is_not_asked_again(
    claude: anthropic.Anthropic, gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """(t61) Each count paid a round trip that failed, and logged the upstream as misconfigured."""
    inject(large_upstream, {"status": 404, "body": '{"type": "error", "error": {"type": "not_found_error", "message": "Not Found"}}'})  # fmt: skip
    before = upstream_stats(large_upstream)["count_tokens_requests"]
    counts = [claude.messages.count_tokens(**_ASK).input_tokens for _ in range(3)]  # type: ignore[arg-type]
    assert counts[0] > 0 and len(set(counts)) == 1  # the gateway's own count, each time
    assert upstream_stats(large_upstream)["count_tokens_requests"] == before + 1  # asked once
    assert (
        len(gateway.wait_for_ops("count_tokens_unavailable")) == 1
    )  # read once it is written (a CI run read too early)
    assert "count_tokens_upstream_failed" not in gateway.stderr_text()
