"""dispatch with real providers over a MockTransport upstream: retries, fallbacks, breakers, verdicts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config.loader import load_policy_text
from gateway.config.schema import RetryPolicy
from gateway.dispatch import DispatchInfo, dispatch
from gateway.errors import InvalidRequestError, UpstreamStatusError, UpstreamUnavailableError
from gateway.upstreams.base import Completion, Provider
from gateway.upstreams.breaker import CircuitBreaker
from gateway.upstreams.registry import build_provider
from tests.chat_requests import as_sent
from tests.unit.fake_upstream import FakeUpstream

_POLICY = """
pair: {small: a, large: b}
models:
  a: {base_url: "http://a.test/v1", price: {input: 1, output: 1}, tier: small}
  b: {base_url: "http://b.test/v1", price: {input: 1, output: 1}, tier: large}
routes: {fast: {model: a, fallbacks: [b]}}
auth: {mode: none}
circuit_breaker: {failure_rate: 0.5, min_requests: 2, window_s: 60, reset_after_s: 60}
"""
_FAST_RETRY = RetryPolicy(max_attempts=2, backoff_initial_ms=1, backoff_max_ms=2, max_retry_after_s=0.5)
_BODY = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def route(upstream: FakeUpstream) -> tuple[dict[str, Provider], dict[str, CircuitBreaker]]:
    policy = load_policy_text(_POLICY, environ={}).policy
    providers = {name: build_provider(name, config, {}, upstream.transport) for name, config in policy.models.items()}
    breakers = {name: CircuitBreaker(policy.circuit_breaker) for name in providers}
    return providers, breakers


async def _complete(provider: Provider) -> Completion:
    return await provider.complete(*as_sent({**_BODY, "model": provider.upstream_model}))


async def _send(route: tuple[dict[str, Provider], dict[str, CircuitBreaker]], info: DispatchInfo) -> Completion:
    providers, breakers = route
    return await dispatch(("a", "b"), providers, breakers, _FAST_RETRY, _complete, info)


async def test_a_5xx_is_retried_on_the_same_model_first(upstream: FakeUpstream, route: Any) -> None:
    upstream.fail("a", 503)
    info = DispatchInfo()
    await _send(route, info)
    assert (info.attempts, info.fallback_used, info.provider and info.provider.name) == (2, False, "a")
    assert route[1]["a"].state == "closed"


async def test_a_long_retry_after_moves_to_the_fallback_at_once(upstream: FakeUpstream, route: Any) -> None:
    upstream.fail("a", 429, headers={"retry-after": "30"})
    info = DispatchInfo()
    await _send(route, info)
    assert (info.attempts, info.fallback_used) == (2, True)
    assert upstream.calls_to("a") == 1


async def test_an_upstream_that_fails_what_another_answers_opens_its_circuit(
    upstream: FakeUpstream, route: Any
) -> None:
    upstream.fail("a", 500, times=4)
    for _ in range(2):
        await _send(route, DispatchInfo())
    assert route[1]["a"].state == "open"
    info = DispatchInfo()
    await _send(route, info)
    assert upstream.calls_to("a") == 4 and info.failures[0].code == "upstream_unavailable"


async def test_a_fallback_skipped_for_its_open_circuit_does_not_hide_the_failure_before_it(
    upstream: FakeUpstream, route: Any
) -> None:
    """t72: the skip's "circuit open" was raised, so the request was named after a model it never
    called, and the client never saw the 500 that the first model answered."""
    for _ in range(2):
        route[1]["b"].record_failure()
    assert route[1]["b"].state == "open"
    upstream.fail("a", 500, times=2)
    info = DispatchInfo()
    with pytest.raises(UpstreamStatusError) as raised:
        await _send(route, info)
    assert (raised.value.upstream, raised.value.upstream_status) == ("a", 500)
    assert info.last_failure is raised.value and info.failures[-1].code == "upstream_unavailable"
    assert (info.attempts, info.fallback_used, upstream.calls_to("b")) == (2, False, 0)


async def test_a_request_whose_every_circuit_is_open_is_told_so(upstream: FakeUpstream, route: Any) -> None:
    for name in ("a", "b"):
        for _ in range(2):
            route[1][name].record_failure()
    info = DispatchInfo()
    with pytest.raises(UpstreamUnavailableError):
        await _send(route, info)
    assert info.attempts == 0 and info.last_failure is None and upstream.calls_to("a") == 0


async def test_a_request_that_fails_everywhere_does_not_open_circuits(upstream: FakeUpstream, route: Any) -> None:
    """It may be the request that breaks the servers: healthy traffic must keep its upstreams."""
    upstream.fail("a", 500, times=8)
    upstream.fail("b", 500, times=8)
    for _ in range(4):
        with pytest.raises(UpstreamStatusError):
            await _send(route, DispatchInfo())
    assert route[1]["a"].state == route[1]["b"].state == "closed"


async def test_a_bad_request_is_raised_without_trying_the_fallback(upstream: FakeUpstream, route: Any) -> None:
    upstream.fail("a", 422)
    with pytest.raises(UpstreamStatusError) as raised:
        await _send(route, DispatchInfo())
    assert raised.value.upstream_status == 422 and upstream.calls_to("b") == 0


def _large() -> Provider:
    from gateway.config.schema import ModelConfig, Price
    from gateway.upstreams.registry import build_provider

    return build_provider(
        "large",
        ModelConfig(base_url="http://127.0.0.1:9/v1", price=Price(input_per_mtok=1, output_per_mtok=1), tier="large"),
    )


def test_a_server_killed_mid_answer_is_a_502_not_a_timeout() -> None:
    import aiohttp
    import httpx

    from gateway.errors import UpstreamProtocolError

    # httpx-aiohttp hands aiohttp's connection reset on as a read timeout
    relabelled = httpx.ReadTimeout("read timed out")
    relabelled.__cause__ = aiohttp.ClientOSError(104, "Connection reset by peer")
    error = _large().transport_error(relabelled)
    assert isinstance(error, UpstreamProtocolError) and error.status_code == 502
    assert "ClientOSError" in error.message


def test_transport_errors_are_told_by_type_so_subclasses_are_what_they_subclass() -> None:
    """t77: by class name, aiohttp's newer subclasses fell through to a timeout (httpx-aiohttp hands
    every aiohttp connection error on as a connect timeout)."""
    import aiohttp
    import httpx

    from gateway.errors import UpstreamConnectError, UpstreamProtocolError

    reset = httpx.ConnectTimeout("reset")
    reset.__cause__ = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    assert isinstance(_large().transport_error(reset), UpstreamProtocolError)  # a ConnectionResetError
    unresolved = httpx.ConnectTimeout("dns")
    key = aiohttp.client_reqrep.ConnectionKey("x.invalid", 80, False, True, None, None, None)
    unresolved.__cause__ = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    assert isinstance(_large().transport_error(unresolved), UpstreamConnectError)  # as a refused connection


async def test_a_full_connection_pool_moves_on_but_charges_no_circuit(route: Any) -> None:
    """The pool is the process's, shared by every tenant: one tenant's slow requests filling it
    must not open another tenant's circuit (found by an outside tester)."""
    import httpx

    from gateway.errors import UpstreamBusyError

    providers, breakers = route
    busy = providers["a"].transport_error(httpx.PoolTimeout("no free connection to a.test:80 within 1s"))
    assert isinstance(busy, UpstreamBusyError) and busy.status_code == 504

    async def call(provider: Provider) -> Completion:
        if provider.name == "a":
            raise busy
        return await _complete(provider)

    for _ in range(4):
        info = DispatchInfo()
        await dispatch(("a", "b"), providers, breakers, _FAST_RETRY, call, info)
        assert info.fallback_used
    assert breakers["a"].state == "closed"


