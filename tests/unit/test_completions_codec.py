"""The legacy Completions codec (``POST /v1/completions``) and the chat codec it is paired with, without a server."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.core.model import Answer, Message, TextPart, ThinkingPart, ToolCall, Usage
from gateway.errors import InvalidRequestError
from gateway.protocols import openai_chat
from gateway.protocols import openai_completions as completions
from gateway.protocols.engine_fields import SAMPLING_FIELDS


def _decode(**body: Any) -> completions.Completion:
    return completions.decode_request(msgspec.json.encode({"model": "m", "prompt": "Say hi", **body}))


def test_a_prompt_becomes_one_user_message_with_openais_default_max_tokens() -> None:
    decoded = _decode()
    request = decoded.request
    assert request.model == "m" and request.messages == [Message("user", (TextPart("Say hi"),))]
    assert request.max_tokens == completions.DEFAULT_MAX_TOKENS == 16
    assert request.stream is False and request.dropped == [] and decoded.echo is None
    assert openai_chat.to_chat_body(decoded.request) == {
        "model": "m",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 16,
    }


def test_a_list_of_one_string_is_the_prompt() -> None:
    assert _decode(prompt=["Once upon a time"]).request.messages[0].text == "Once upon a time"


def test_sampling_fields_are_carried_into_the_chat_body() -> None:
    decoded = _decode(
        max_tokens=40, temperature=0.2, top_p=0.9, stop="\n", user="u-1", seed=7, presence_penalty=0.5,
        frequency_penalty=-0.5, logit_bias={"50256": -100}, n=1, best_of=1, suffix=None, logprobs=None, echo=False,
    )  # fmt: skip
    assert decoded.request.stop == ["\n"] and decoded.request.dropped == []
    body = openai_chat.to_chat_body(decoded.request)
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 40, "temperature": 0.2,
        "top_p": 0.9, "stop": ["\n"], "user": "u-1", "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100},
    }  # fmt: skip


def test_more_stop_strings_than_openai_takes_are_the_upstreams_to_judge() -> None:
    """vLLM takes any number (found by an outside tester: the gateway refused a fifth)."""
    stops = ["\n\n", "###", "END", "</s>", "Q:", "User:"]
    assert openai_chat.to_chat_body(_decode(stop=stops).request)["stop"] == stops


def test_a_stream_asks_the_pipeline_for_usage_and_remembers_whether_the_client_did() -> None:
    plain = _decode(stream=True)
    assert openai_chat.to_chat_body(plain.request)["stream_options"] == {"include_usage": True}
    assert plain.include_usage is False
    assert _decode(stream=True, stream_options={"include_usage": True}).include_usage is True
    assert _decode(stream=True, stream_options={"include_usage": False}).include_usage is False


def test_fields_outside_the_api_are_named_as_dropped() -> None:
    decoded = _decode(vendor_option=5, request_id="fixed-id")
    assert decoded.request.dropped == ["request_id", "vendor_option"]
    assert "vendor_option" not in openai_chat.to_chat_body(decoded.request)


def test_vllms_sampling_fields_are_carried_into_the_chat_body_as_a_chat_client_sends_them() -> None:
    """f213: a chat body takes them on to vLLM; a completions client's went nowhere."""
    decoded = _decode(top_k=20, min_p=0.05, repetition_penalty=1.05, stop_token_ids=[7], allowed_token_ids=None)
    assert decoded.request.dropped == []
    body = openai_chat.to_chat_body(decoded.request)
    assert {name: body[name] for name in SAMPLING_FIELDS if name in body} == {
        "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05, "stop_token_ids": [7]
    }  # fmt: skip


