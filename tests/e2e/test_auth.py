"""API keys against a real gateway process: 401/403 bodies, model allow-lists, and no secrets in the logs."""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import closed_after_test, upstream_stats
from tests.gateway_process import GatewayProcess, policy_text, start_gateway

UPSTREAM_KEY = "sk-large-secret-123"
# Unique per run, so finding one in a log can only mean this run leaked it.
APP_SECRET = f"sk-gw-app-{uuid.uuid4().hex}"
ADMIN_SECRET = f"sk-gw-admin-{uuid.uuid4().hex}"
WRONG_SECRET = f"sk-gw-wrong-{uuid.uuid4().hex}"
MALFORMED_SECRET = f"sk-gw-basic-{uuid.uuid4().hex}"
MARKER = f"zebra-{uuid.uuid4().hex}-marker"


def _sha256(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


AUTH = f"""auth:
  mode: keys
  keys:
    - {{id: app-1, tenant: team-a, hash: "{_sha256(APP_SECRET)}", models: [fast]}}
    - {{id: admin-1, tenant: team-ops, hash: "{_sha256(ADMIN_SECRET)}", models: ["*"]}}
"""


@pytest.fixture(scope="module")
def auth_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        tmp_path_factory.mktemp("auth-gw"),
        policy_text(small_upstream, large_upstream, auth=AUTH),
        env={"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": UPSTREAM_KEY},
    )
    yield gw
    gw.stop()


@pytest.fixture
def gw(
    auth_gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> GatewayProcess:
    return auth_gateway  # (asking for the upstreams resets their faults and stats per test)


def _sdk(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return closed_after_test(openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=10))


def _messages(text: str = "") -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"{MARKER} {text}".strip()}]


def _raw_chat(gw: GatewayProcess, headers: dict[str, str], model: str = "fast") -> httpx.Response:
    return httpx.post(f"{gw.base_url}/chat/completions", json={"model": model, "messages": _messages()},
                      headers=headers, timeout=10)  # fmt: skip


