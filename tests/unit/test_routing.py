"""Router: which models a request tries, in order."""

from __future__ import annotations

import pytest

from gateway.config.loader import load_policy_text
from gateway.errors import BudgetExceededError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError
from gateway.routing import Router

POLICY = """\
pair: {small: s, large: l}
models:
  s: {base_url: "http://127.0.0.1:1", price: {input: 0.1, output: 0.2}, tier: small}
  l: {base_url: "http://127.0.0.1:2", price: {input: 1, output: 2}, tier: large}
  l2: {base_url: "http://127.0.0.1:2", price: {input: 1, output: 2}, tier: large}
routes:
  auto: {strategy: classifier, model: s, fallbacks: [l], threshold: 0.5}
  both: {model: s, fallbacks: [l2]}
auth: {mode: none}
"""


def _router() -> Router:
    return Router(load_policy_text(POLICY, environ={}).policy)


def test_a_large_pick_falls_back_to_the_routes_own_model() -> None:
    router = _router()
    auto = router.plan("auto")
    assert router.classify(auto, 0.9).candidates == ("l", "s")
    assert router.classify(auto, 0.1).candidates == ("s", "l")


def test_a_name_the_key_may_not_call_is_refused_as_an_unknown_one_is() -> None:
    """A key must not tell the models and routes it may not call from names that do not exist."""
    router = _router()
    only_s = frozenset({"s"})
    assert router.plan("s", only_s).candidates == ("s",)
    messages = []
    for name in ("l", "auto", "no-such-model"):
        with pytest.raises(ModelNotFoundError) as refused:
            router.plan(name, only_s)
        assert refused.value.status_code == 404 and refused.value.param == "model"
        messages.append(refused.value.message.replace(f"'{name}'", "NAME"))
    assert len(set(messages)) == 1 and messages[0].endswith("available: s")


def test_a_continued_response_goes_where_its_upstream_keeps_it() -> None:
    router = _router()
    both = router.plan("both")
    shared = router.continuing(both, "l")  # l2 is the same server and key as l
    assert shared.candidates == ("l2",) and shared.decision == "previous_response"
    assert router.continuing(both, "s").candidates == ("s",) and router.continuing(both, "s").decision == "fixed"
    elsewhere = router.continuing(router.plan("s"), "l")
    assert elsewhere.candidates == ("l",) and elsewhere.decision == "previous_response"


def test_a_response_id_reaches_no_model_the_key_may_not_use() -> None:
    router = _router()
    only_s = frozenset({"s"})
    with pytest.raises(PermissionDeniedError) as refused:
        router.continuing(router.plan("s"), "l", only_s)
    assert refused.value.param == "previous_response_id"
    # a route the key may call reaches the holder anyway: a classifier route may end at the large model
    assert router.continuing(router.plan("auto"), "l", frozenset({"auto"})).candidates[0] == "l"
    with pytest.raises(InvalidRequestError):  # the holder left the policy in a reload
        router.continuing(router.plan("s"), "gone")
    # a nearly spent budget keeps auto on the small model: the holder alone would skip that
    with pytest.raises(BudgetExceededError):
        router.continuing(router.downgrade(router.plan("auto")), "l")


def test_a_request_may_end_at_its_fallbacks_and_a_classifier_routes_large_pick() -> None:
    # what a budget estimate is priced at: a route whose baseline is small still picks large
    policy = POLICY.replace("auth:", "  cheap: {strategy: classifier, model: s, baseline: s, threshold: 0.5}\nauth:")
    router = Router(load_policy_text(policy, environ={}).policy)
    assert set(router.ends(router.plan("cheap"))) == {"s", "l"}
    assert router.ends(router.plan("both")) == ("s", "l2")
    assert router.ends(router.plan("s")) == ("s",)
