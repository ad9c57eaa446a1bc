"""Which key a request presents, from every header line that may carry one (t98: two
``Authorization`` lines with different keys were served as whichever came first)."""

from __future__ import annotations

import pytest

from gateway.api.credentials import credentials_in
from gateway.auth import AmbiguousKey, Authenticator, hash_key
from gateway.config.schema import AuthKey, AuthPolicy
from gateway.errors import AuthenticationError

A, B = "sk-a-secret", "sk-b-secret"
_AUTH = Authenticator(
    AuthPolicy(mode="keys", keys=[AuthKey(id="a", hash=hash_key(A), tenant="ta"), AuthKey(id="b", hash=hash_key(B))])
)


def _lines(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Header lines as ASGI gives them: names in lower case, values as sent."""
    return [(b"host", b"gateway"), *((name.encode(), value.encode("latin-1")) for name, value in pairs)]


@pytest.mark.parametrize(
    "lines",
    [
        [("authorization", f"Bearer {A}"), ("authorization", f"Bearer {B}")],
        [("authorization", f"Bearer {B}"), ("authorization", f"Bearer {A}")],
        [("x-api-key", A), ("x-api-key", B)],
        [("x-api-key", A), ("authorization", f"Bearer {B}")],
        [("authorization", f"Bearer {B}"), ("x-api-key", A)],
        [("x-api-key", A), ("api-key", B)],  # Azure's header, which a proxy in front may read
        [("authorization", f"Bearer {A}"), ("api-key", B)],
        [("authorization", "Basic dXNlcjpwdw=="), ("authorization", f"Bearer {A}")],  # a singleton field, sent twice
    ],
)
def test_two_different_keys_in_one_request_are_refused_whichever_is_valid(lines: list[tuple[str, str]]) -> None:
    presented = credentials_in(_lines(*lines))
    assert isinstance(presented, AmbiguousKey)
    with pytest.raises(AuthenticationError) as refused:
        _AUTH.authenticate(presented)
    assert refused.value.status_code == 401 and refused.value.code == "ambiguous_api_key"
    said = refused.value.message
    assert said.startswith("ambiguous API key: the ") and A not in said and B not in said  # names headers, no key
    assert {name for name, _ in lines} <= {n for n in ("authorization", "x-api-key", "api-key") if n in said.lower()}


@pytest.mark.parametrize(
    "lines",
    [
        [("authorization", f"Bearer {A}")],
        [("x-api-key", A)],
        [("authorization", f"Bearer {A}"), ("authorization", f"Bearer {A}")],  # the same key twice is one key
        [("authorization", f"Bearer {A}"), ("authorization", f"bearer  {A}")],
        [("x-api-key", A), ("x-api-key", A)],
        [("x-api-key", A), ("authorization", f"Bearer {A}")],  # the anthropic SDK with a key given both ways
        [("x-api-key", A), ("api-key", A)],  # the anthropic SDK's Foundry client sends both
        [("x-api-key", ""), ("authorization", f"Bearer {A}")],  # an empty x-api-key is no key
        [("x-api-key", A), ("authorization", "Basic dXNlcjpwdw==")],  # a proxy's own credentials: no key of ours
    ],
)
def test_one_key_however_often_and_wherever_it_is_sent_is_that_key(lines: list[tuple[str, str]]) -> None:
    assert _AUTH.authenticate(credentials_in(_lines(*lines))).key_id == "a"


def test_a_header_the_gateway_does_not_read_is_no_key_alone() -> None:
    assert credentials_in(_lines()) is None
    assert credentials_in(_lines(("api-key", A))) is None  # Azure's header: refused as no key, as before
    assert credentials_in(_lines(("authorization", f"Basic {A}"))) == f"Basic {A}"  # refused as malformed


def test_ambiguous_credentials_do_not_matter_where_no_key_is_asked_for() -> None:
    open_gateway = Authenticator(AuthPolicy(mode="none"))
    ambiguous = credentials_in(_lines(("authorization", f"Bearer {A}"), ("authorization", f"Bearer {B}")))
    assert open_gateway.authenticate(ambiguous).key_id == "anonymous"
