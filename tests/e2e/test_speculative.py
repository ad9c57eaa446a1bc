"""Speculative decoding in the gateway against two real loopback toy LM servers (tests/speculative)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import structlog

from gateway.config.schema import ModelConfig, Price, SpeculationPolicy, Timeouts
from gateway.errors import UpstreamError
from gateway.speculative import PairMismatchError, SpeculationStats, SpeculativeProvider
from gateway.speculative.adaptive import AdaptiveK, expected_tokens
from gateway.speculative.drafts import lookup
from gateway.speculative.sampling import verify_sampled
from gateway.upstreams.base import ChatStream, Completion, Provider
from gateway.upstreams.registry import build_provider
from tests.chat_requests import as_sent
from tests.speculative.servers import ToyServer, start_toy_server, toy_provider, toy_tokenizer_file

pytestmark = pytest.mark.timeout(60)

_PROMPTS = [
    f"tell me {i} things about the way it was when {w}"
    for i, w in enumerate(
        [
            "we",
            "said",
            "that",
            "she",
            "would",
            "write",
            "some",
            "long",
            "word",
            "and",
            "then",
            "see",
            "him",
            "at",
            "time",
        ]
    )
] + ["the the the the", "a", "write about them if you can", "it is what it is and it was what it was"]


@pytest.fixture(scope="module")
def large() -> Iterator[ToyServer]:
    """As a vLLM server with Llama-3.1's tokenizer: ``/detokenize`` cleans up spaces and keeps
    special tokens; the model now and then emits a special token that is not EOS."""
    server = start_toy_server(role="large", eos_rate=0.03, special_rate=0.03, cleanup=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small() -> Iterator[ToyServer]:
    server = start_toy_server(role="small", agreement=0.8)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def foreign() -> Iterator[ToyServer]:
    """A small model whose tokenizer numbers the words differently."""
    server = start_toy_server(role="small", agreement=0.8, tokenizer_variant=7)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    for name in ("large", "small", "foreign"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def _provider(name: str, server: ToyServer, tier: str = "large") -> Provider:
    config = ModelConfig(
        base_url=server.base_url, price=Price(input_per_mtok=1, output_per_mtok=1), tier=tier,  # type: ignore[arg-type]
        timeouts=Timeouts(connect=2, first_byte=10, total=20),
    )  # fmt: skip
    return build_provider(name, config)


@pytest.fixture
async def pair(large: ToyServer, small: ToyServer) -> AsyncIterator[tuple[Provider, Provider]]:
    target, draft = _provider("large", large), _provider("small", small, "small")
    yield target, draft
    await target.aclose()
    await draft.aclose()


def _spec(pair: tuple[Provider, Provider], **policy: Any) -> SpeculativeProvider:
    """``min_speedup`` 0 unless given: the toy servers' passes cost nothing, so a draft call costs as
    much as a verify and drafting does not pay; the tests here are about what it answers (t49)."""
    target, draft = pair
    options: dict[str, Any] = {
        "mode": "gateway", "draft": "small", "tokenizer": toy_tokenizer_file(), "min_speedup": 0, **policy,
    }  # fmt: skip
    return SpeculativeProvider(target, draft if options.get("draft_source") != "prompt_lookup" else None,
                               SpeculationPolicy(**options))  # fmt: skip


def _body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "large", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}


def _stats(result: Completion | ChatStream) -> SpeculationStats:
    """What the loop said it did (every answer of a SpeculativeProvider carries it)."""
    assert isinstance(result.speculation, SpeculationStats), result
    return result.speculation


def _answer(completion: Any) -> tuple[str, str, int]:
    data = msgspec.json.decode(completion.body)
    choice = data["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], data["usage"]["completion_tokens"]


async def _stream(provider: Provider, body: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    stream = await provider.open_stream(*as_sent({**body, "stream": True}))
    try:
        chunks = [msgspec.json.decode(chunk) async for chunk in stream]
    finally:
        await stream.aclose()
    return chunks, stream


def _stop_reason(completion: Any) -> str | None:
    """vLLM's ``stop_reason``: the stop string that ended the answer."""
    stop: str | None = msgspec.json.decode(completion.body)["choices"][0].get("stop_reason")
    return stop


def _streamed_answer(chunks: list[dict[str, Any]], stream: Any) -> tuple[str, str, int]:
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"], stream.tally.usage.completion_tokens


# --------------------------------------------------------------------------- exactness (temperature 0)


async def test_greedy_output_is_exact_whichever_stop_check_the_server_runs() -> None:
    """vLLM V1 checks the length cap before EOS (an EOS as the last token allowed ends a 'length'
    finish), V0 checked EOS first: taking such a finish as 'not EOS' decoded past the large model's
    own end on V1 servers. The module's servers run V1's order; these run V0's."""
    large = start_toy_server(role="large", eos_rate=0.05, stop_check="v0")
    small = start_toy_server(role="small", agreement=0.8, stop_check="v0")
    target, draft = _provider("large", large), _provider("small", small, "small")
    try:
        spec = _spec((target, draft))
        finishes: Counter[str] = Counter()
        for prompt in _PROMPTS[:8]:
            body = _body(prompt, max_tokens=60)
            got, want = await spec.complete(*as_sent(body)), await target.complete(*as_sent(body))
            assert _answer(got) == _answer(want), prompt
            finishes[_answer(want)[1]] += 1
        assert finishes["stop"] > 0  # some answers end at the large model's EOS
    finally:
        await target.aclose()
        await draft.aclose()
        large.stop()
        small.stop()


