"""Generated request bodies against the real gateway: none may produce a 5xx (issue 11, defect 4).

Bodies are shaped like chat requests with every field free to hold the wrong type
(content parts whose ``text`` is an int, null, list, object or bool; roles, tools and
options of any JSON type), plus arbitrary JSON and raw bytes. The gateway runs with the
cache, the semantic cache and limits on, so every step that reads the body is reached.
``FUZZ_EXAMPLES`` sets the count (default 3,000 per route).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1200"))
"""Per test run (derandomized: the same bodies each run); FUZZ_EXAMPLES=20000 for a longer hunt.
1,200 keeps the whole suite under 10 minutes on 2 cores (this session added 38 tests)."""

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)  # fmt: skip
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value, or one time in twelve any JSON value: most bodies get past validation and
    reach the cache, the router, the upstream and the accounting, the rest test each check."""
    return st.sampled_from([True] * 11 + [False]).flatmap(lambda keep: valid if keep else _json)


_text_part = st.fixed_dictionaries({"type": st.just("text"), "text": _mostly(st.text(max_size=80))})
_other_part = st.fixed_dictionaries(
    {"type": _mostly(st.sampled_from(["image_url", "input_audio", "refusal", "file"]))},
    optional={"text": _json, "image_url": _mostly(st.fixed_dictionaries({"url": st.text(max_size=30)}))},
)
_content = _mostly(
    st.one_of(st.text(max_size=200), st.lists(st.one_of(_text_part, _text_part, _other_part), max_size=3))
)
_message = st.fixed_dictionaries(
    {
        "role": _mostly(st.sampled_from(["system", "developer", "user", "user", "assistant", "tool"])),
        "content": _content,
    },
    optional={
        "name": _mostly(st.text(max_size=10)),
        "tool_calls": _mostly(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "id": st.text(max_size=5),
                        "type": st.just("function"),
                        "function": st.fixed_dictionaries(
                            {"name": st.text(max_size=5), "arguments": st.text(max_size=20)}
                        ),
                    }
                ),
                max_size=2,
            )
        ),
        "tool_call_id": _mostly(st.text(max_size=10)),
    },
)
_chat_body = st.fixed_dictionaries(
    {
        "model": _mostly(st.sampled_from(["fast", "auto", "best", "small", "nope"])),
        "messages": _mostly(st.lists(_message, min_size=1, max_size=3)),
    },
    optional={
        "stream": _mostly(st.booleans()),
        "stream_options": _mostly(st.fixed_dictionaries({"include_usage": _mostly(st.booleans())})),
        "temperature": _mostly(st.floats(min_value=0, max_value=2)),
        "max_tokens": _mostly(st.integers(min_value=1, max_value=64)),
        "n": _mostly(st.integers(min_value=1, max_value=3)),
        "stop": _mostly(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4))),
        "seed": _mostly(st.integers()),
        "tools": _mostly(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.just("function"),
                        "function": st.fixed_dictionaries(
                            {"name": st.text(min_size=1, max_size=8)},
                            optional={"parameters": st.just({"type": "object"})},
                        ),
                    }
                ),
                max_size=2,
            )
        ),
        "tool_choice": _mostly(st.sampled_from(["auto", "none"])),
        "response_format": _mostly(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
        "user": _mostly(st.text(max_size=10)),
        "gateway_cache": _mostly(st.sampled_from(["no-store", "no-cache", {"read": False}])),
    },
)
_raw = st.one_of(st.binary(max_size=64), _json.map(msgspec.json.encode))


@pytest.fixture(scope="module")
def fuzz_gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: Any,
    small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:  # fmt: skip
    auth = f"""auth:
  mode: keys
  keys: [{{id: fuzz, tenant: fuzz, hash: "sha256:{_digest()}", limits: {{rpm: 1000000, usd_per_day: 1000000}}}}]"""
    policy = policy_text(small_upstream, large_upstream, auth=auth,
                         cache="{enabled: true, redis_timeout_ms: 2000, semantic: {enabled: true, max_temperature: 2}}")  # fmt: skip
    process = start_gateway(Path(tmp_path_factory.mktemp("fuzz")), policy,
                            env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "k", "TEST_ANTHROPIC_KEY": "k"})  # fmt: skip
    yield process
    process.stop()


def _digest() -> str:
    import hashlib

    return hashlib.sha256(b"sk-fuzz").hexdigest()


@pytest.fixture(scope="module")
def http(fuzz_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fuzz_gateway.base_url, timeout=30, headers={"authorization": "Bearer sk-fuzz"}
    ) as client:
        yield client


_STATUSES: Counter[int] = Counter()


def _post(http: httpx.Client, content: bytes) -> None:
    with http.stream("POST", "/chat/completions", content=content, headers={"content-type": "application/json"}) as r:
        r.read()
        _STATUSES[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, content[:300], r.text[:300])
        assert r.headers.get("x-request-id"), content[:300]
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
            assert b'"internal_error"' not in r.content, content[:300]


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=_chat_body)
def test_defect4_generated_chat_bodies_never_get_a_5xx(http: httpx.Client, body: dict[str, Any]) -> None:
    _post(http, msgspec.json.encode(body))


@settings(max_examples=_EXAMPLES // 3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=_raw)
def test_defect4_arbitrary_bytes_never_get_a_5xx(http: httpx.Client, raw: bytes) -> None:
    _post(http, raw)


_query_value = st.one_of(st.text(max_size=30), st.dates().map(str), st.sampled_from(["2026-02-30", "0000-01-01", "-1"]))


@settings(max_examples=_EXAMPLES // 3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(query=st.dictionaries(st.sampled_from(["start", "end", "x"]), _query_value, max_size=3),
       model_id=st.text(min_size=1, max_size=40))  # fmt: skip
def test_defect4_generated_usage_and_model_queries_never_get_a_5xx(
    http: httpx.Client, query: dict[str, str], model_id: str
) -> None:
    for response in (http.get("/usage", params=query), http.get(f"/models/{quote(model_id, safe='')}")):
        _STATUSES[response.status_code] += 1
        assert response.status_code < 500, (response.status_code, query, model_id, response.text[:300])


def test_fuzz_figures_are_reported(fuzz_gateway: GatewayProcess) -> None:
    """Prints what the two fuzz tests sent (pytest -s shows it; the closing note quotes it)."""
    total = sum(_STATUSES.values())
    print(f"\nfuzz: {total} requests, statuses {dict(sorted(_STATUSES.items()))}")
    internal = [r for r in fuzz_gateway.log_records() if r.get("status", 0) >= 500]
    assert not internal
