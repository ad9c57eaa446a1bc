"""When an upstream says to come back: Azure OpenAI's ``retry-after-ms``, and a 503's ``Retry-After`` (t174).

Azure OpenAI answers a 429 with ``retry-after-ms`` alone (OpenAI's SDK reads it first): the
gateway retried 45 ms later, a retry certain to fail, and told the client nothing of when to come
back. An upstream's 503 with ``Retry-After`` reached the client as a 502 without it (f222: a 503
without one too). The loopback upstream answers as each test scripts it and notes when each
request arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import serve_app

_MODELS = """
  azure:
    base_url: {url}/v1
    upstream_model: gpt-4o
    price: {{input: 1, output: 1}}
    tier: small
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
_ERROR_BODY = b'{"error": {"message": "The service is temporarily unavailable.", "type": "server_error"}}'


@dataclass
class _Scripted:
    """The answers still to give (status and headers; then 200s), and when each request arrived."""

    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:], strict=False)]


_SCRIPT = _Scripted()


async def _chat(request: web.Request) -> web.StreamResponse:
    _SCRIPT.arrivals.append(time.monotonic())
    await request.read()
    if _SCRIPT.answers:
        status, headers = _SCRIPT.answers.pop(0)
        return web.Response(status=status, headers=headers, body=_ERROR_BODY, content_type="application/json")
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o"}
    return web.json_response({**answer, "choices": [choice], "usage": usage})


@pytest.fixture(scope="module")
def gateway(pair_gateway: PairGateway) -> Iterator[GatewayProcess]:
    with (
        serve_app({"/v1/chat/completions": _chat}, name="retry-after-upstream") as served,
        pair_gateway("retry-after", extra_models=_MODELS.format(url=served.url)) as process,
    ):
        yield process


@pytest.fixture
def script() -> Iterator[_Scripted]:
    _SCRIPT.answers.clear()
    _SCRIPT.arrivals.clear()
    yield _SCRIPT
    _SCRIPT.answers.clear()


def _openai(gateway: GatewayProcess, max_retries: int = 0) -> openai.OpenAI:
    return closed_after_test(
        openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=max_retries, timeout=15)
    )


def test_an_azure_429_is_retried_after_its_retry_after_ms(gateway: GatewayProcess, script: _Scripted) -> None:
    """The policy's ``max_retry_after_s`` is 2 s: a wait of 1.5 s is waited out, then the retry answers."""
    script.answers.append((429, {"retry-after-ms": "1500"}))
    answer = _openai(gateway).chat.completions.create(model="azure", messages=_MESSAGES)
    assert answer.choices[0].message.content == "hi"
    assert len(script.arrivals) == 2 and script.gaps()[0] >= 1.4, script.gaps()


def test_a_429_with_only_retry_after_ms_tells_the_client_when_to_come_back(
    gateway: GatewayProcess, script: _Scripted
) -> None:
    """The client got a 429 with no Retry-After at all, which the README promises."""
    script.answers.extend([(429, {"retry-after-ms": "1500"})] * 2)
    with pytest.raises(openai.RateLimitError) as caught:
        _openai(gateway).chat.completions.create(model="azure", messages=_MESSAGES)
    assert caught.value.response.headers["retry-after"] == "2"  # whole seconds, rounded up
    assert caught.value.response.headers["x-should-retry"] == "false"  # the gateway's retries are spent
    assert len(script.arrivals) == 2 and script.gaps()[0] >= 1.4, script.gaps()