async def test_greedy_output_is_the_large_models_own(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair)
    await spec.check_pair()
    drafted = accepted = spaced = 0
    finishes: Counter[str] = Counter()
    for prompt in _PROMPTS:
        body = _body(prompt, max_tokens=80)
        got = await spec.complete(*as_sent(body))
        want = await pair[0].complete(*as_sent(body))
        assert _answer(got) == _answer(want), prompt
        spaced += any(mark in _answer(want)[0] for mark in (" .", " ,", " n't", " 's"))
        stats = _stats(got)
        assert stats.mode == "gateway" and not stats.fallback_to_plain
        # Fewer large calls than tokens, the EOS probes aside: a cold pair probes each token first seen
        # as a correction once (on vLLM V1 a verify's 'length' finish says nothing of its last token).
        assert stats.large_calls - stats.eos_probes < stats.output_tokens or stats.output_tokens <= 2
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        finishes[_answer(got)[1]] += 1
    assert finishes["stop"] and finishes["length"], finishes  # EOS and max_tokens both exercised
    assert 0.3 < accepted / drafted < 0.95
    assert spaced >= len(_PROMPTS) // 2  # text that /detokenize would have cleaned up was exercised


# --------------------------------------------------------------------------- text as vLLM writes it


@pytest.fixture(scope="module")
def faithful_large() -> Iterator[ToyServer]:
    """A large server whose tokenizer does not clean up spaces (as Qwen2.5's)."""
    server = start_toy_server(role="large", eos_rate=0.03, cleanup=0)
    yield server
    server.stop()


async def test_a_cleaning_detokenize_without_the_tokenizer_file_goes_plain(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair, tokenizer=None)
    with pytest.raises(PairMismatchError, match="cleans up spaces"):
        await spec.check_pair()
    body = _body(_PROMPTS[1], max_tokens=40)
    got = await spec.complete(*as_sent(body))
    assert _stats(got).fallback_reason == "text_unfaithful"
    assert _answer(got) == _answer(await pair[0].complete(*as_sent(body)))


async def test_a_faithful_detokenize_needs_no_tokenizer_file(faithful_large: ToyServer, small: ToyServer) -> None:
    target, draft = _provider("large", faithful_large), _provider("small", small, "small")
    try:
        spec = _spec((target, draft), tokenizer=None)
        await spec.check_pair()
        assert spec._tokenizer is None
        for prompt in _PROMPTS[:8]:
            for stop in ([], [" the"]):
                body = _body(prompt, max_tokens=60, stop=stop)
                got = await spec.complete(*as_sent(body))
                assert not _stats(got).fallback_to_plain
                assert _answer(got) == _answer(await target.complete(*as_sent(body))), (prompt, stop)
    finally:
        await target.aclose()
        await draft.aclose()


async def test_another_models_tokenizer_file_is_refused(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair, tokenizer=toy_tokenizer_file(variant=7))
    with pytest.raises(PairMismatchError, match="does not decode"):
        await spec.check_pair()
    got = await spec.complete(*as_sent(_body(_PROMPTS[2], max_tokens=10)))
    assert _stats(got).fallback_reason == "tokenizer_mismatch"


async def test_stop_strings_are_found_in_the_text_vllm_writes(pair: tuple[Provider, Provider]) -> None:
    """A stop string that only the un-cleaned text contains (``" ."``) ends the answer where vLLM ends it."""
    spec = _spec(pair)
    hits = 0
    for prompt in _PROMPTS:
        for stream in (False, True):
            body = _body(prompt, max_tokens=80, stop=[" .", "n't"])
            want = _answer(await pair[0].complete(*as_sent(body)))
            if stream:
                chunks, opened = await _stream(spec, body)
                got = _streamed_answer(chunks, opened)
            else:
                got = _answer(await spec.complete(*as_sent(body)))
            assert got == want, (prompt, stream)
            hits += want[1] == "stop" and want[2] < 80
    assert hits >= 4


async def test_streaming_sends_verified_tokens_in_chunks(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair)
    for prompt in _PROMPTS[:6]:
        body = _body(prompt, max_tokens=60)
        chunks, stream = await _stream(spec, body)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        # about a chunk per round, not one at the end (a round may only end the answer or
        # bring only a special token, which has no text)
        assert len(chunks) >= 0.7 * stream.speculation.rounds
        assert _streamed_answer(chunks, stream) == _answer(await pair[0].complete(*as_sent(body)))
        assert stream.tally.text == _answer(await pair[0].complete(*as_sent(body)))[0]
        assert stream.speculation.rounds >= 1


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 9])
async def test_max_tokens_is_honoured_exactly(pair: tuple[Provider, Provider], max_tokens: int) -> None:
    spec = _spec(pair, k_initial=4, k_min=4, k_max=4)
    body = _body(_PROMPTS[1], max_tokens=max_tokens)
    got = _answer(await spec.complete(*as_sent(body)))
    assert got == _answer(await pair[0].complete(*as_sent(body)))
    assert got[2] <= max_tokens


