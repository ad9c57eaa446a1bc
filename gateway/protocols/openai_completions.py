"""OpenAI's legacy Completions (``POST /v1/completions``): a text prompt in, a text completion out.

The prompt becomes one user message of a chat request, answered by the chat pipeline.
Only what a chat upstream can honour is accepted: one text prompt (a string, or a list
of one string), ``n`` of 1, no ``suffix``, ``best_of`` or ``logprobs``; ``echo`` is
honoured by putting the prompt before the answer's text. ``max_tokens`` defaults to 16,
as in OpenAI's API. ``seed``, ``presence_penalty``, ``frequency_penalty`` and
``logit_bias`` mean the same in a chat request and are carried into it as they are, as are
vLLM's sampling fields (``top_k``, ``min_p``, ...: :data:`SAMPLING_FIELDS`), which a chat body
takes on, and the engine fields the caller's key may send (``engine_fields``); other fields the
API does not define are named in ``Request.dropped``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from gateway.core.model import (
    Answer,
    Delta,
    Finish,
    FinishReason,
    Message,
    RefusalDelta,
    Request,
    TextDelta,
    TextPart,
    Usage,
    UsageReport,
)
from gateway.errors import InvalidRequestError
from gateway.protocols.body import check_fields, decode_body, refuse_options_without_stream
from gateway.protocols.engine_fields import SAMPLING_FIELDS, check_kept
from gateway.protocols.openai_fields import BestOf, ChoiceCount, MaxTokens, Penalty, Stop, Temperature, TopP

__all__ = ["DEFAULT_MAX_TOKENS", "Completion", "StreamEncoder", "decode_request", "encode_answer"]

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for the legacy API when ``max_tokens`` is absent."""

_SINGLE_PROMPT = "only a single text prompt is supported (a string, or a list of one string)"


class _View(msgspec.Struct, forbid_unknown_fields=False):
    pass


class _StreamOptions(_View):
    include_usage: bool = False


class _CompletionsRequest(_View):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str | list[Any]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: ChoiceCount | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: BestOf | None = None
    logprobs: int | None = None
    user: str | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None


_KNOWN = frozenset(_CompletionsRequest.__struct_fields__) | SAMPLING_FIELDS
_CARRIED = frozenset({"seed", "presence_penalty", "frequency_penalty", "logit_bias"}) | SAMPLING_FIELDS
"""Fields a chat request has with the same meaning: carried in the request's ``extra`` as they came
(null: not set)."""


@dataclass(slots=True)
class Completion:
    """A decoded completions request: the internal request and what only this protocol needs."""

    request: Request
    echo: str | None = None
    """With ``echo``: the prompt, to put before the answer's text."""
    include_usage: bool = False
    """``stream_options.include_usage``: a usage frame before ``[DONE]``."""


def decode_request(raw: bytes, engine_fields: frozenset[str] = frozenset()) -> Completion:
    """``engine_fields``: the engine fields the caller's key may send on, carried as a chat body's are."""
    body = decode_body(raw, dict[str, Any])
    known, carried = (_KNOWN | engine_fields, _CARRIED | engine_fields) if engine_fields else (_KNOWN, _CARRIED)
    check_kept(body, engine_fields)
    wire = check_fields(body, _CompletionsRequest)
    prompt = _prompt(wire.prompt)
    refuse_options_without_stream(wire.stream, wire.stream_options)
    _refuse_what_a_chat_upstream_cannot_do(wire)
    stop = [wire.stop] if isinstance(wire.stop, str) else list(wire.stop or [])
    request = Request(
        model=wire.model,
        messages=[Message("user", (TextPart(prompt),))],
        max_tokens=wire.max_tokens if wire.max_tokens is not None else DEFAULT_MAX_TOKENS,
        temperature=wire.temperature,
        top_p=wire.top_p,
        stop=stop,
        stream=bool(wire.stream),
        user=wire.user,
        dropped=sorted(name for name in body if name not in known),
        extra={name: value for name, value in body.items() if name in carried and value is not None},
    )
    return Completion(
        request=request,
        echo=prompt if wire.echo else None,
        include_usage=bool(wire.stream and wire.stream_options and wire.stream_options.include_usage),
    )