def test_an_upstream_503_saying_when_to_come_back_is_told_to_the_client(
    gateway: GatewayProcess, script: _Scripted
) -> None:
    """A 503 with Retry-After is HTTP's "unavailable, come back later": the client is told so, as a
    429's wait is told. A day is longer than the route waits, so the SDKs (which retry a 503, the
    Anthropic SDK sleeping any Retry-After) are told not to: each asks the upstream once."""
    script.answers.append((503, {"retry-after": "86400"}))
    with pytest.raises(openai.InternalServerError) as caught:
        _openai(gateway, max_retries=2).chat.completions.create(model="azure", messages=_MESSAGES)
    told = caught.value.response
    assert (told.status_code, told.headers["retry-after"], told.headers["x-should-retry"]) == (503, "86400", "false")
    assert caught.value.code == "upstream_error" and len(script.arrivals) == 1
    script.answers.append((503, {"retry-after": "86400"}))
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=2, timeout=15))
    with pytest.raises(anthropic.APIStatusError) as refused:
        claude.messages.create(model="azure", max_tokens=20, messages=[{"role": "user", "content": "hello"}])
    heard = refused.value.response
    assert (heard.status_code, heard.headers["retry-after"], heard.headers["x-should-retry"]) == (503, "86400", "false")
    assert len(script.arrivals) == 2


def test_an_upstream_503_that_says_no_when_is_a_503_all_the_same(gateway: GatewayProcess, script: _Scripted) -> None:
    """f222: an upstream's 503 without Retry-After (OpenAI's "engine is currently overloaded") reached
    the client as a 502, a broken upstream's status, once the route's two attempts were spent, where
    Anthropic's overload (529) reaches an OpenAI client as a 503. It is a 503: unavailable for now,
    with no wait to tell, and its SDKs told not to retry what the gateway retried."""
    script.answers.extend([(503, {})] * 2)
    with pytest.raises(openai.InternalServerError) as caught:
        _openai(gateway, max_retries=2).chat.completions.create(model="azure", messages=_MESSAGES)
    told = caught.value.response
    assert (told.status_code, told.headers["x-should-retry"], "retry-after" in told.headers) == (503, "false", False)
    assert caught.value.code == "upstream_error" and len(script.arrivals) == 2
    record = gateway.wait_for_record(told.headers["x-request-id"])
    assert (record["status"], record["error_type"], record["upstream_status"]) == (503, "upstream_error", 503)
    script.answers.extend([(503, {})] * 2)
    claude = closed_after_test(anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=2, timeout=15))
    with pytest.raises(anthropic.ServiceUnavailableError) as refused:
        claude.messages.create(model="azure", max_tokens=20, messages=[{"role": "user", "content": "hello"}])
    assert refused.value.response.headers["x-should-retry"] == "false" and len(script.arrivals) == 4


def test_a_503_with_retry_after_ms_is_waited_for_then_told(gateway: GatewayProcess, script: _Scripted) -> None:
    script.answers.extend([(503, {"retry-after-ms": "1500"})] * 2)
    with pytest.raises(openai.InternalServerError) as caught:
        _openai(gateway).chat.completions.create(model="azure", messages=_MESSAGES)
    told = caught.value.response
    assert (told.status_code, told.headers["retry-after"], told.headers["x-should-retry"]) == (503, "2", "false")
    assert len(script.arrivals) == 2 and script.gaps()[0] >= 1.4, script.gaps()


def test_a_wait_that_is_no_number_of_seconds_is_no_wait(gateway: GatewayProcess, script: _Scripted) -> None:
    """``inf`` and ``nan`` parse as floats: a 429 saying ``Retry-After: inf`` was a 500 (no header can
    be made of it). Such a wait is not one: the retry comes after the route's backoff."""
    script.answers.append((429, {"retry-after": "inf", "retry-after-ms": "nan"}))
    answer = _openai(gateway).chat.completions.create(model="azure", messages=_MESSAGES)
    assert answer.choices[0].message.content == "hi" and len(script.arrivals) == 2


def test_a_retry_after_ms_of_no_time_leaves_the_retry_after_in_force(
    gateway: GatewayProcess, script: _Scripted
) -> None:
    """t181: ``retry-after-ms: 0`` (or below) beside ``retry-after: 30`` was read as no wait: retried at
    once and the client told 1 s. The openai SDK takes a ``retry-after-ms`` only above 0."""
    script.answers.extend([(429, {"retry-after-ms": ms, "retry-after": "30"}) for ms in ("0", "-500")])
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            _openai(gateway).chat.completions.create(model="azure", messages=_MESSAGES)
        assert caught.value.response.headers["retry-after"] == "30"  # longer than the route waits: not retried
    assert len(script.arrivals) == 2