async def test_an_eos_as_the_last_token_allowed_is_a_length_finish_as_vllm_v1_says(
    pair: tuple[Provider, Provider], faithful_large: ToyServer, small: ToyServer
) -> None:
    """vLLM V1 checks the length cap before EOS: an answer whose EOS is its max_tokens-th token
    ends 'length'. The loop said 'stop' (t49), and an answer finished plainly after a draft
    failure wrote the EOS into the text from /detokenize."""
    cases = 0
    for prompt in _PROMPTS:
        text, finish, count = _answer(await pair[0].complete(*as_sent(_body(prompt, max_tokens=80))))
        if finish != "stop":
            continue
        body = _body(prompt, max_tokens=count)  # the EOS is the last token allowed
        want = _answer(await pair[0].complete(*as_sent(body)))
        assert want == (text, "length", count)  # the toy server checks as vLLM V1 does
        spec = _spec(pair)
        assert _answer(await spec.complete(*as_sent(body))) == want, prompt
        assert _streamed_answer(*await _stream(spec, body)) == want, prompt
        cases += 1
    assert cases >= 2
    # the rest of an answer decoded plainly after a draft failure, its text from /detokenize
    target, draft = _provider("large", faithful_large), _provider("small", small, "small")
    try:
        spec = _spec((target, draft), tokenizer=None, draft_cooldown_s=0)
        await spec.check_pair()
        plain_cases = 0
        for prompt in _PROMPTS:
            text, finish, count = _answer(await target.complete(*as_sent(_body(prompt, max_tokens=80))))
            if finish != "stop":
                continue
            body = _body(prompt, max_tokens=count)
            small.reset()
            small.fail_after(0, "500")
            completion = await spec.complete(*as_sent(body))
            assert _stats(completion).draft_failed
            assert _answer(completion) == (text, "length", count), prompt
            plain_cases += 1
        assert plain_cases >= 2
    finally:
        small.reset()
        await target.aclose()
        await draft.aclose()


async def test_stop_strings_are_honoured_exactly(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair)
    matched = 0
    for prompt in _PROMPTS[:8]:
        full, _, _ = _answer(await pair[0].complete(*as_sent(_body(prompt, max_tokens=40))))
        words = full.split()
        if len(words) < 8:
            continue
        for stops in ([" " + words[5]], [words[6][:2], "zz"], ["zz", " " + words[3] + " " + words[4]]):
            body = _body(prompt, max_tokens=40, stop=stops)
            plain = await pair[0].complete(*as_sent(body))
            want = _answer(plain)
            speculated = await spec.complete(*as_sent(body))
            assert _answer(speculated) == want, (prompt, stops)
            assert _stop_reason(speculated) == _stop_reason(plain)  # which stop string (Anthropic's stop_sequence)
            chunks, stream = await _stream(spec, body)
            assert _streamed_answer(chunks, stream) == want, (prompt, stops)
            assert chunks[-1]["choices"][0].get("stop_reason") == _stop_reason(plain)
            matched += _stop_reason(plain) is not None
    assert matched >= 3


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("kind", ["500", "drop"])
async def test_draft_failure_mid_answer_finishes_on_the_large_model(
    pair: tuple[Provider, Provider], small: ToyServer, kind: str
) -> None:
    spec = _spec(pair, draft_cooldown_s=0)  # each request tries the draft again (the pause has its own test)
    await spec.check_pair()
    body, want = await _long_answer(pair[0], max_tokens=70)
    for streaming in (False, True):
        small.reset()
        small.fail_after(3, kind)
        if streaming:
            chunks, stream = await _stream(spec, body)
            got, stats = _streamed_answer(chunks, stream), stream.speculation
        else:
            completion = await spec.complete(*as_sent(body))
            got, stats = _answer(completion), _stats(completion)
        assert got == want  # nothing repeated, nothing lost
        assert stats.draft_failed and stats.rounds >= 3
        assert stats.draft_calls == stats.rounds + 1  # one per round, and the failed call (t49)


async def test_a_drafted_prompt_the_large_server_refuses_finishes_plainly_and_rechecks_the_pair(
    pair: tuple[Provider, Provider], small: ToyServer
) -> None:
    """t28: a draft server redeployed with another vocabulary proposed ids the large server
    refuses (vLLM's 400): every request failed with a 400 blamed on the client."""
    spec = _spec(pair, draft_cooldown_s=30)
    await spec.check_pair()
    body, want = await _long_answer(pair[0], max_tokens=40)
    small.reset()
    small.fail_after(2, "oov")
    completion = await spec.complete(*as_sent(body))
    assert _answer(completion) == want  # the large model's own answer, nothing lost
    stats = _stats(completion)
    assert stats.draft_failed and stats.rounds >= 2
    after = await spec.complete(*as_sent(body))  # the cooldown: plain, and the pair to be checked again
    assert _stats(after).fallback_reason == "draft_unhealthy"
    assert spec._pair is None


async def test_a_request_with_an_image_goes_plain(pair: tuple[Provider, Provider]) -> None:
    """Token ids cannot carry an image: a vision model would answer without seeing it (t28)."""
    spec = _spec(pair)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {
        **_body("hi", max_tokens=5),
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
    }
    completion = await spec.complete(*as_sent(body))
    assert _stats(completion).fallback_reason == "unsupported_media"