async def test_a_client_leaving_in_a_retry_wait_leaves_no_upstream_at_work(upstream: FakeUpstream, route: Any) -> None:
    """Between attempts nothing is at work: a request cancelled there is charged nothing (t27:
    it was billed the prompt at the price of the model whose 500 it was waiting to retry)."""
    upstream.fail("a", 500, times=5)
    slow = RetryPolicy(max_attempts=2, backoff_initial_ms=5000, backoff_max_ms=5000, max_retry_after_s=0.5)
    providers, breakers = route
    info = DispatchInfo()
    task = asyncio.create_task(dispatch(("a", "b"), providers, breakers, slow, _complete, info))
    while not info.failures:
        await asyncio.sleep(0.01)
    assert info.asked is None and upstream.calls_to("a") == 1  # waiting to retry
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert info.asked is None and info.provider is None


def test_calls_no_client_waits_for_have_circuits_of_their_own() -> None:
    """t32: shadow calls that timed out opened the circuits the tenant's requests go through."""
    from gateway.config.schema import CircuitBreakerPolicy
    from gateway.upstreams.breaker import Breakers

    breakers = Breakers()
    breakers.configure(("a", "b"), CircuitBreakerPolicy(failure_rate=0.5, min_requests=2, window_s=60))
    shadow = breakers.off_the_path("t")["b"]
    for _ in range(4):
        shadow.record_broken()
    assert shadow.state == "open"
    assert breakers.for_tenant("t")["b"].state == "closed" and breakers.state("b") == "closed"
    assert breakers.off_the_path("t")["b"] is shadow  # kept, as the tenant's own are


