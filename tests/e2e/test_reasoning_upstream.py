"""An OpenAI reasoning model upstream, which refuses ``max_tokens`` for ``max_completion_tokens``.

A Messages client must send ``max_tokens`` and a Responses client's ``max_output_tokens`` became
it: every such request to an o-series or gpt-5 model was a 400 naming a field the client never
wrote (t38). The simulated upstream refuses it as OpenAI does for models named so.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

_REASONING = """  reasoner:
    base_url: {url}
    upstream_model: o4-mini
    tier: large
    price: {{input: 1.1, output: 4.4}}
    timeouts: {{connect: 1, first_byte: 1, total: 5}}
"""


@pytest.fixture(scope="module")
def gateway_to_o4(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    policy = policy_text(small_upstream, large_upstream, extra_models=_REASONING.format(url=small_upstream.url))
    process = start_gateway(tmp_path_factory.mktemp("o4"), policy, env={"REDIS_URL": redis_server.url})
    yield process
    process.stop()


def test_each_api_reaches_a_model_that_refuses_max_tokens(
    gateway_to_o4: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway_to_o4.url, api_key="x", max_retries=0))
    oai = closed_after_test(openai.OpenAI(base_url=gateway_to_o4.base_url, api_key="x", max_retries=0))
    before = upstream_stats(small_upstream)["chat_requests"]
    message = claude.messages.create(model="reasoner", max_tokens=64, messages=[{"role": "user", "content": "Hi."}])
    assert message.content[0].type == "text" and message.content[0].text
    sent = upstream_stats(small_upstream)["last_request"]["body"]
    assert sent["max_completion_tokens"] == 64 and "max_tokens" not in sent
    # learned: the next requests go as the upstream takes them, with no 400 first
    assert upstream_stats(small_upstream)["chat_requests"] == before + 2
    response = oai.responses.create(model="reasoner", input="Hi.", max_output_tokens=32)
    assert response.output_text
    with claude.messages.stream(model="reasoner", max_tokens=16, messages=[{"role": "user", "content": "Hi."}]) as s:
        assert s.get_final_message().content
    chat = oai.chat.completions.create(model="reasoner", max_tokens=8, messages=[{"role": "user", "content": "Hi."}])
    assert chat.choices[0].message.content
    assert upstream_stats(small_upstream)["chat_requests"] == before + 5
    assert upstream_stats(small_upstream)["last_request"]["body"]["max_completion_tokens"] == 8