@pytest.mark.parametrize("kind", ["500", "drop"])
async def test_a_large_failure_mid_answer_keeps_the_loops_work_for_the_log(
    pair: tuple[Provider, Provider], large: ToyServer, kind: str
) -> None:
    """The rounds before the failure ran and were paid for: the error carries their stats, as a
    cut stream does, so the request log does not say that no speculation happened."""
    spec = _spec(pair)
    await spec.check_pair()
    body, _ = await _long_answer(pair[0], max_tokens=70)
    large.reset()
    large.fail_after(3, kind)
    with pytest.raises(UpstreamError) as failed:
        await spec.complete(*as_sent(body))
    assert failed.value.speculation is not None and failed.value.speculation["rounds"] >= 1
    large.reset()
    large.fail_after(0, kind)  # a stream that fails before its first chunk: the error is all the log gets (t49)
    stream = await spec.open_stream(*as_sent({**body, "stream": True}))
    try:
        with pytest.raises(UpstreamError) as failed:
            await stream.__anext__()
    finally:
        await stream.aclose()
    assert failed.value.speculation is not None and failed.value.speculation["mode"] == "gateway"


@pytest.mark.parametrize("draft_fails", [False, True])
async def test_the_loop_counts_the_tokens_each_server_read_and_wrote(
    pair: tuple[Provider, Provider], large: ToyServer, small: ToyServer, draft_fails: bool
) -> None:
    """t124: the log said how many calls the loop made to each server, not the tokens they read and
    wrote, so what speculation consumed beyond the answer billed as the large model's own was unseen.
    A draft that fails midway: its failed call counts no tokens, the large model's plain finish does."""
    spec = _spec(pair, draft_cooldown_s=0)
    await spec.check_pair()
    body, _ = await _long_answer(pair[0], max_tokens=70)
    large.reset()
    small.reset()
    if draft_fails:
        small.fail_after(3)
    stats = _stats(await spec.complete(*as_sent(body)))
    assert stats.draft_failed == draft_fails and stats.rounds >= 3 and stats.draft_calls >= 3
    read, drafted = large.stats(), small.stats()
    assert (stats.large_prompt_tokens, stats.large_completion_tokens) == (
        read["prompt_tokens"],
        read["completion_tokens"],
    )
    assert (stats.draft_prompt_tokens, stats.draft_completion_tokens) == (
        drafted["prompt_tokens"],
        drafted["completion_tokens"],
    )
    assert stats.draft_completion_tokens == stats.drafted
    assert stats.large_prompt_tokens > stats.draft_prompt_tokens  # the large model also reads each draft
    assert {"draft_prompt_tokens", "draft_completion_tokens", "large_prompt_tokens", "large_completion_tokens"} <= set(
        stats.to_log()
    )


async def _long_answer(target: Provider, max_tokens: int) -> tuple[dict[str, Any], tuple[str, str, int]]:
    """A prompt whose answer runs to ``max_tokens`` (no early end of sequence)."""
    for prompt in _PROMPTS:
        body = _body(prompt, max_tokens=max_tokens)
        answer = _answer(await target.complete(*as_sent(body)))
        if answer[1] == "length":
            return body, answer
    raise AssertionError("no prompt gives a long answer")


async def test_tokenizer_mismatch_is_refused(large: ToyServer, foreign: ToyServer) -> None:
    target, draft = _provider("large", large), _provider("small", foreign, "small")
    try:
        spec = SpeculativeProvider(target, draft, SpeculationPolicy(mode="gateway", draft="small"))
        with pytest.raises(PairMismatchError, match="tokenize the probe text differently"):
            await spec.check_pair()
        completion = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=10)))
        assert _stats(completion).fallback_reason == "pair_refused"
        assert foreign.stats()["completions"] == 0
    finally:
        await target.aclose()
        await draft.aclose()


async def test_requests_the_loop_cannot_reproduce_go_plain(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair, sampling="plain")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for body, reason in (
        (_body("hi", max_tokens=5, tools=tools), "unsupported_tools"),
        (_body("hi", max_tokens=5, n=2), "unsupported_n"),
        ({**_body("hi", max_tokens=5), "temperature": 0.7}, "sampling_plain"),
    ):
        completion = await spec.complete(*as_sent(body))
        assert _stats(completion).fallback_reason == reason
    chunks, stream = await _stream(spec, {**_body("hi", max_tokens=5), "temperature": 0.7})
    assert stream.speculation.fallback_to_plain and chunks


async def test_an_empty_stop_string_goes_plain(pair: tuple[Provider, Provider]) -> None:
    """t154: the loop dropped an empty stop and answered in full, where vLLM refuses it (400)."""
    spec = _spec(pair)
    await spec.check_pair()
    for stop in ("", [""], ["zz", ""]):
        completion = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=8, stop=stop)))
        assert _stats(completion).fallback_reason == "stop_empty"
    assert not _stats(await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=8, stop=["zz"])))).fallback_to_plain


async def test_more_stop_strings_than_the_gateway_matches_itself_go_plain(pair: tuple[Provider, Provider]) -> None:
    """t105: the loop matched 2,000 stop strings of 1,000 characters on the event loop; past the
    cap on the stops the gateway applies itself, the large server applies them."""
    spec = _spec(pair)
    await spec.check_pair()
    for stops in (["zz"] * 17, ["z" * 1025]):
        body = _body(_PROMPTS[0], max_tokens=8, stop=stops)
        completion = await spec.complete(*as_sent(body))
        assert _stats(completion).fallback_reason == "stop_over_limit"
        assert _answer(completion) == _answer(await pair[0].complete(*as_sent(body)))
    capped = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=8, stop=["z" * 1024] * 16)))
    assert not _stats(capped).fallback_to_plain


# --------------------------------------------------------------------------- draft sources and k


