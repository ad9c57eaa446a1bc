"""An OpenAI-compatible upstream's embeddings answer: a broken one is the upstream's failure (502,
never served or cached), and a token count no input could hold is not billed; a batch's bill
shared out among its inputs for their cache entries."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.loader import load_policy_text
from gateway.embeddings import _shared_out
from gateway.errors import UpstreamProtocolError, UpstreamStatusError
from gateway.upstreams.registry import build_provider

_POLICY = """
pair: {small: s, large: s2}
models:
  s: {base_url: "http://s.test/v1", price: {input: 1, output: 1}, tier: small}
  s2: {base_url: "http://s.test/v1", price: {input: 1, output: 1}, tier: large}
  e: {base_url: "http://e.test/v1", price: {input: 1, output: 0}, kind: embedding}
routes: {fast: {model: s}}
auth: {mode: none}
"""


async def _embed(
    answer: dict[str, Any], inputs: list[str], dimensions: int | None = None, status: int = 200
) -> tuple[list[list[float]], int | None]:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=answer))
    policy = load_policy_text(_POLICY, environ={}).policy
    provider = build_provider("e", policy.models["e"], {}, transport)
    try:
        embedded = await provider.embed(inputs, dimensions)
    finally:
        await provider.aclose()
    return embedded.vectors, embedded.prompt_tokens


def _rows(*vectors: Any, indexes: list[int] | None = None) -> list[dict[str, Any]]:
    return [{"index": i if indexes is None else indexes[i], "embedding": v} for i, v in enumerate(vectors)]


@pytest.mark.parametrize(
    "rows",
    [
        _rows([0.1, 0.2], [0.3, 0.4], indexes=[0, 0]),  # two rows claim input 0: input 1 got input 2's vector
        _rows([0.1, None], [0.3, 0.4]),
        _rows([0.1, 0.2], [0.3]),  # vectors of different lengths
        _rows([0.1, "0.2"], [0.3, 0.4]),
        _rows([0.1, 1e39], [0.3, 0.4]),  # finite, but served as float32: inf
    ],
)
async def test_a_broken_answer_is_the_upstreams_failure(rows: list[dict[str, Any]]) -> None:
    with pytest.raises(UpstreamProtocolError):
        await _embed({"data": rows, "usage": {"prompt_tokens": 2}}, ["a", "b"])


@pytest.mark.parametrize("count", [-5, 0, 10**12, True])
async def test_a_count_no_input_could_hold_is_counted_by_the_gateway(count: object) -> None:
    vectors, prompt_tokens = await _embed({"data": _rows([0.1, 0.2]), "usage": {"prompt_tokens": count}}, ["hello"])
    assert vectors == [[0.1, 0.2]] and prompt_tokens is None
    _, plausible = await _embed({"data": _rows([0.1, 0.2]), "usage": {"prompt_tokens": 1}}, ["hello"])
    assert plausible == 1


async def test_the_special_tokens_a_model_adds_to_each_input_are_billed() -> None:
    """t108: a BERT-type model bills "a" as [CLS] a [SEP], 3 tokens: refused as more than the
    input's bytes + 1, and billed at the gateway's count of 1."""
    _, bert = await _embed({"data": _rows([0.1, 0.2]), "usage": {"prompt_tokens": 3}}, ["a"])
    _, absurd = await _embed({"data": _rows([0.1, 0.2]), "usage": {"prompt_tokens": 300}}, ["a"])
    assert (bert, absurd) == (3, None)


async def test_vectors_of_another_size_than_the_dimensions_asked_are_the_upstreams_failure() -> None:
    """t108: llama.cpp's server ignores ``dimensions``: its full-size vectors were served, and
    cached under the smaller size's key."""
    answer = {"data": _rows([0.1, 0.2, 0.3, 0.4]), "usage": {"prompt_tokens": 1}}
    with pytest.raises(UpstreamProtocolError, match="4 dimensions where 2 were asked"):
        await _embed(answer, ["a"], dimensions=2)
    vectors, _ = await _embed(answer, ["a"], dimensions=4)
    assert vectors == [[0.1, 0.2, 0.3, 0.4]]


async def test_an_input_too_long_for_the_model_names_the_input() -> None:
    """t108: the context-length error named ``messages``, which the embeddings API has none of."""
    said = "This model's maximum context length is 64 tokens, however you requested 100 tokens (100 in your prompt)."
    with pytest.raises(UpstreamStatusError) as refused:
        await _embed({"error": {"message": said, "type": "invalid_request_error"}}, ["a"], status=400)
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "input")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(billed=st.integers(0, 10_000), counts=st.lists(st.integers(1, 5_000), min_size=1, max_size=50))
def test_a_batchs_bill_is_shared_out_in_proportion_to_the_inputs(billed: int, counts: list[int]) -> None:
    """t108: each share was the input's count plus an even part of the difference, then raised to
    at least 1: a batch billed 4 counted [26, 1] was shared [15, 1], and its hit said 16 tokens."""
    shares = _shared_out(billed, counts)
    assert sum(shares) == billed and all(share >= 0 for share in shares)
    total = sum(counts)
    assert all(abs(share * total - billed * count) < total for share, count in zip(shares, counts, strict=True))
    by_count = sorted(zip(counts, shares, strict=True))
    assert all(a <= b for (_, a), (_, b) in itertools.pairwise(by_count))  # a larger count, never a smaller share
    assert _shared_out(billed, counts) == shares  # the same bill is shared the same way every time


def test_the_testers_batch_and_a_lone_input_are_shared_out() -> None:
    assert _shared_out(4, [26, 1]) == [4, 0]
    assert _shared_out(7, [2]) == [7] and _shared_out(None, [2, 3]) == [2, 3]
    assert _shared_out(10, [1, 1, 1]) == [4, 3, 3]  # equal remainders: the first input's


def test_a_batchs_cache_call_has_more_time_the_more_keys_it_holds() -> None:
    """t161: a 2,048-input MGET ran under the 50 ms of one key and timed out on a loaded host."""
    from gateway.embeddings import _batch_timeout_s

    assert _batch_timeout_s(0.05, 1) == pytest.approx(0.0501)
    assert _batch_timeout_s(0.05, 2048) == pytest.approx(0.2548)
