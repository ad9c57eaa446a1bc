"""A budget refusal says which of three it is (t200): a request no budget of its size can ever hold,
one that would pass what is left today, and a budget spent. A fresh key with $0.001 a day and a
request without max_tokens was told its budget was "exhausted" with $0.0000 spent, and to come back
at midnight, when the same request would be refused again; a Messages client (Claude Code asks for
32,000 tokens) on a modest budget met the same words."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.auth import hash_key
from gateway.simulated import SimulatedUpstream
from tests.conftest import PairGateway, closed_after_test, inject
from tests.gateway_process import GatewayProcess

_RUN = uuid.uuid4().hex[:8]  # tenants of their own: the session's Redis keeps every spend of the day
KEYS = f"""
auth:
  mode: keys
  keys:
    - {{id: fresh, tenant: fresh-{_RUN}, hash: "{hash_key("key-fresh")}", limits: {{usd_per_day: 0.001}}}}
    - {{id: member, tenant: team-{_RUN}, hash: "{hash_key("key-member")}"}}
    - {{id: spender, tenant: spender-{_RUN}, hash: "{hash_key("key-spender")}", limits: {{usd_per_day: 0.001}}}}
    - {{id: spent, tenant: spent-{_RUN}, hash: "{hash_key("key-spent")}", limits: {{usd_per_day: 0.001}}}}
tenants:
  team-{_RUN}: {{limits: {{usd_per_month: 0.001}}}}
"""
# best is large: $5 per million prompt tokens and $15 per million completion tokens
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is new today?"}]
ASK: list[MessageParam] = [{"role": "user", "content": "What is new today?"}]


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway) -> Iterator[GatewayProcess]:
    with pair_gateway("budget-words", auth=KEYS) as process:
        yield process


def _openai(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=f"key-{key}", max_retries=0, timeout=15))


def _claude(gateway: GatewayProcess, key: str) -> anthropic.Anthropic:
    return closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key=f"key-{key}", max_retries=0, timeout=15))


def _settled(gateway: GatewayProcess, key: str, requests: int) -> None:
    """Once the key's answers are billed: until its settlement lands (after the answer), a request's
    estimate is held, which another request meets as a 429 to retry shortly, or fits beside."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        usage = httpx.get(f"{gateway.base_url}/usage", headers={"authorization": f"Bearer key-{key}"}).json()
        if usage["total"]["requests"] >= requests:
            return
        time.sleep(0.05)
    raise AssertionError(f"{key}'s {requests} requests were not settled in 30 s")


def _renewal() -> str:
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    return f"it renews at {tomorrow:%Y-%m-%d} 00:00 UTC"


def test_a_request_larger_than_the_whole_budget_is_told_it_can_never_pass(gateway: GatewayProcess) -> None:
    """No max_tokens: 512 completion tokens at $15 per million, $0.0077, over the key's $0.001 a day
    with nothing spent. Not "exhausted" and back at midnight: no retry can pass, and the message
    says what can (the tpm's ``request_too_large_for_limit`` answers the same way)."""
    chat = _openai(gateway, "fresh")
    with pytest.raises(openai.RateLimitError) as refused:
        chat.chat.completions.create(model="best", messages=CHAT)
    assert refused.value.code == "request_too_large_for_budget"
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "rate_limit_error"
    message = refused.value.message
    assert "request too large for the budget" in message and "exhausted" not in message, message
    assert "key 'fresh' may spend $0.001 a day (key.usd_per_day)" in message, message
    assert "no retry can pass" in message and "lower max_tokens" in message and "512 completion tokens" in message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.value.response.headers  # nothing to wait for
    record = gateway.wait_for_record(refused.value.response.headers["x-request-id"])
    assert (record["status"], record["error_type"]) == (429, "request_too_large_for_budget")

    # Claude Code asks for 32,000 tokens: in Anthropic's shape, the same words
    with pytest.raises(anthropic.RateLimitError) as told:
        _claude(gateway, "fresh").messages.create(model="best", max_tokens=32000, messages=ASK)
    assert told.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "request too large for the budget" in told.value.message and "lower max_tokens" in told.value.message
    assert told.value.response.headers["x-should-retry"] == "false"

    # and what it says works: a lower max_tokens fits
    assert chat.chat.completions.create(model="best", messages=CHAT, max_tokens=10).choices[0].message.content