def test_echo_keeps_the_prompt_for_the_answer() -> None:
    assert _decode(echo=True).echo == "Say hi"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": ["one", "two"]}, "prompt", "2 prompts were given; only a single text prompt is supported"),
        ({"prompt": []}, "prompt", "only a single text prompt is supported"),
        ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts are not supported; only a single text prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt", "token-id prompts are not supported"),
        ({"prompt": ["a", 1]}, "prompt", "only a single text prompt is supported"),
        ({"prompt": 5}, "prompt", "invalid parameter 'prompt'"),
        ({"n": 2}, "n", "only n=1 is supported"),
        ({"best_of": 3}, "best_of", "best_of > 1 is not supported"),
        ({"suffix": "end"}, "suffix", "not supported"),
        ({"logprobs": 2}, "logprobs", "not supported"),
        ({"logprobs": 0}, "logprobs", "not supported"),
        ({"max_tokens": 0}, "max_tokens", "invalid parameter 'max_tokens'"),
        ({"temperature": 3}, "temperature", "invalid parameter 'temperature'"),
        ({"stop": 5}, "stop", "invalid parameter 'stop'"),
        ({"model": ""}, "model", "invalid parameter 'model'"),
    ],
)
def test_bad_requests_are_400s_that_name_the_parameter(body: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        _decode(**body)
    assert raised.value.status_code == 400 and raised.value.error_type == "invalid_request_error"
    assert raised.value.param == param and says in raised.value.message


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"prompt": "x"}', "model: Field required"),
        (b'{"model": "m"}', "prompt: Field required"),
        (b"", "empty"),
        (b"{nope", "not valid JSON"),
        (b'["m"]', "must be a JSON object"),
    ],
)
def test_malformed_bodies_are_400s(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        completions.decode_request(raw)
    assert says in raised.value.message


def test_an_answer_is_a_text_completion_with_the_model_the_client_asked() -> None:
    chat = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "small-v2",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " there"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25},
    }  # fmt: skip
    answer = openai_chat.answer_from_completion(chat)
    body = msgspec.json.decode(completions.encode_answer(answer, "cmpl-abc", "fast", 1700000000))
    assert body == {
        "id": "cmpl-abc", "object": "text_completion", "created": 1700000000, "model": "fast",
        "choices": [{"text": " there", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "wire"),
    [("stop", "stop"), ("stop_sequence", "stop"), (None, None), ("length", "length"),
     ("content_filter", "content_filter"), ("tool_calls", "stop")],
)  # fmt: skip
def test_finish_reasons(reason: Any, wire: str | None) -> None:
    """None: the upstream said no reason, which goes as it came, as chat's does (f179: ``stop`` said it was whole)."""
    answer = Answer(id="x", model="m", text="t", finish_reason=reason)
    assert msgspec.json.decode(completions.encode_answer(answer, "c", "m", 1))["choices"][0]["finish_reason"] == wire


def test_echo_puts_the_prompt_before_the_text() -> None:
    answer = Answer(id="x", model="m", text=" world", usage=Usage(input_tokens=3, output_tokens=2))
    body = msgspec.json.decode(completions.encode_answer(answer, "c", "m", 1, echo="Hello"))
    assert body["choices"][0]["text"] == "Hello world"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def _frames(stream: bytes) -> list[Any]:
    out: list[Any] = []
    for frame in stream.strip().split(b"\n\n"):
        assert frame.startswith(b"data: ")
        data = frame[6:]
        out.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
    return out


_CHUNKS: list[dict[str, Any]] = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
]


def _stream(encoder: completions.StreamEncoder) -> list[Any]:
    reader = openai_chat.ChunkReader()
    raw = encoder.start() + b"".join(encoder.feed(reader.read(chunk)) for chunk in _CHUNKS) + encoder.finish()
    return _frames(raw)


def test_a_stream_is_text_frames_a_finish_frame_the_usage_frame_and_done() -> None:
    frames = _stream(completions.StreamEncoder("cmpl-1", "fast", created=123, include_usage=True))
    head = {"id": "cmpl-1", "object": "text_completion", "created": 123, "model": "fast"}
    assert frames == [
        {**head, "choices": [{"text": "Hel", "index": 0, "logprobs": None, "finish_reason": None}]},
        {**head, "choices": [{"text": "lo", "index": 0, "logprobs": None, "finish_reason": None}]},
        {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
        "[DONE]",
    ]


def test_a_stream_without_include_usage_has_no_usage_frame_and_echo_comes_first() -> None:
    frames = _stream(completions.StreamEncoder("cmpl-1", "fast", echo="Say: "))
    assert frames[-1] == "[DONE]"
    assert all("usage" not in frame for frame in frames[:-1])
    assert [frame["choices"][0]["text"] for frame in frames[:-1]] == ["Say: ", "Hel", "lo", ""]
    assert frames[-2]["choices"][0]["finish_reason"] == "stop"
    assert isinstance(frames[0]["created"], int)


def test_a_replayed_answer_reports_its_reasoning_tokens() -> None:
    """A cache hit's usage dropped completion_tokens_details.reasoning_tokens (t12: 90 became None)."""
    answer = Answer(id="c", model="m", text="42", finish_reason="stop",
                    usage=Usage(input_tokens=10, output_tokens=100, reasoning_tokens=90))  # fmt: skip
    whole = msgspec.json.decode(openai_chat.completion_from_answer(answer, answer.usage))
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 90}
    events = openai_chat.stream_from_answer(answer, 0, include_usage=True)
    last = msgspec.json.decode(events[-2].removeprefix(b"data: "))
    assert last["usage"]["completion_tokens_details"] == {"reasoning_tokens": 90}


def test_a_replayed_tool_call_stream_opens_with_null_content_as_openai_does() -> None:
    """t100: a cached tool call streamed back opened with content "", so the SDK's assembled
    message said "" on a hit and None live; an answer with text still opens with ""."""
    calls = Answer(id="c", model="m", tool_calls=[ToolCall("call_1", "f", "{}")], finish_reason="tool_calls")
    first = msgspec.json.decode(
        openai_chat.stream_from_answer(calls, 0, include_usage=False)[0].removeprefix(b"data: ")
    )
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
    text = Answer(id="c", model="m", text="Hi", finish_reason="stop")
    first = msgspec.json.decode(openai_chat.stream_from_answer(text, 0, include_usage=False)[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_a_replay_opens_as_its_first_chunk_says_like_a_live_claude_stream() -> None:
    """Reasoning before a tool call opens with "" live (the first chunk is reasoning), so the
    replay of that answer does too; the final message is then the same on a hit and live."""
    answer = Answer(
        id="c",
        model="m",
        thinking=[ThinkingPart("Let me look it up.", "")],
        tool_calls=[ToolCall("call_1", "f", "{}")],
        finish_reason="tool_calls",
    )
    first = msgspec.json.decode(
        openai_chat.stream_from_answer(answer, 0, include_usage=False)[0].removeprefix(b"data: ")
    )
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
