"""A vLLM upstream's prefix cache is salted per tenant (``tenant_cache_salt``): one tenant must
not find another's prompt there (a cached prefix answers faster and says ``cached_tokens``)."""

from __future__ import annotations

from typing import Any

from gateway.config.loader import load_policy_text
from gateway.protocols.openai_chat import read_chat_request
from gateway.speculative import SpeculativeProvider
from gateway.upstreams.registry import build_provider
from tests.unit.fake_upstream import FakeUpstream

_POLICY = """
pair: {small: vllm, large: openai}
models:
  vllm: {base_url: "http://vllm.test/v1", price: {input: 1, output: 1}, tier: small, tenant_cache_salt: true}
  openai: {base_url: "http://openai.test/v1", price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: vllm}}
auth: {mode: none}
"""


async def _sent(model: str, tenant: str, body: dict[str, Any], *, as_body: bool) -> dict[str, Any]:
    upstream = FakeUpstream()
    policy = load_policy_text(_POLICY, environ={}).policy
    provider = build_provider(model, policy.models[model], {}, upstream.transport)
    request = read_chat_request({"model": model, **body})
    request.tenant = tenant
    await provider.complete(request, {**body, "model": model} if as_body else None)
    await provider.aclose()
    return upstream.calls[-1]


async def test_each_tenant_has_its_own_salt_whatever_the_client_sends() -> None:
    body = {"messages": [{"role": "user", "content": "Our confidential system prompt ..."}]}
    for as_body in (True, False):  # a chat client's own body, and a translated request
        a, again, b = [await _sent("vllm", t, body, as_body=as_body) for t in ("alpha", "alpha", "beta")]
        assert a["cache_salt"] == again["cache_salt"] != b["cache_salt"] and len(a["cache_salt"]) == 43
    # a client's own salt partitions its tenant's cache further; it cannot pick another tenant's
    theirs = await _sent("vllm", "beta", body, as_body=True)
    forged = await _sent("vllm", "alpha", {**body, "cache_salt": theirs["cache_salt"]}, as_body=True)
    assert forged["cache_salt"] not in (theirs["cache_salt"], a["cache_salt"])
    # an upstream that refuses unknown fields (OpenAI's API) is sent none
    assert "cache_salt" not in await _sent("openai", "alpha", body, as_body=True)


async def test_a_speculative_model_salts_what_it_passes_through() -> None:
    """t77: the speculative wrapper kept Provider's no-op ``salted``, so a passed-through
    Responses request to a salted, speculating model went out unsalted."""
    salted_speculating = (
        "tenant_cache_salt: true, responses_api: true, speculative: {mode: gateway, draft_source: prompt_lookup}}"
    )
    policy = load_policy_text(_POLICY.replace("tenant_cache_salt: true}", salted_speculating), environ={}).policy
    upstream = FakeUpstream()
    target = build_provider("vllm", policy.models["vllm"], {}, upstream.transport)
    speculative = SpeculativeProvider(target, None, policy.models["vllm"].speculative)
    body = {"model": "vllm", "input": "Our confidential system prompt ..."}
    assert speculative.salted(body, "alpha") == target.salted(body, "alpha") != target.salted(body, "beta")
    assert "cache_salt" in speculative.salted(body, "alpha")
    await target.aclose()


def test_a_salt_keyed_on_nothing_secret_is_warned() -> None:
    """t117: with no API key and no GATEWAY_CACHE_SALT_KEY the salt is keyed on the model's name,
    which anyone who reaches the server directly can use to compute a tenant's salt."""
    warned = "models.vllm.tenant_cache_salt: keyed on the model's name"
    assert any(note.startswith(warned) for note in load_policy_text(_POLICY, environ={}).warnings)
    keyed = _POLICY.replace("tenant_cache_salt: true}", "tenant_cache_salt: true, api_key_env: VLLM_KEY}")
    assert not any(note.startswith(warned) for note in load_policy_text(keyed, environ={"VLLM_KEY": "k"}).warnings)
    shared = load_policy_text(_POLICY, environ={"GATEWAY_CACHE_SALT_KEY": "s3cret"}).warnings
    assert not any("tenant_cache_salt" in note for note in shared)
    blank = load_policy_text(keyed, environ={"VLLM_KEY": " \n", "GATEWAY_CACHE_SALT_KEY": ""}).warnings
    assert any(note.startswith(warned) for note in blank)  # a blank key keys nothing (registry.api_key strips it)
    simulated = _POLICY.replace("tenant_cache_salt: true}", "tenant_cache_salt: true, simulated: true}")
    assert not any("tenant_cache_salt" in note for note in load_policy_text(simulated, environ={}).warnings)
