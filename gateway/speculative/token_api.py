"""A client for the token-level API of vLLM's OpenAI-compatible server.

``/tokenize`` and ``/detokenize`` live at the server root, ``/v1/completions`` takes a
prompt given as token ids. Token ids come back as ``"token_id:123"`` strings when
``return_tokens_as_token_ids`` is set; ``prompt_logprobs`` entries are keyed by the id.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import msgspec

from gateway.errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError, UpstreamTimeoutError
from gateway.upstreams.base import Provider, UpstreamEvents

_Decoded = TypeVar("_Decoded")

__all__ = ["Generation", "TokenAPI", "server_root"]


class _PromptLogprob(msgspec.Struct):
    logprob: float
    rank: int | None = None


class _Logprobs(msgspec.Struct):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None


class _Choice(msgspec.Struct):
    text: str = ""
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None
    prompt_logprobs: list[dict[str, _PromptLogprob] | None] | None = None


class _CompletionResponse(msgspec.Struct):
    choices: list[_Choice]
    prompt_logprobs: list[dict[str, _PromptLogprob] | None] | None = None
    """Some vLLM versions put it here rather than in the choice."""


class _Tokenized(msgspec.Struct):
    tokens: list[int]
    max_model_len: int | None = None


class _Detokenized(msgspec.Struct):
    prompt: str


_decode_completion = msgspec.json.Decoder(_CompletionResponse).decode
_decode_tokenized = msgspec.json.Decoder(_Tokenized).decode
_decode_detokenized = msgspec.json.Decoder(_Detokenized).decode

Distribution = dict[int, float]
"""Token id → logprob, for the tokens the server returned (top-n plus the chosen one)."""


@dataclass(slots=True)
class Generation:
    tokens: list[int]
    finish_reason: str | None
    top: list[Distribution] | None = None
    """Per generated token, the top-n logprobs (the chosen token included)."""
    prompt_top: list[Distribution | None] | None = None
    """For the last ``prompt_tail`` prompt positions: the actual token's and the top-n logprobs."""
    prompt_best: list[int | None] | None = None
    """For the last ``prompt_tail`` prompt positions: the rank-1 token (the large model's greedy choice)."""


def server_root(base_url: httpx.URL) -> str:
    """``http://host:port/v1/`` → ``http://host:port/`` (vLLM serves tokenization at the root);
    ``base_url`` without its query, which the provider puts on every call."""
    base = str(base_url).rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/"