async def test_prompt_lookup_draft_is_exact_and_cheap(pair: tuple[Provider, Provider], small: ToyServer) -> None:
    spec = _spec(pair, draft_source="prompt_lookup", draft=None)
    await spec.check_pair()
    for prompt in _PROMPTS[-4:]:
        body = _body(prompt, max_tokens=60)
        completion = await spec.complete(*as_sent(body))
        assert _answer(completion) == _answer(await pair[0].complete(*as_sent(body)))
        assert _stats(completion).draft_source == "prompt_lookup"
    assert small.stats()["completions"] == 0


def test_prompt_lookup_copies_what_followed_the_last_match() -> None:
    assert lookup([1, 2, 3, 4, 9, 2, 3], 3, 3, 1, 4096) == [4, 9, 2]
    assert lookup([5, 6, 7], 2, 3, 1, 4096) == []
    assert lookup([1, 2, 1, 2], 4, 3, 1, 4096) == [1, 2]


async def test_adaptive_k_stays_within_bounds(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair, k_initial=3, k_min=2, k_max=5)
    for prompt in _PROMPTS[:4]:
        completion = await spec.complete(*as_sent(_body(prompt, max_tokens=60)))
        history = _stats(completion).k_history
        assert history and max(history) <= 5
        assert min(history[:-1] or [2]) >= 2  # only the last round may be cut by max_tokens


def test_adaptive_k_follows_acceptance_and_costs() -> None:
    high, low = AdaptiveK(4, 1, 8), AdaptiveK(4, 1, 8)
    for _ in range(30):
        high.observe(drafted=8, accepted=8, draft_s=0.004 * 8, verify_s=0.030)
        low.observe(drafted=4, accepted=0, draft_s=0.004 * 4, verify_s=0.030)
    assert high.k == 8 and low.k == 1
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)


# --------------------------------------------------------------------------- temperature > 0


def test_speculative_sampling_preserves_the_target_distribution() -> None:
    """With full distributions (top-n covers the vocabulary) the output token follows p exactly."""
    rng = random.Random(5)
    p = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    q = {0: 0.2, 1: 0.6, 2: 0.1, 3: 0.1}
    for token, share in _sampled_shares(p, q, 1.0, rng).items():
        assert share == pytest.approx(p[token], abs=0.01)


def _sampled_shares(
    p: dict[int, float], q: dict[int, float], temperature: float, rng: random.Random, *, scaled: bool = False
) -> dict[int, float]:
    """How often each token comes out of one draft-and-verify step, over 40,000 trials."""
    p_log = {t: math.log(v) for t, v in p.items()}
    q_log = {t: math.log(v) for t, v in q.items()}
    counts: Counter[int] = Counter()
    trials = 40_000
    for _ in range(trials):
        x = rng.choices(list(q), weights=list(q.values()))[0]
        accepted, correction = verify_sampled(
            [x], [q_log], [p_log], temperature, rng, scaled_by_server=(scaled, scaled)
        )
        counts[x if accepted else correction] += 1  # type: ignore[index]
    return {token: counts[token] / trials for token in p}


@contextlib.contextmanager
def _wide(**options: Any) -> Iterator[tuple[ToyServer, ToyServer]]:
    """Servers that return up to 100 logprobs (vLLM --max-logprobs 100): enough for the toy's 74 tokens."""
    large = start_toy_server(role="large", eos_rate=0.03, max_logprobs=100, **options)
    small = start_toy_server(role="small", agreement=0.8, max_logprobs=100, **options)
    try:
        yield large, small
    finally:
        large.stop()
        small.stop()


@pytest.fixture(scope="module")
def wide_pair() -> Iterator[tuple[ToyServer, ToyServer]]:
    with _wide() as servers:
        yield servers


async def test_sampled_requests_use_speculative_sampling(wide_pair: tuple[ToyServer, ToyServer]) -> None:
    target, draft = _provider("large", wide_pair[0]), _provider("small", wide_pair[1], "small")
    try:
        spec = _spec((target, draft), top_logprobs=80)  # the whole vocabulary: exact speculative sampling
        for seed in range(6):
            body = {**_body(_PROMPTS[seed], max_tokens=30), "temperature": 1.0}
            completion = await spec.complete(*as_sent(body))
            _text, finish, count = _answer(completion)
            stats = _stats(completion)
            assert stats.sampling == "speculative" and not stats.fallback_to_plain and not stats.heavy_tail
            assert count <= 30 and finish in ("stop", "length")
            assert stats.rounds >= 1 and stats.accepted <= stats.drafted
    finally:
        await target.aclose()
        await draft.aclose()


async def test_seeded_sampled_requests_give_the_same_answer_each_time(
    wide_pair: tuple[ToyServer, ToyServer],
) -> None:
    """t49: the loop's draws depend on k, which follows measured timings, so the same seeded request
    gave another answer each time. Such requests go plain: the large model's own seeded answer."""
    target, draft = _provider("large", wide_pair[0]), _provider("small", wide_pair[1], "small")
    try:
        spec = _spec((target, draft), top_logprobs=80)  # the whole vocabulary: these would speculate unseeded
        body = {**_body(_PROMPTS[2], max_tokens=40), "temperature": 0.8, "seed": 42}
        answers = []
        for _ in range(3):
            completion = await spec.complete(*as_sent(body))
            assert _stats(completion).fallback_reason == "seeded_sampling"
            answers.append(_answer(completion))
        chunks, stream = await _stream(spec, body)
        answers.append(_streamed_answer(chunks, stream))
        assert answers == [_answer(await target.complete(*as_sent(body)))] * 4
        unseeded = await spec.complete(*as_sent({**body, "seed": None}))
        assert _stats(unseeded).sampling == "speculative" and _stats(unseeded).rounds >= 1
    finally:
        await target.aclose()
        await draft.aclose()


