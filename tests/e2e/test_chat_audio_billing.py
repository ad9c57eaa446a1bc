"""Chat audio and web search billed at their own prices, with the openai SDK (t150).

OpenAI bills a chat answer's audio tokens (``completion_tokens_details.audio_tokens``) and a
prompt's (``prompt_tokens_details.audio_tokens``) several times the text rate (gpt-4o-audio's
output about 8x), and each request to its search models (``web_search_options``) a search fee.
Billed at the text prices they understated the spend, as Anthropic's fast mode did (t59): a
request asking for audio, or for a search, on a model whose ``price`` has none is refused
before it is sent; a priced one is billed at ``price.audio_input``/``audio_output`` and
``server_tools.web_search``. The loopback upstream answers as OpenAI's audio model does, with
the audio token counts in its usage, streamed or not.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web

from gateway.auth import hash_key
from tests.conftest import PairGateway, closed_after_test
from tests.gateway_process import GatewayProcess
from tests.loopback_app import RecordingUpstream, serve_recording

_MODELS = """
  voice:
    base_url: {url}/v1
    upstream_model: gpt-4o-audio-preview
    price: {{input: 2.5, output: 10, audio_input: 40, audio_output: 80}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  voiceless:
    base_url: {url}/v1
    upstream_model: gpt-4o
    price: {{input: 2.5, output: 10}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
  searcher:
    base_url: {url}/v1
    upstream_model: gpt-4o-search-preview
    price: {{input: 2.5, output: 10, server_tools: {{web_search: 25}}}}
    tier: large
    timeouts: {{connect: 2, first_byte: 5, total: 10}}
"""
_ROUTES = """
  voice-r: {model: voice}
  voiceless-r: {model: voiceless}
  searcher-r: {model: searcher}
  voice-or-voiceless: {model: voice, fallbacks: [voiceless]}
"""
_KEYS = """
auth:
  mode: keys
  keys:
    - {id: open, tenant: acme, hash: "%(open)s"}
    - {id: thrifty, tenant: frugal, hash: "%(thrifty)s", limits: {usd_per_day: 0.005}}
""" % {name: hash_key(f"key-{name}") for name in ("open", "thrifty")}

_USAGE: dict[str, Any] = {
    "prompt_tokens": 100,
    "completion_tokens": 200,
    "total_tokens": 300,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 40},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 150},
}
"""What the upstream says an answer with audio used: 40 of the prompt's tokens and 150 of the answer's audio."""
_AUDIO_USD = (60 * 2.5 + 40 * 40 + 50 * 10 + 150 * 80) / 1_000_000
"""``_USAGE`` on ``voice``: text at the text prices, audio at the audio ones."""
_TEXT_USAGE: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
_TEXT_USD = (10 * 2.5 + 3 * 10) / 1_000_000
_WAV = base64.b64encode(b"RIFF....WAVEfmt ").decode()
_SPEAK: Any = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
_ASK: Any = [{"role": "user", "content": "Say hello."}]
_HEARD: Any = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is said here?"},
            {"type": "input_audio", "input_audio": {"data": _WAV, "format": "wav"}},
        ],
    }
]

_SPOKEN_BACK: Any = [*_ASK, {"role": "assistant", "audio": {"id": "audio_1"}}, {"role": "user", "content": "Again."}]
"""A spoken answer sent back by its id: OpenAI bills it as prompt audio."""


def _speaks(body: dict[str, Any]) -> bool:
    return "audio" in (body.get("modalities") or ())


def _usage(body: dict[str, Any]) -> dict[str, Any]:
    heard = any(
        isinstance(part, dict) and part.get("type") == "input_audio"
        for message in body["messages"]
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )
    return _USAGE if heard or _speaks(body) else _TEXT_USAGE


def _message(body: dict[str, Any]) -> dict[str, Any]:
    if not _speaks(body):
        return {"role": "assistant", "content": "Hello."}
    audio = {"id": "audio_1", "data": _WAV, "expires_at": 2_000_000_000, "transcript": "Hello."}
    return {"role": "assistant", "content": None, "audio": audio}


async def _chat(request: web.Request, upstream: RecordingUpstream) -> web.StreamResponse:
    body = await request.json()
    upstream.bodies.append(body)
    head = {"id": "chatcmpl-a", "created": 1, "model": body["model"]}
    if not body.get("stream"):
        choice = {"index": 0, "message": _message(body), "finish_reason": "stop", "logprobs": None}
        return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": _usage(body)})
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**head, "object": "chat.completion.chunk"}
    delta = {"role": "assistant", "audio": {"id": "audio_1", "transcript": "Hello."}}
    choices: list[Any] = [
        [{"index": 0, "delta": delta, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    ]
    for one in choices:
        await response.write(b"data: " + msgspec.json.encode({**chunk, "choices": one}) + b"\n\n")
    await response.write(b"data: " + msgspec.json.encode({**chunk, "choices": [], "usage": _usage(body)}) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture(scope="module")
def audio_upstream() -> Iterator[RecordingUpstream]:
    with serve_recording({"/v1/chat/completions": _chat}, name="audio-upstream") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(
    pair_gateway: PairGateway,
    audio_upstream: RecordingUpstream,
) -> Iterator[GatewayProcess]:
    models = _MODELS.format(url=audio_upstream.url)
    with pair_gateway("audio", auth=_KEYS, extra_models=models, routes=_ROUTES, edit=_pair_hears_audio) as process:
        yield process


def _pair_hears_audio(policy: str) -> str:
    for text_price in ("price: {input: 0.5, output: 1.5}", "price: {input: 5, output: 15}"):
        policy = policy.replace(text_price, text_price[:-1] + ", audio_input: 20}", 1)
    return policy


def _client(gateway: GatewayProcess, key: str = "open") -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gateway.base_url, api_key=f"key-{key}", max_retries=0, timeout=15))


def test_audio_tokens_are_billed_at_the_audio_prices(gateway: GatewayProcess) -> None:
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="voice-r", messages=_HEARD, **_SPEAK, extra_headers={"x-request-id": "audio-whole"}
    )
    completion = raw.parse()
    assert completion.choices[0].message.audio is not None
    assert completion.choices[0].message.audio.transcript == "Hello."
    record = gateway.wait_for_record("audio-whole")
    assert (record["audio_prompt_tokens"], record["audio_completion_tokens"]) == (40, 150)
    assert record["cost_usd"] == pytest.approx(_AUDIO_USD, rel=1e-6)
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(_AUDIO_USD, rel=1e-6)


def test_a_streamed_audio_answer_is_billed_at_the_audio_prices(gateway: GatewayProcess) -> None:
    stream = _client(gateway).chat.completions.create(
        model="voice-r",
        messages=_ASK,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "audio-stream"},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage and usage[-1].completion_tokens == 200
    record = gateway.wait_for_record("audio-stream")
    assert (record["audio_prompt_tokens"], record["audio_completion_tokens"]) == (40, 150)
    assert record["cost_usd"] == pytest.approx(_AUDIO_USD, rel=1e-6)


@pytest.mark.parametrize(
    ("route", "asked", "param", "field"),
    [
        ("voiceless-r", {"messages": _ASK, **_SPEAK}, "modalities", "models.voiceless.price.audio_output"),
        ("voiceless-r", {"messages": _ASK, "audio": _SPEAK["audio"]}, "audio", "models.voiceless.price.audio_output"),
        ("voiceless-r", {"messages": _ASK, "audio": {}}, "audio", "models.voiceless.price.audio_output"),  # t159
        ("voiceless-r", {"messages": _HEARD}, "messages", "models.voiceless.price.audio_input"),
        ("voiceless-r", {"messages": _SPOKEN_BACK}, "messages", "models.voiceless.price.audio_input"),
        ("voice-or-voiceless", {"messages": _ASK, **_SPEAK}, "modalities", "models.voiceless.price.audio_output"),
        ("voiceless-r", {"messages": _ASK, "web_search_options": {}}, "web_search_options",
         "models.voiceless.price.server_tools.web_search"),
        ("voice-r", {"messages": _ASK, "web_search_options": {}}, "web_search_options",
         "models.voice.price.server_tools.web_search"),
    ],
)  # fmt: skip
def test_audio_or_a_search_the_policy_does_not_price_is_refused_unsent(
    gateway: GatewayProcess,
    audio_upstream: RecordingUpstream,
    route: str,
    asked: dict[str, Any],
    param: str,
    field: str,
) -> None:
    sent = len(audio_upstream.bodies)
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway).chat.completions.create(model=route, **asked)
    assert refused.value.param == param
    assert field in refused.value.message and "billed above the base price" in refused.value.message
    assert len(audio_upstream.bodies) == sent


@pytest.mark.parametrize("route", ["voiceless-r", "voice-r"])
def test_modalities_that_are_not_a_list_are_refused_unsent(
    gateway: GatewayProcess, audio_upstream: RecordingUpstream, route: str
) -> None:
    """t159: ``"modalities": "audio"`` went upstream unpriced, read as asking for no audio; OpenAI
    refuses a string there."""
    sent = len(audio_upstream.bodies)
    with pytest.raises(openai.BadRequestError) as refused:
        _client(gateway).chat.completions.create(model=route, messages=_ASK, extra_body={"modalities": "audio"})
    assert refused.value.param == "modalities" and "array" in refused.value.message
    assert len(audio_upstream.bodies) == sent


def test_text_on_a_voiceless_model_needs_no_audio_price(gateway: GatewayProcess) -> None:
    """``modalities: ["text"]`` asks for no audio; the upstream's usage says none."""
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="voiceless-r", messages=_ASK, modalities=["text"], extra_headers={"x-request-id": "text-only"}
    )
    assert raw.parse().choices[0].message.content == "Hello."
    assert gateway.wait_for_record("text-only")["cost_usd"] > 0


def test_a_chat_search_is_billed_one_search_fee(gateway: GatewayProcess, audio_upstream: RecordingUpstream) -> None:
    """OpenAI's search models bill each chat request one search; its usage does not count them."""
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="searcher-r",
        messages=_ASK,
        web_search_options={"search_context_size": "low"},
        extra_headers={"x-request-id": "chat-search"},
    )
    assert raw.parse().choices[0].message.content == "Hello."
    assert audio_upstream.bodies[-1]["web_search_options"] == {"search_context_size": "low"}
    record = gateway.wait_for_record("chat-search")
    assert record["server_tool_requests"] == {"web_search": 1}
    assert record["cost_usd"] == pytest.approx(_TEXT_USD + 25 / 1000, rel=1e-6)