def _prompt(prompt: str | list[Any]) -> str:
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise InvalidRequestError(f"invalid parameter 'prompt': the list is empty; {_SINGLE_PROMPT}", param="prompt")
    if all(isinstance(item, str) for item in prompt):
        if len(prompt) == 1:
            return str(prompt[0])
        raise InvalidRequestError(
            f"invalid parameter 'prompt': {len(prompt)} prompts were given; {_SINGLE_PROMPT}", param="prompt"
        )
    if all(isinstance(item, int | list) for item in prompt):
        raise InvalidRequestError(
            f"invalid parameter 'prompt': token-id prompts are not supported; {_SINGLE_PROMPT}", param="prompt"
        )
    raise InvalidRequestError(f"invalid parameter 'prompt': {_SINGLE_PROMPT}", param="prompt")


def _refuse_what_a_chat_upstream_cannot_do(wire: _CompletionsRequest) -> None:
    if wire.n is not None and wire.n != 1:
        raise InvalidRequestError("invalid parameter 'n': only n=1 is supported", param="n")
    if wire.best_of is not None and wire.best_of > 1:
        raise InvalidRequestError("invalid parameter 'best_of': best_of > 1 is not supported", param="best_of")
    if wire.suffix:
        raise InvalidRequestError("invalid parameter 'suffix': suffix (insertion) is not supported", param="suffix")
    if wire.logprobs is not None:
        raise InvalidRequestError("invalid parameter 'logprobs': logprobs are not supported", param="logprobs")


_FINISH: dict[FinishReason, str] = {
    "stop": "stop",
    "stop_sequence": "stop",
    "tool_calls": "stop",
    "length": "length",
    "model_context_window_exceeded": "length",
    "content_filter": "content_filter",
}


def _finish(reason: FinishReason | None, other: str | None = None) -> str | None:
    """The legacy API's reason; one the internal model has no name for goes as it came, as chat's
    does, and so does none at all (f179: ``stop`` would say the answer is whole)."""
    return other or (None if reason is None else _FINISH.get(reason, "stop"))


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def encode_answer(answer: Answer, completion_id: str, model: str, created: int, echo: str | None = None) -> bytes:
    """A ``text_completion`` object; ``model`` is the one the client asked for."""
    text = (echo or "") + (answer.text or "") + (answer.refusal or "")
    choice: dict[str, Any] = {
        "text": text,
        "index": 0,
        "logprobs": None,
        "finish_reason": _finish(answer.finish_reason, answer.other_finish),
    }
    if answer.stop_sequence:
        choice["stop_reason"] = answer.stop_sequence  # the stop string, as vLLM names it (t55)
    body = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(answer.usage),
    }
    return msgspec.json.encode(body)


class StreamEncoder:
    """Deltas to legacy completion frames: text deltas, a frame with the finish reason, usage if asked, ``[DONE]``."""

    __slots__ = ("_created", "_echo", "_finish", "_id", "_include_usage", "_model", "_other", "_stop", "_usage")

    def __init__(
        self,
        completion_id: str,
        model: str,
        *,
        created: int | None = None,
        echo: str | None = None,
        include_usage: bool = False,
    ) -> None:
        self._id = completion_id
        self._model = model
        self._created = created if created is not None else int(time.time())
        self._echo = echo
        self._include_usage = include_usage
        self._finish: FinishReason | None = None
        self._other: str | None = None
        self._stop: str | None = None
        self._usage = Usage()

    def start(self) -> bytes:
        """With ``echo``: the prompt as the first frame."""
        return self._frame(self._echo, None) if self._echo else b""

    def feed(self, deltas: list[Delta]) -> bytes:
        out = b""
        for delta in deltas:
            if isinstance(delta, TextDelta | RefusalDelta):  # a completion has no refusal: what was said
                out += self._frame(delta.text, None)
            elif isinstance(delta, Finish):
                self._finish, self._other, self._stop = delta.reason, delta.other, delta.stop_sequence
            elif isinstance(delta, UsageReport):
                self._usage = delta.usage
        return out

    def finish(self) -> bytes:
        out = self._frame("", _finish(self._finish, self._other), self._stop)
        if self._include_usage:
            out += self._data({**self._head(), "choices": [], "usage": _usage(self._usage)})
        return out + b"data: [DONE]\n\n"

    def _head(self) -> dict[str, Any]:
        return {"id": self._id, "object": "text_completion", "created": self._created, "model": self._model}

    def _frame(self, text: str, finish_reason: str | None, stop: str | None = None) -> bytes:
        choice: dict[str, Any] = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        if stop:
            choice["stop_reason"] = stop
        return self._data({**self._head(), "choices": [choice]})

    @staticmethod
    def _data(payload: dict[str, Any]) -> bytes:
        return b"data: " + msgspec.json.encode(payload) + b"\n\n"