def test_logprobs_the_server_scaled_are_not_scaled_again() -> None:
    """vLLM V0 returns logprobs at the request's temperature: sampling must follow them as they are."""
    rng = random.Random(11)
    temperature = 0.5
    raw_p = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    raw_q = {0: 0.2, 1: 0.6, 2: 0.1, 3: 0.1}

    def at(dist: dict[int, float]) -> dict[int, float]:
        weights = {t: v ** (1 / temperature) for t, v in dist.items()}
        return {t: w / sum(weights.values()) for t, w in weights.items()}

    p, q = at(raw_p), at(raw_q)
    for token, share in _sampled_shares(p, q, temperature, rng, scaled=True).items():
        assert share == pytest.approx(p[token], abs=0.01)


@pytest.mark.parametrize(
    ("mode", "scaled"),
    [
        ("raw", (False, False)),  # vLLM V1's default
        ("processed", (True, True)),  # V0: prompt and sampled logprobs after temperature
        ("processed_logprobs", (False, True)),  # V1's option: sampled ones only
    ],
)
async def test_the_logprobs_mode_of_each_server_is_found(mode: str, scaled: tuple[bool, bool]) -> None:
    with _wide(logprobs_mode=mode) as servers:
        target, draft = _provider("large", servers[0]), _provider("small", servers[1], "small")
        try:
            spec = _spec((target, draft), top_logprobs=80)
            await spec.check_pair()
            # the target verifies with prompt logprobs, the draft proposes with sampled ones
            assert spec._scaled_by_server == scaled
            body = {**_body(_PROMPTS[3], max_tokens=30), "temperature": 0.7}
            stats = _stats(await spec.complete(*as_sent(body)))
            assert stats.sampling == "speculative" and not stats.fallback_to_plain and stats.rounds >= 1
        finally:
            await target.aclose()
            await draft.aclose()


async def test_a_heavy_tail_beyond_the_returned_logprobs_ends_speculation(pair: tuple[Provider, Provider]) -> None:
    """The toy's 20 most likely of 72 tokens leave ~15 % of the mass out: sampling from them would
    not be the large model's distribution, so after the first round the answer is decoded plainly."""
    spec = _spec(pair)  # top_logprobs 20, max_uncovered_mass 0.02
    body = {**_body(_PROMPTS[0], max_tokens=30), "temperature": 1.0}
    completion = await spec.complete(*as_sent(body))
    stats = _stats(completion)
    assert stats.heavy_tail and stats.rounds == 1 and _answer(completion)[2] > 0
    too_hot = await spec.complete(*as_sent({**body, "temperature": 1.3}))
    assert _stats(too_hot).fallback_reason == "unsupported_temperature_above_1"


async def test_a_hung_draft_costs_one_draft_deadline_then_speculation_pauses(
    pair: tuple[Provider, Provider], small: ToyServer
) -> None:
    # a cool-down long enough that the first answer's own end (the large model's 40 tokens) cannot
    # outlast it on a loaded machine, where 0.5 s ran out before the second request (CI, f204)
    # the default 1 s deadline, not 300 ms, which a healthy draft's call (the third request's) could
    # run past on a loaded machine
    spec = _spec(pair, draft_timeout_ms=1000, draft_cooldown_s=4.0)
    await spec.check_pair()
    body, want = await _long_answer(pair[0], max_tokens=40)
    small.reset()
    small.fail_after(0, "hang")  # the draft server accepts the call and never answers
    with structlog.testing.capture_logs() as logs:
        first = await spec.complete(*as_sent(body))
    assert _answer(first) == want and _stats(first).draft_failed
    (failed,) = [e for e in logs if e["event"] == "draft_failed"]
    assert "draft call over 1000 ms" in failed["detail"]  # the draft's own deadline, not its 10 s first byte
    assert any(e["event"] == "draft_unhealthy" for e in logs)
    calls = small.stats()["completions"]
    second = await spec.complete(*as_sent(body))  # within the cool-down: straight to the large model
    assert _answer(second) == want and _stats(second).fallback_reason == "draft_unhealthy"
    assert small.stats()["completions"] == calls
    small.reset()  # healthy again
    await asyncio.sleep(4.1)
    third = await spec.complete(*as_sent(body))
    assert _answer(third) == want
    assert not _stats(third).fallback_to_plain and _stats(third).draft_calls > 0


def _calls(*servers: ToyServer) -> list[tuple[int, int]]:
    """Each server's token-level calls so far (a pair check makes both kinds)."""
    return [(stats["tokenize"], stats["completions"]) for stats in (server.stats() for server in servers)]


