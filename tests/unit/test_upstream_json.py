"""Answers an upstream writes in JSON the SDKs read but msgspec refuses are passed on readable."""

from __future__ import annotations

import httpx
import msgspec

from gateway.config.loader import load_policy_text
from gateway.upstreams.registry import build_provider

_POLICY = """
pair: {small: small, large: claude}
models:
  small: {base_url: "http://small.test/v1", price: {input: 1, output: 1}, tier: small}
  claude: {base_url: "http://claude.test/v1", provider: anthropic, price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: small}}
auth: {mode: none}
"""

_MESSAGE = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude","stop_reason":"end_turn",'
    b'"content":[{"type":"text","text":"half an emoji \\ud83d"}],'
    b'"usage":{"input_tokens":222.0,"output_tokens":22.0}}'
)


async def test_a_passed_through_anthropic_message_with_half_an_emoji_is_passed_on_readable() -> None:
    """t80: the Messages pass-through kept the upstream's bytes as they came, and the pipeline's
    own reading of them afterwards failed: a 500 after the upstream had answered (and billed)."""
    policy = load_policy_text(_POLICY, environ={}).policy
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_MESSAGE))
    provider = build_provider("claude", policy.models["claude"], {"ANTHROPIC_API_KEY": "k"}, transport)
    body = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    completion = await provider.relay(body, {})
    await provider.aclose()
    assert msgspec.json.decode(completion.body)["content"][0]["text"] == "half an emoji \ufffd"
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        222,
        22,
    )