def _assert_openai_error(response: httpx.Response, status: int, error_type: str, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    error: dict[str, object] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


def test_missing_wrong_and_malformed_keys_get_401(gw: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    # No Authorization header at all.
    error = _assert_openai_error(_raw_chat(gw, {}), 401, "authentication_error", "invalid_api_key")
    assert "missing" in str(error["message"]).lower()

    # A well-formed but unknown key, through the SDK.
    with pytest.raises(openai.AuthenticationError) as caught:
        _sdk(gw, WRONG_SECRET).chat.completions.create(model="fast", messages=_messages("wrong key"))
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "authentication_error"
    assert WRONG_SECRET not in str(caught.value)  # the error does not echo the key back

    # Malformed headers: another scheme, a bearer without a key, no space, a bare token.
    for value in (f"Basic {MALFORMED_SECRET}", "Bearer", f"Bearer{MALFORMED_SECRET}", MALFORMED_SECRET):
        error = _assert_openai_error(_raw_chat(gw, {"authorization": value}), 401, "authentication_error",
                                     "invalid_api_key")  # fmt: skip
        assert MALFORMED_SECRET not in str(error["message"])

    # A valid key with a wrong scheme is still refused.
    _assert_openai_error(_raw_chat(gw, {"authorization": f"Basic {APP_SECRET}"}), 401, "authentication_error",
                         "invalid_api_key")  # fmt: skip

    # Unauthenticated requests never reach an upstream.
    assert upstream_stats(small_upstream)["chat_requests"] == 0

    # /v1/models needs a key too.
    with pytest.raises(openai.AuthenticationError):
        _sdk(gw, WRONG_SECRET).models.list()
    _assert_openai_error(httpx.get(f"{gw.base_url}/models", timeout=5), 401, "authentication_error", "invalid_api_key")


def test_allowed_key_on_allowed_route(gw: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    raw = _sdk(gw, APP_SECRET).chat.completions.with_raw_response.create(model="fast", messages=_messages("allowed"))
    completion = raw.parse()
    assert raw.http_response.status_code == 200
    assert completion.choices[0].message.content
    assert raw.headers["x-gateway-model"] == "small"

    record = gw.wait_for_record(raw.headers["x-request-id"])
    assert record["key_id"] == "app-1"
    assert record["tenant"] == "team-a"
    assert record["status"] == 200

    # The client's key is the gateway's business, not the upstream's.
    stats = upstream_stats(small_upstream)
    assert stats["chat_requests"] == 1
    assert stats["last_api_key"] != APP_SECRET
    assert APP_SECRET not in str(stats["last_request"])


def test_key_on_a_model_it_may_not_use_is_told_it_does_not_exist(
    gw: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    """A forbidden name gets the 404 an unknown one gets: a key cannot list the others' models."""
    client = _sdk(gw, APP_SECRET)
    said = set()
    for model in ("best", "large", "small", "no-such-model"):  # a route, raw models, a name that is not there
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model=model, messages=_messages("forbidden"))
        assert caught.value.status_code == 404
        assert caught.value.code == "model_not_found"
        said.add(str(caught.value.body["message"]).replace(f"'{model}'", "NAME"))  # type: ignore[index]
        request_id = caught.value.response.headers["x-request-id"]
        record = gw.wait_for_record(request_id)
        assert (record["status"], record["key_id"], record["tenant"]) == (404, "app-1", "team-a")
        assert record["error_type"] == "model_not_found"
    assert len(said) == 1 and said.pop().endswith("available: fast")  # only what this key may call
    assert upstream_stats(large_upstream)["chat_requests"] == 0
    admin = _sdk(gw, ADMIN_SECRET)
    with pytest.raises(openai.NotFoundError) as listed:
        admin.chat.completions.create(model="FAST", messages=_messages("typo"))
    assert "best" in listed.value.message and "large" in listed.value.message
    for path, body in (
        ("/embeddings", {"model": "best", "input": "x"}),
        ("/messages/count_tokens", {"model": "best", "messages": _messages()}),
        ("/responses", {"model": "best", "input": "x"}),
    ):
        response = httpx.post(f"{gw.base_url}{path}", headers={"authorization": f"Bearer {APP_SECRET}"},
                              json=body, timeout=10)  # fmt: skip
        assert response.status_code == 404, (path, response.text)
        assert "best" not in response.text.split("available:")[-1]


def test_models_list_shows_only_allowed_names(gw: GatewayProcess) -> None:
    assert [m.id for m in _sdk(gw, APP_SECRET).models.list()] == ["fast"]
    by_anthropic_header = httpx.get(f"{gw.base_url}/models", headers={"x-api-key": APP_SECRET}, timeout=10)
    assert [m["id"] for m in by_anthropic_header.json()["data"]] == ["fast"]  # the key as Anthropic's SDK sends it
    every = {m.id for m in _sdk(gw, ADMIN_SECRET).models.list()}
    assert {"fast", "best", "auto"} <= every


def test_wildcard_key_reaches_the_large_model_with_the_upstream_key(
    gw: GatewayProcess, large_upstream: SimulatedUpstream
) -> None:
    raw = _sdk(gw, ADMIN_SECRET).chat.completions.with_raw_response.create(model="best", messages=_messages("admin"))
    assert raw.http_response.status_code == 200
    assert raw.headers["x-gateway-model"] == "large"
    record = gw.wait_for_record(raw.headers["x-request-id"])
    assert (record["key_id"], record["tenant"]) == ("admin-1", "team-ops")
    # The gateway swapped the client's key for the upstream's own.
    assert upstream_stats(large_upstream)["last_api_key"] == UPSTREAM_KEY


def test_streamed_request_with_key_is_logged_with_its_tenant(gw: GatewayProcess) -> None:
    with _sdk(gw, APP_SECRET).chat.completions.with_streaming_response.create(
        model="fast", messages=_messages("streamed"), stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    assert chunks
    record = gw.wait_for_record(request_id)
    assert (record["key_id"], record["tenant"], record["stream"], record["status"]) == ("app-1", "team-a", True, 200)


def test_a_request_carrying_two_different_keys_is_refused_in_its_protocol(
    gw: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t98: two ``Authorization`` (or ``x-api-key``) lines with different keys were served as the
    first one, which a proxy in front reading the last would take for another caller."""
    app, admin = f"Bearer {APP_SECRET}", f"Bearer {ADMIN_SECRET}"
    for lines in (
        [("authorization", admin), ("authorization", app)],
        [("authorization", app), ("authorization", admin)],
        [("x-api-key", APP_SECRET), ("x-api-key", ADMIN_SECRET)],
        [("x-api-key", ADMIN_SECRET), ("authorization", app)],
        [("authorization", admin), ("api-key", APP_SECRET)],
    ):
        refused = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "best", "messages": _messages()},
                             headers=lines, timeout=10)  # fmt: skip
        error = _assert_openai_error(refused, 401, "authentication_error", "ambiguous_api_key")
        said = str(error["message"])
        assert said.startswith("ambiguous API key: the ") and "send one key" in said, said
        assert APP_SECRET not in refused.text and ADMIN_SECRET not in refused.text
        record = gw.wait_for_record(refused.headers["x-request-id"])
        assert (record["status"], record["key_id"], record["error_type"]) == (401, "-", "ambiguous_api_key")
        listed = httpx.get(f"{gw.base_url}/models", headers=lines, timeout=10)
        _assert_openai_error(listed, 401, "authentication_error", "ambiguous_api_key")

    # an Anthropic client is told in Anthropic's shape, and its SDK raises AuthenticationError
    body = {"model": "fast", "max_tokens": 16, "messages": [{"role": "user", "content": MARKER}]}
    both = [("x-api-key", APP_SECRET), ("authorization", admin)]
    for path in ("/messages", "/messages/count_tokens"):
        refused = httpx.post(f"{gw.base_url}{path}", json=body, headers=both, timeout=10)
        assert refused.status_code == 401, (path, refused.text)
        assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "authentication_error"
        assert refused.json()["error"]["message"].startswith("ambiguous API key: the x-api-key and Authorization")
    claude = closed_after_test(anthropic.Anthropic(base_url=gw.url, api_key=APP_SECRET, max_retries=0, timeout=10,
                                                   default_headers={"x-api-key": ADMIN_SECRET}))  # fmt: skip
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(model="fast", max_tokens=16, messages=[{"role": "user", "content": MARKER}])
    assert upstream_stats(small_upstream)["chat_requests"] == 0

    # one key, however often and wherever it is sent, is that key; and the SDKs as they are used
    for lines in (
        [("authorization", app), ("authorization", app)],
        [("x-api-key", APP_SECRET), ("authorization", app)],  # older anthropic SDKs, given the key both ways
        [("x-api-key", APP_SECRET), ("api-key", APP_SECRET)],  # Anthropic's Foundry client sends both
    ):
        served = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "fast", "messages": _messages()},
                            headers=lines, timeout=10)  # fmt: skip
        assert served.status_code == 200, served.text
    for client in (
        anthropic.Anthropic(base_url=gw.url, api_key=APP_SECRET, max_retries=0, timeout=10),
        anthropic.Anthropic(base_url=gw.url, auth_token=APP_SECRET, max_retries=0, timeout=10),
        anthropic.AnthropicFoundry(base_url=gw.url, api_key=APP_SECRET, max_retries=0, timeout=10),
    ):
        message = closed_after_test(client).messages.create(
            model="fast", max_tokens=16, messages=[{"role": "user", "content": MARKER}]
        )
        assert message.content, client
    assert _sdk(gw, APP_SECRET).chat.completions.create(model="fast", messages=_messages("one key")).choices


def test_no_secrets_or_prompts_in_the_logs(gw: GatewayProcess) -> None:
    """Runs last in the module: everything the tests above sent must be absent from both logs."""
    # Make sure at least one request of each kind has been made in this module, even if run alone.
    _raw_chat(gw, {"authorization": f"Bearer {WRONG_SECRET}"})
    _raw_chat(gw, {"authorization": f"Bearer {APP_SECRET}"})
    _raw_chat(gw, {"authorization": f"Bearer {APP_SECRET}"}, model="best")
    last = _raw_chat(gw, {"authorization": f"Bearer {ADMIN_SECRET}"}, model="best")
    assert last.status_code == 200
    gw.wait_for_record(last.headers["x-request-id"])

    stdout = gw.log_path.read_text(errors="replace")
    stderr = gw.stderr_text()
    assert stdout.strip(), "no request log lines were written"
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        for secret in (APP_SECRET, ADMIN_SECRET, WRONG_SECRET, MALFORMED_SECRET, UPSTREAM_KEY, MARKER, "Bearer"):
            assert secret not in text, f"{secret!r} found in the gateway's {name}"
        assert "authorization" not in text.lower(), f"an Authorization header found in the gateway's {name}"
    # The log still says who called.
    records = gw.log_records()
    assert {("app-1", "team-a"), ("admin-1", "team-ops")} <= {(r["key_id"], r["tenant"]) for r in records}


@pytest.mark.parametrize(
    ("path", "forbidden", "body"),
    [
        ("/messages", "claude", {"max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
                                 "messages": [{"role": "user", "content": "hi"}]}),
        ("/messages", "claude", {"max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]}),
        ("/messages", "claude", {"max_tokens": 64, "container": "c1", "messages": [{"role": "user", "content": "hi"}]}),
        ("/messages/count_tokens", "claude", {"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]}),
        ("/responses", "gpt", {"input": "hi", "tools": [{"type": "web_search"}]}),
        ("/responses", "gpt", {"input": "hi", "conversation": "conv_1"}),
        ("/responses", "gpt", {"input": "hi", "text": {"format": {"type": "json_object"}}}),
    ],
)  # fmt: skip
def test_a_forbidden_name_and_an_unknown_one_get_the_same_answer_on_every_path(
    gw: GatewayProcess, path: str, forbidden: str, body: dict[str, Any]
) -> None:
    """t30: requests an edge decoded by what the name reaches (Anthropic-only or Responses-API
    routes) were answered otherwise for a forbidden name than for one that is not there."""
    seen = []
    for model in (forbidden, "no-such-model"):
        response = httpx.post(f"{gw.base_url}{path}", json={**body, "model": model}, timeout=10,
                              headers={"authorization": f"Bearer {APP_SECRET}"})  # fmt: skip
        seen.append(
            (response.status_code, response.text.replace(model, "NAME"), response.headers.get("x-gateway-dropped"))
        )
    assert seen[0] == seen[1]


def _chunked_with_trailer(gw: GatewayProcess, target: str, body: bytes, headers: str, trailer: str) -> bytes:
    """The answer to a chunked request whose trailer section holds ``trailer``, all sent in one write."""
    host, port = gw.url.removeprefix("http://").split(":")
    request = (
        f"{target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n{headers}"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer.encode())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_key_or_request_id_in_a_chunked_trailer_is_not_a_request_header(
    gw: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    """t168: uvicorn's httptools protocol added a trailer's fields to the request's headers when it
    came in the same read as the head: a key sent only there was served (RFC 9110 §6.5.1: trailer
    fields are not headers; a proxy authorizing by header would disagree about who calls)."""
    chat = msgspec.json.encode({"model": "fast", "messages": _messages("trailer")})
    messages = msgspec.json.encode({"model": "fast", "max_tokens": 16, "messages": _messages("trailer")})
    for target, body, trailer in (
        ("POST /v1/chat/completions", chat, f"Authorization: Bearer {APP_SECRET}\r\n"),
        ("POST /v1/messages", messages, f"x-api-key: {APP_SECRET}\r\n"),
        ("GET /v1/usage", b"{}", f"Authorization: Bearer {ADMIN_SECRET}\r\n"),
    ):
        answer = _chunked_with_trailer(gw, target, body, "", trailer)
        assert answer.startswith(b"HTTP/1.1 401 "), (target, answer[:200])
    assert upstream_stats(small_upstream)["chat_requests"] == 0
    answer = _chunked_with_trailer(gw, "POST /v1/chat/completions", chat, f"Authorization: Bearer {APP_SECRET}\r\n",
                                   "x-request-id: from-the-trailer\r\n")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert re.search(rb"(?i)\r\nx-request-id: [^\r]+", answer) and b"from-the-trailer" not in answer