async def test_a_request_of_the_policy_before_a_reload_dispatches_on_its_models(upstream: FakeUpstream) -> None:
    """A request keeps the policy it began on, the breakers are the live ones: after a reload that
    renamed its model, a tenant's first such request was a KeyError, a 500 (t56)."""
    from gateway.config.schema import CircuitBreakerPolicy
    from gateway.upstreams.breaker import Breakers

    policy = load_policy_text(_POLICY, environ={}).policy
    providers = {name: build_provider(name, config, {}, upstream.transport) for name, config in policy.models.items()}
    breakers = Breakers()
    breakers.configure(("renamed-a", "b"), CircuitBreakerPolicy())  # the reloaded policy's names
    info = DispatchInfo()
    completion = await dispatch(("a", "b"), providers, breakers.for_tenant("new"), _FAST_RETRY, _complete, info)
    assert completion.text and info.provider is not None and info.provider.name == "a"


async def test_a_fallback_that_cannot_carry_the_request_leaves_the_first_models_failure(
    upstream: FakeUpstream, route: Any
) -> None:
    """t91: a request the first model took (n > 1, a file part) and whose fallback (Claude) cannot
    carry it: while the first model failed with a 500, the client got the fallback's 400, which
    its SDK never retries, for a request that was fine."""
    upstream.fail("a", 500, times=2)

    async def complete(provider: Provider) -> Completion:
        if provider.name == "b":
            raise InvalidRequestError("n > 1 is not supported by anthropic upstream 'b'", param="n")
        return await _complete(provider)

    providers, breakers = route
    info = DispatchInfo()
    with pytest.raises(UpstreamStatusError) as failed:
        await dispatch(("a", "b"), providers, breakers, _FAST_RETRY, complete, info)
    assert failed.value.upstream_status == 500 and upstream.calls_to("a") == 2
    with pytest.raises(InvalidRequestError):  # the route's first model: the request is the client's to change
        await dispatch(("b", "a"), providers, breakers, _FAST_RETRY, complete, DispatchInfo())


async def test_a_retry_after_that_would_outlast_the_models_total_moves_to_the_fallback(upstream: FakeUpstream) -> None:
    """t95: a model's total bounds all of its attempts together, so a wait that would spend it
    (a Retry-After short enough to be worth waiting for otherwise) goes to the next model instead."""
    text = _POLICY.replace("tier: small}", "tier: small, timeouts: {total: 0.3}}")
    policy = load_policy_text(text, environ={}).policy
    providers = {name: build_provider(name, config, {}, upstream.transport) for name, config in policy.models.items()}
    breakers = {name: CircuitBreaker(policy.circuit_breaker) for name in providers}
    upstream.fail("a", 429, headers={"retry-after": "0.4"})  # within max_retry_after_s (0.5)
    info = DispatchInfo()
    await dispatch(("a", "b"), providers, breakers, _FAST_RETRY, _complete, info)
    assert (info.attempts, info.fallback_used, upstream.calls_to("a")) == (2, True, 1)