_NEUTRAL_SAMPLING: dict[str, float] = {
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class TokenAPI:
    """The token-level calls of one server, through its provider's pooled client and error mapping."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self._root = server_root(provider.base_url)
        headers = {"content-type": "application/json", **provider.extra_headers}
        if provider.api_key:
            headers["authorization"] = f"Bearer {provider.api_key}"
        self._headers = headers
        self._cache_salt: str | None = None
        self._timeout_s: float | None = None

    def for_tenant(self, tenant: str | None, client_salt: object) -> TokenAPI:
        """These calls made for ``tenant``: its generations carry the prefix-cache salt its
        plain request carries (``tenant_cache_salt``), the client's own ``client_salt`` folded
        in as there (t176), so speculating opens no side channel."""
        own = {} if client_salt is None else {"cache_salt": client_salt}
        salt = self.provider.salted(own, tenant).get("cache_salt")
        if not isinstance(salt, str):
            return self
        view = copy.copy(self)
        view._cache_salt = salt
        return view

    def within(self, timeout_s: float) -> TokenAPI:
        """These calls, each given up after ``timeout_s`` (``UpstreamTimeoutError``) rather than
        the model's first-byte timeout."""
        view = copy.copy(self)
        view._timeout_s = timeout_s
        return view

    @property
    def name(self) -> str:
        return self.provider.name

    async def tokenize_chat(
        self, messages: list[Any], extra: dict[str, Any] | None = None
    ) -> tuple[list[int], int | None]:
        """The chat template applied to ``messages``, generation prompt added; also the server's max_model_len."""
        payload = {"model": self.provider.upstream_model, "messages": messages, "add_generation_prompt": True}
        if extra:
            payload.update(extra)
        data = await self._call(self._root + "tokenize", payload, _decode_tokenized)
        return data.tokens, data.max_model_len

    async def tokenize_text(self, text: str) -> list[int]:
        payload = {"model": self.provider.upstream_model, "prompt": text, "add_special_tokens": False}
        return (await self._call(self._root + "tokenize", payload, _decode_tokenized)).tokens

    async def detokenize(self, tokens: Sequence[int]) -> str:
        payload = {"model": self.provider.upstream_model, "tokens": list(tokens)}
        return (await self._call(self._root + "detokenize", payload, _decode_detokenized)).prompt

    async def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        temperature: float,
        logprobs: int | None = 1,
        prompt_logprobs: int | None = None,
        prompt_tail: int = 0,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> Generation:
        payload = self._completion_payload(prompt, max_tokens, temperature, logprobs, seed)
        if prompt_logprobs is not None:
            payload["prompt_logprobs"] = prompt_logprobs
        if logit_bias:
            payload["logit_bias"] = {str(k): v for k, v in logit_bias.items()}
        response = await self._call("completions", payload, _decode_completion)
        if not response.choices:
            raise UpstreamProtocolError(self.name, "completion has no choices")
        choice = response.choices[0]
        tokens, top = self._generated(choice.logprobs, logprobs is not None and logprobs > 1)
        generation = Generation(tokens, choice.finish_reason, top)
        raw_prompt = choice.prompt_logprobs if choice.prompt_logprobs is not None else response.prompt_logprobs
        if prompt_logprobs is not None:
            if raw_prompt is None or len(raw_prompt) != len(prompt):
                raise UpstreamProtocolError(self.name, "prompt_logprobs missing or not one per prompt token")
            tail = raw_prompt[len(raw_prompt) - prompt_tail :] if prompt_tail else []
            generation.prompt_top, generation.prompt_best = _prompt_tables(tail, prompt_logprobs > 1)
        return generation

    async def logprobs_scaled(self, prompt: Sequence[int]) -> tuple[bool, bool]:
        """Whether this server's (prompt, sampled) logprobs come after temperature scaling (vLLM's
        V0 engine; V1 started with ``--logprobs-mode processed_logprobs`` scales the sampled ones)
        rather than raw (V1's default). The verifier reads the first, the drafter the second.

        The same prompt at two temperatures: raw logprobs do not change, scaled ones do.
        """
        cold, warm = await asyncio.gather(
            *(
                self.generate(prompt, 1, temperature=t, logprobs=5, prompt_logprobs=5, prompt_tail=1, seed=0)
                for t in (0.5, 1.0)
            )
        )
        prompt_moved = _moved(cold.prompt_top[-1] if cold.prompt_top else None,
                              warm.prompt_top[-1] if warm.prompt_top else None)  # fmt: skip
        sampled_moved = _moved(cold.top[0] if cold.top else None, warm.top[0] if warm.top else None)
        return prompt_moved, sampled_moved

    async def stream_generate(
        self, prompt: Sequence[int], max_tokens: int, *, temperature: float, seed: int | None = None
    ) -> AsyncIterator[Generation]:
        """Plain decoding on this server, streamed: one :class:`Generation` per event that carries tokens."""
        payload = self._completion_payload(prompt, max_tokens, temperature, 1, seed)
        payload["stream"] = True
        response = await self.provider.post("completions", payload, self._headers, stream=True)
        events = UpstreamEvents(self.provider, response)
        try:
            while (event := await events.next()) is not None:
                if event.data == b"[DONE]":
                    return
                try:
                    chunk = _decode_completion(event.data)
                except msgspec.DecodeError:
                    raise _stream_failure(self.name, event.data) from None
                for choice in chunk.choices:
                    tokens, _ = self._generated(choice.logprobs, False)
                    if tokens or choice.finish_reason:
                        yield Generation(tokens, choice.finish_reason)
            raise UpstreamProtocolError(self.name, "stream ended before [DONE]")
        finally:
            await response.aclose()

    # -- helpers ---------------------------------------------------------------

    def _completion_payload(
        self, prompt: Sequence[int], max_tokens: int, temperature: float, logprobs: int | None, seed: int | None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.provider.upstream_model,
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
            # every sampling field explicit: a server's generation-config defaults must not
            # reach the loop's own calls (its tokens would not be the distribution it checks)
            **_NEUTRAL_SAMPLING,
        }
        if logprobs is not None:
            payload["logprobs"] = logprobs
        if seed is not None:
            payload["seed"] = seed
        if self._cache_salt is not None:
            payload["cache_salt"] = self._cache_salt
        return payload

    async def _call(self, path: str, payload: dict[str, Any], decode: Callable[[bytes], _Decoded]) -> _Decoded:
        # Provider.post is the shared plumbing: timeouts, transport and status errors → UpstreamError.
        if self._timeout_s is None:
            response = await self.provider.post(path, payload, self._headers, stream=False)
        else:
            try:
                async with asyncio.timeout(self._timeout_s):
                    response = await self.provider.post(path, payload, self._headers, stream=False)
            except TimeoutError:
                raise UpstreamTimeoutError(
                    self.name, f"{path.rsplit('/', 1)[-1]} call over {self._timeout_s * 1000:g} ms"
                ) from None
        try:
            return decode(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamProtocolError(self.name, f"unexpected answer from {path}: {exc}") from None

    def _generated(self, logprobs: _Logprobs | None, want_top: bool) -> tuple[list[int], list[Distribution] | None]:
        if logprobs is None:
            raise UpstreamProtocolError(self.name, "completion without logprobs (token ids are read from them)")
        tokens = [_token_id(self.name, t) for t in logprobs.tokens]
        if not want_top:
            return tokens, None
        tops: list[Distribution] = []
        for i, token in enumerate(tokens):
            row = (logprobs.top_logprobs or [None] * len(tokens))[i] or {}
            table = {_token_id(self.name, key): value for key, value in row.items()}
            chosen = logprobs.token_logprobs[i] if i < len(logprobs.token_logprobs) else None
            if chosen is not None:
                table.setdefault(token, chosen)
            tops.append(table)
        return tokens, tops


def _token_id(upstream: str, token: str) -> int:
    if token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            pass
    raise UpstreamProtocolError(
        upstream, f"token {token!r} is not 'token_id:N' (is return_tokens_as_token_ids supported?)"
    )


def _moved(a: Distribution | None, b: Distribution | None) -> bool:
    if not a or not b:
        return False
    return any(abs(a[token] - b[token]) > 1e-3 for token in a.keys() & b.keys())


def _prompt_tables(
    raw: list[dict[str, _PromptLogprob] | None], want_top: bool
) -> tuple[list[Distribution | None] | None, list[int | None]]:
    best: list[int | None] = []
    tops: list[Distribution | None] | None = [] if want_top else None
    for entry in raw:
        if entry is None:
            best.append(None)
            if tops is not None:
                tops.append(None)
            continue
        winner, winner_lp = None, float("-inf")
        for key, value in entry.items():
            if value.rank == 1:
                winner = int(key)
                break
            if value.logprob > winner_lp:
                winner, winner_lp = int(key), value.logprob
        best.append(winner)
        if tops is not None:
            tops.append({int(key): value.logprob for key, value in entry.items()})
    return tops, best


def _stream_failure(upstream: str, data: bytes) -> UpstreamError:
    """An event that is not a completion chunk: the server's own error event (vLLM's
    ``{"error": {...}}`` mid-stream) says what went wrong, and is passed on as it said it (t76)."""
    try:
        error = msgspec.json.decode(data).get("error")
    except (msgspec.DecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(message := error.get("message"), str):
        return UpstreamStatusError(upstream, 500, message[:500])
    return UpstreamProtocolError(upstream, "sent a stream event that is not a completion chunk")