def test_a_tenant_budget_too_small_for_the_request_is_named(gateway: GatewayProcess) -> None:
    with pytest.raises(anthropic.RateLimitError) as told:
        _claude(gateway, "member").messages.create(model="best", max_tokens=32000, messages=ASK)
    message = told.value.message
    assert "request too large for the budget" in message, message
    assert f"tenant 'team-{_RUN}' may spend $0.001 a month (tenant.usd_per_month)" in message, message
    assert told.value.response.headers["x-should-retry"] == "false"


def test_a_request_past_what_is_left_is_told_it_would_exceed_the_budget(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """$0.0006 of $0.001 spent: a request that may cost $0.0006 more would exceed it, which a
    smaller one would not; the budget is not "exhausted"."""
    chat = _openai(gateway, "spender")
    inject(large_upstream, {"usage": {"completion_tokens": 40}})
    assert chat.chat.completions.create(model="best", messages=CHAT, max_tokens=40).choices
    _settled(gateway, "spender", 1)
    with pytest.raises(openai.RateLimitError) as over:
        chat.chat.completions.create(model="best", messages=CHAT, max_tokens=40)
    refused = over.value
    assert refused.code == "insufficient_quota", refused.message
    message = refused.message
    assert "this request would exceed the daily budget" in message and "exhausted" not in message, message
    assert re.search(r"key 'spender' may spend \$0\.001, \$0\.000\d is spent, \$0\.000\d+ is left", message), message
    assert "a lower max_tokens" in message and _renewal() in message, message
    assert refused.response.headers["x-should-retry"] == "false"

    with pytest.raises(anthropic.RateLimitError) as told:
        _claude(gateway, "spender").messages.create(model="best", max_tokens=40, messages=ASK)
    assert told.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "this request would exceed the daily budget" in told.value.message

    assert chat.chat.completions.create(model="best", messages=CHAT, max_tokens=5).choices  # what is left holds it


def test_a_spent_budget_is_told_exhausted_with_when_it_renews(
    gateway: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """An answer dearer than its estimate (the upstream counts 300 prompt tokens where the gateway's
    tokenizer counted a dozen: a document it does not see) spends the whole budget: ``insufficient_quota``,
    OpenAI's code for a spent quota, saying when it comes back."""
    chat = _openai(gateway, "spent")
    inject(large_upstream, {"usage": {"prompt_tokens": 300}})  # $0.0015, and a few completion tokens
    assert chat.chat.completions.create(model="best", messages=CHAT, max_tokens=20).choices
    _settled(gateway, "spent", 1)
    with pytest.raises(openai.RateLimitError) as over:
        chat.chat.completions.create(model="best", messages=CHAT, max_tokens=5)
    refused = over.value
    assert refused.code == "insufficient_quota", refused.message
    error = refused.body
    assert isinstance(error, dict) and error["type"] == "insufficient_quota"
    message = error["message"]
    assert re.match(r"daily budget exhausted: key 'spent' may spend \$0\.001, \$0\.001\d is spent", message), message
    assert _renewal() in message, message
    assert refused.response.headers["x-should-retry"] == "false" and int(refused.response.headers["retry-after"]) > 0

    with pytest.raises(anthropic.RateLimitError) as told:
        _claude(gateway, "spent").messages.create(model="best", max_tokens=5, messages=ASK)
    said = told.value.body["error"]  # type: ignore[index]
    assert said["type"] == "rate_limit_error" and said["message"].startswith("daily budget exhausted"), said
    assert _renewal() in said["message"]