@pytest.mark.parametrize("hung", ["small", "large"])
async def test_a_server_that_hangs_during_the_pair_check_costs_one_draft_deadline_then_pauses(
    large: ToyServer, small: ToyServer, hung: str
) -> None:
    """t105: the pair check called the servers with no deadline of its own: each request waited the
    hung server's first-byte timeout (60 s), and the next request checked again. Now each check
    call has draft_timeout_ms, and a failed check starts the cooldown as a failed draft call does."""
    target, draft = toy_provider("large", large, "large"), toy_provider("small", small, "small")  # first byte 60 s
    try:
        # 1 s for each check call, not 300 ms, which the healthy server's could run past on a loaded machine
        spec = _spec((target, draft), draft_timeout_ms=1000, draft_cooldown_s=60)
        body, want = await _long_answer(target, max_tokens=20)
        (large if hung == "large" else small).fail_after(0, "hang")  # /v1/completions accepts and never answers
        async with asyncio.timeout(20):  # well under the 60 s first byte
            with structlog.testing.capture_logs() as logs:
                first = await spec.complete(*as_sent(body))
            assert _answer(first) == want and _stats(first).fallback_reason == "pair_unchecked"
            (unchecked,) = [e for e in logs if e["event"] == "speculation_pair_unchecked"]
            assert f"upstream '{hung}': completions call over 1000 ms" in unchecked["detail"]
            calls = _calls(large, small)
            second = await spec.complete(*as_sent(body))  # within the cooldown: no check, plain at once
        assert _answer(second) == want and _stats(second).fallback_reason == "pair_unchecked"
        assert _calls(large, small) == calls
    finally:
        await target.aclose()
        await draft.aclose()


async def test_requests_do_not_queue_behind_another_requests_pair_check(large: ToyServer, small: ToyServer) -> None:
    """t105: concurrent requests queued on the check's lock, each then running its own check
    (6, 11, 16 s with a 5 s first byte). The others now go plain while one request checks."""
    target, draft = toy_provider("large", large, "large"), toy_provider("small", small, "small")
    try:
        spec = _spec((target, draft), draft_timeout_ms=1000, draft_cooldown_s=60)  # the healthy check calls' 1 s
        body, want = await _long_answer(target, max_tokens=20)
        small.fail_after(0, "hang")
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*(spec.complete(*as_sent(body)) for _ in range(3)))
        assert [_answer(a) for a in answers] == [want] * 3
        reasons = sorted(str(_stats(a).fallback_reason) for a in answers)
        assert reasons == ["pair_checking", "pair_checking", "pair_unchecked"]
        assert small.stats()["tokenize"] == 1  # one check, not one per request
    finally:
        await target.aclose()
        await draft.aclose()


async def test_a_draft_slower_than_plain_decoding_is_given_up_and_paused(large: ToyServer) -> None:
    """t49: a draft server that answers inside its deadline, but slowly (an overloaded small-model
    server), made every answer many times slower, and adaptive k only drafted more per call. After
    a few measured rounds the answer finishes plainly and speculation pauses for the cooldown."""
    # the large model's passes cost nothing; 150 ms a draft pass, not 40: a verify call's 25 ms of
    # HTTP on a loaded machine made a 40 ms draft worth its cost (speedup 0.5), 125 ms do not
    slow = start_toy_server(role="small", agreement=0.8, pass_ms=150)
    target, draft = _provider("large", large), _provider("small", slow, "small")
    try:
        # min_speedup 0.5: the default; a 4-token draft (600 ms) well inside its deadline
        spec = _spec((target, draft), draft_cooldown_s=60, min_speedup=0.5, draft_timeout_ms=5000)
        await spec.check_pair()
        body, want = await _long_answer(target, max_tokens=40)
        with structlog.testing.capture_logs() as logs:
            first = await spec.complete(*as_sent(body))
        stats = _stats(first)
        assert _answer(first) == want  # the large model's own answer, nothing lost
        assert stats.mode == "gateway" and stats.fallback_reason == "draft_too_slow" and not stats.draft_failed
        assert stats.rounds == stats.draft_calls == 3  # judged after three drafted rounds, no draft call after
        (judged,) = [e for e in logs if e["event"] == "draft_too_slow"]
        assert judged["speedup"] < 0.5
        assert [e["reason"] for e in logs if e["event"] == "draft_unhealthy"] == ["draft_too_slow"]
        calls = slow.stats()["completions"]
        chunks, stream = await _stream(spec, body)  # within the cool-down: straight to the large model
        assert _streamed_answer(chunks, stream) == want
        assert stream.speculation.mode == "plain" and stream.speculation.fallback_reason == "draft_too_slow"
        assert slow.stats()["completions"] == calls
    finally:
        await target.aclose()
        await draft.aclose()
        slow.stop()


async def test_a_context_longer_than_the_drafts_window_pauses_no_one_else(large: ToyServer) -> None:
    """The draft is often a smaller deployment with a shorter --max-model-len: its 400 for one
    long prompt ends drafting for that request only, and is no sign of an unhealthy server."""
    short = start_toy_server(role="small", agreement=0.8, max_model_len=40)
    target, draft = _provider("large", large), _provider("small", short, "small")
    try:
        spec = _spec((target, draft), draft_cooldown_s=60)
        await spec.check_pair()
        long_body, long_want = await _long_answer(target, max_tokens=40)
        with structlog.testing.capture_logs() as logs:
            first = await spec.complete(*as_sent(long_body))
        assert _answer(first) == long_want and _stats(first).draft_failed
        assert not any(e["event"] == "draft_unhealthy" for e in logs)
        second = await spec.complete(*as_sent(_body("hi", max_tokens=8)))
        assert _stats(second).fallback_reason is None and _stats(second).draft_calls > 0
    finally:
        await target.aclose()
        await draft.aclose()
        short.stop()


