"""The parsed URLs an upstream keeps are its fixed paths, never one per object a caller names."""

from __future__ import annotations

import httpx

from gateway.config.loader import load_policy_text
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