def test_budgets_reserve_the_audio_and_search_prices(
    gateway: GatewayProcess, audio_upstream: RecordingUpstream
) -> None:
    """100 completion tokens at $10 are $0.001, under the $0.005 a day; at the $80 of audio, or
    with a $0.025 search, the estimate is over it, and the request is refused unsent."""
    thrifty = _client(gateway, "thrifty")
    sent = len(audio_upstream.bodies)
    with pytest.raises(openai.RateLimitError) as audio:
        thrifty.chat.completions.create(model="voice-r", messages=_ASK, max_tokens=100, **_SPEAK)
    assert "usd_per_day" in audio.value.message
    with pytest.raises(openai.RateLimitError):
        thrifty.chat.completions.create(model="searcher-r", messages=_ASK, max_tokens=100, web_search_options={})
    assert len(audio_upstream.bodies) == sent
    assert thrifty.chat.completions.create(model="voice-r", messages=_ASK, max_tokens=100).choices


def test_a_prompt_of_audio_leans_large(gateway: GatewayProcess) -> None:
    """The router cannot hear it: scored on its caption alone, "Summarize this." went small (t64)."""
    heard: Any = [{"role": "user", "content": [{"type": "text", "text": "Summarize this."}, _HEARD[0]["content"][1]]}]
    raw = _client(gateway).chat.completions.with_raw_response.create(model="auto", messages=heard)
    assert raw.headers["x-gateway-decision"] == "unreadable"
    assert float(raw.headers["x-gateway-p-large"]) == 1.0