@pytest.mark.parametrize(
    "extra",
    [{"min_tokens": 100}, {"ignore_eos": True}, {"stop_token_ids": [7]}, {"include_stop_str_in_output": True},
     {"skip_special_tokens": False}, {"repetition_penalty": 1.05}],
)  # fmt: skip
async def test_vllm_sampling_fields_the_loop_does_not_reproduce_go_plain(
    pair: tuple[Provider, Provider], extra: dict[str, Any]
) -> None:
    spec = _spec(pair)
    completion = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=8, **extra)))
    assert _stats(completion).fallback_to_plain
    name = next(iter(extra))
    assert _stats(completion).fallback_reason in (f"unsupported_{name}", "unsupported_penalties")
    # at their defaults they do not stop speculation
    defaults = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=8, min_tokens=0, ignore_eos=False)))
    assert not _stats(defaults).fallback_to_plain


async def test_a_server_that_splits_reasoning_off_is_asked_plainly_unless_thinking_is_off(
    pair: tuple[Provider, Provider],
) -> None:
    """With vLLM's --reasoning-parser the chat endpoint moves <think>...</think> into
    reasoning_content; the loop would write it into the answer's text instead."""
    spec = _spec(pair, reasoning_parser=True)
    thinking = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=8)))
    assert _stats(thinking).fallback_reason == "reasoning_parser"
    quiet = _body(_PROMPTS[0], max_tokens=8, chat_template_kwargs={"enable_thinking": False})
    assert not _stats(await spec.complete(*as_sent(quiet))).fallback_to_plain


async def test_max_inflight_speculates_only_while_the_large_model_has_room(pair: tuple[Provider, Provider]) -> None:
    spec = _spec(pair, max_inflight=1)
    await spec.check_pair()
    body = _body(_PROMPTS[0], max_tokens=24)
    first, second = await asyncio.gather(spec.complete(*as_sent(body)), spec.complete(*as_sent(body)))
    reasons = sorted(str(_stats(c).fallback_reason) for c in (first, second))
    assert reasons == ["None", "busy"]
    assert _answer(first) == _answer(second)  # the busy one is the large model's own answer
    _, stream = await _stream(spec, body)  # alone again: speculates, and its slot is given back on close
    assert not stream.speculation.fallback_to_plain
    assert spec._inflight == 0
    plain_stream = await spec.open_stream(*as_sent({**body, "stream": True, "min_tokens": 5}))
    assert spec._inflight == 1
    await plain_stream.aclose()
    await plain_stream.aclose()  # closing twice gives the slot back once
    assert spec._inflight == 0


@pytest.fixture(scope="module")
def greedy_by_default() -> Iterator[ToyServer]:
    """A large server whose generation config makes unset temperature greedy (vLLM --generation-config auto)."""
    server = start_toy_server(role="large", eos_rate=0.03, default_temperature=0.0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def penalised_by_default() -> Iterator[ToyServer]:
    """A large server whose generation config sets repetition_penalty (Qwen2.5-style)."""
    server = start_toy_server(role="large", eos_rate=0.03, default_repetition_penalty=1.3)
    yield server
    server.stop()


async def _with_large(
    server: ToyServer, small: ToyServer, **policy: Any
) -> tuple[SpeculativeProvider, Provider, Provider]:
    target, draft = _provider("large", server), _provider("small", small, "small")
    spec = SpeculativeProvider(
        target,
        draft,
        SpeculationPolicy(mode="gateway", draft="small", tokenizer=toy_tokenizer_file(), min_speedup=0, **policy),
    )
    await spec.check_pair()
    return spec, target, draft


async def test_an_unset_temperature_is_the_servers_default_not_one(
    greedy_by_default: ToyServer, small: ToyServer
) -> None:
    spec, target, draft = await _with_large(greedy_by_default, small, server_defaults={"temperature": 0.0})
    try:
        for prompt in _PROMPTS[:6]:
            body = {
                "model": "large",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 40,
            }  # no temperature
            own = _answer(await target.complete(*as_sent(body)))  # what the server itself answers: greedy
            got = await spec.complete(*as_sent(body))
            assert _answer(got) == own
            assert _stats(got).sampling == "greedy" and not _stats(got).fallback_to_plain
    finally:
        await target.aclose()
        await draft.aclose()


async def test_a_server_default_penalty_sends_the_request_down_the_plain_path(
    penalised_by_default: ToyServer, small: ToyServer
) -> None:
    spec, target, draft = await _with_large(penalised_by_default, small, server_defaults={"repetition_penalty": 1.3})
    try:
        body = _body(_PROMPTS[3], max_tokens=60)
        own = _answer(await target.complete(*as_sent(body)))  # the server applies its penalty
        got = await spec.complete(*as_sent(body))
        assert _answer(got) == own
        assert _stats(got).fallback_reason == "unsupported_penalties"
        # the loop's own calls carry every sampling field, so a server default never reaches them
        undeclared, target2, draft2 = await _with_large(penalised_by_default, small)
        try:
            penalty_free = await undeclared.complete(*as_sent(body))
            assert not _stats(penalty_free).fallback_to_plain
        finally:
            await target2.aclose()
            await draft2.aclose()
    finally:
        await target.aclose()
        await draft.aclose()


async def test_more_logprobs_than_the_server_gives_sends_sampled_requests_plain(
    pair: tuple[Provider, Provider],
) -> None:
    spec = _spec(pair, top_logprobs=50)  # the toy servers allow 20 (vLLM's default --max-logprobs)
    await spec.check_pair()
    sampled = await spec.complete(*as_sent({**_body(_PROMPTS[0], max_tokens=10), "temperature": 0.8}))
    assert _stats(sampled).fallback_reason == "top_logprobs_refused"
    greedy = await spec.complete(*as_sent(_body(_PROMPTS[0], max_tokens=10)))
    assert not _stats(greedy).fallback_to_plain
