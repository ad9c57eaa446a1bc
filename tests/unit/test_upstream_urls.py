"""The parsed URLs an upstream keeps are its fixed paths, never one per object a caller names."""

from __future__ import annotations

import httpx

from gateway.config.loader import load_policy_text
from gateway.speculative.token_api import TokenAPI
from gateway.upstreams.registry import build_provider

_POLICY = """
pair: {small: s, large: s2}
models:
  s: {base_url: "http://s.test/v1", price: {input: 1, output: 1}, tier: small}
  s2: {base_url: "http://s.test/v1", price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: s}}
auth: {mode: none}
"""


async def test_a_path_naming_a_response_is_not_kept() -> None:
    """t101: each ``POST responses/{id}/cancel`` kept its parsed URL (~0.5 KB per id, never freed)."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"id": "resp", "status": "cancelled"})

    policy = load_policy_text(_POLICY, environ={}).policy
    provider = build_provider("s", policy.models["s"], {}, httpx.MockTransport(answer))
    try:
        for n in range(50):
            await provider.forward("POST", f"responses/resp_{n}/cancel")
            await provider.forward("GET", f"responses/resp_{n}")
        kept = len(provider._urls)
    finally:
        await provider.aclose()
    assert seen[:2] == ["/v1/responses/resp_0/cancel", "/v1/responses/resp_0"] and len(seen) == 100
    assert kept == 0


async def test_every_call_keeps_the_base_urls_query_before_its_own() -> None:
    """t177: with Azure OpenAI's ``?api-version=`` on the base URL, each call's path went after the
    query (``/v1?api-version=1/chat/completions``); the speculative loop's root calls lost it."""
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.method.encode() + b" " + request.url.raw_path)
        return httpx.Response(200, json={"tokens": [1], "count": 1, "max_model_len": 8, "prompt": "a"})

    azure = _POLICY.replace('"http://s.test/v1"', '"http://s.test/v1/?api-version=2024-10-21"', 1)
    provider = build_provider(
        "s", load_policy_text(azure, environ={}).policy.models["s"], {}, httpx.MockTransport(answer)
    )
    tokens = TokenAPI(provider)
    try:
        await provider.forward("GET", "responses/resp_1?include%5B%5D=x&stream=true")
        await provider.forward("DELETE", "responses/resp_1")
        await provider.forward("GET", "responses/resp_1/input_items?limit=2")
        await tokens.tokenize_text("a")
        await tokens.detokenize([1])
    finally:
        await provider.aclose()
    assert seen == [
        b"GET /v1/responses/resp_1?api-version=2024-10-21&include%5B%5D=x&stream=true",
        b"DELETE /v1/responses/resp_1?api-version=2024-10-21",
        b"GET /v1/responses/resp_1/input_items?api-version=2024-10-21&limit=2",
        b"POST /tokenize?api-version=2024-10-21",
        b"POST /detokenize?api-version=2024-10-21",
    ]


async def test_a_client_never_sets_again_a_parameter_the_base_urls_query_sets() -> None:
    """t181: the client's query went after the base's whole, so a server reading the last value took the
    client's ``api-version`` (or token); a name percent-encoded or in capitals is the same name."""
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.query)
        return httpx.Response(200, json={"id": "resp_1"})

    azure = _POLICY.replace('"http://s.test/v1"', '"http://s.test/v1?api-version=2024-10-21&tok=a%26b"', 1)
    provider = build_provider(
        "s", load_policy_text(azure, environ={}).policy.models["s"], {}, httpx.MockTransport(answer)
    )
    try:
        await provider.forward("GET", "responses/resp_1?limit=2&api-version=x&&api%2Dversion=y&TOK=z&tok=&after=m")
    finally:
        await provider.aclose()
    assert seen == [b"api-version=2024-10-21&tok=a%26b&limit=2&after=m"]
