"""An OpenAI-compatible upstream's embeddings answer: a broken one is the upstream's failure (502,
never served or cached), and a token count no input could hold is not billed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.config.loader import load_policy_text
from gateway.errors import UpstreamProtocolError
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


async def _embed(answer: dict[str, Any], inputs: list[str]) -> tuple[list[list[float]], int | None]:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    policy = load_policy_text(_POLICY, environ={}).policy
    provider = build_provider("e", policy.models["e"], {}, transport)
    try:
        embedded = await provider.embed(inputs, None)
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
