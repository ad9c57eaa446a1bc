"""policies.yaml validation: messages name the field and the line; ${VAR} substitution."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.envsubst import MissingVariable, substitute
from gateway.config.loader import load_policy, load_policy_text
from gateway.errors import ConfigError

VALID = """\
pair: {small: s, large: l}
models:
  s:
    base_url: ${S_URL:-http://127.0.0.1:1}
    price: {input: 0.1, output: 0.2}
    tier: small
    context_window: ${S_CTX:-4096}
  l:
    base_url: http://127.0.0.1:2
    price: {input: 1, output: 2}
    tier: large
routes:
  fast: {model: s, fallbacks: [l]}
auth: {mode: none}
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, environ=environ or {})
    return caught.value.problems


def test_shipped_policy_is_valid() -> None:
    environ = {"SMALL_MODEL_URL": "http://127.0.0.1:1/v1", "LARGE_MODEL_URL": "http://127.0.0.1:2/v1"}
    loaded = load_policy(Path(__file__).parent.parent / "policies.yaml", environ=environ)
    assert set(loaded.policy.routes) >= {"auto", "fast", "best"}
    assert loaded.policy.models["small"].simulated is False


def test_shipped_policy_names_the_unset_model_urls() -> None:
    with pytest.raises(ConfigError) as caught:
        load_policy(Path(__file__).parent.parent / "policies.yaml", environ={})
    assert [p.split(" ")[0] for p in caught.value.problems] == ["models.small.base_url", "models.large.base_url"]


def test_valid_policy_and_env_defaults() -> None:
    loaded = load_policy_text(VALID, environ={"S_CTX": "999"})
    assert loaded.policy.models["s"].context_window == 999  # a plain ${VAR} becomes an int
    assert loaded.policy.models["s"].base_url == "http://127.0.0.1:1"
    assert len(loaded.version) == 12


def test_version_changes_with_content() -> None:
    assert load_policy_text(VALID, environ={}).version != load_policy_text(VALID + "\n# edit\n", environ={}).version


def test_wrong_type_names_model_field_and_line() -> None:
    [message] = problems(VALID.replace("input: 1,", 'input: "one",'))
    assert message.startswith("models.l.price.input (line 10)") and "float" in message


def test_unknown_field_is_rejected() -> None:
    [message] = problems(VALID.replace("    tier: large", "    tier: large\n    tempreature: 1"))
    assert "models.l" in message and "tempreature" in message


def test_unknown_model_reference_names_route_and_line() -> None:
    [message] = problems(VALID.replace("fallbacks: [l]", "fallbacks: [nope]"))
    assert message.startswith("routes.fast.fallbacks[0] (line 13)") and "'nope'" in message


def test_tier_mismatch_in_pair() -> None:
    assert any("tier" in p for p in problems(VALID.replace("pair: {small: s, large: l}", "pair: {small: l, large: s}")))


def test_unset_variable_without_default_is_named() -> None:
    [message] = problems(VALID.replace("${S_URL:-http://127.0.0.1:1}", "${S_URL}"))
    assert "S_URL" in message and "line 4" in message


def test_invalid_yaml_reports_line() -> None:
    [message] = problems("pair: {small: s\nmodels: [")
    assert "line" in message and "YAML" in message


def test_several_problems_are_reported_together() -> None:
    text = VALID.replace("input: 1,", 'input: "x",').replace("tier: small", "tier: medium")
    assert len(problems(text)) == 2


def test_bad_base_url_and_duplicate_keys() -> None:
    assert any("base_url" in p for p in problems(VALID.replace("http://127.0.0.1:2", "ftp://x")))
    assert any("duplicate" in p for p in problems(VALID + "routes:\n  best: {model: l}\n"))


def test_substitute_semantics() -> None:
    assert substitute("${A}-${B:-dflt}", {"A": "x"}) == "x-dflt"
    assert substitute("${B:-dflt}", {"B": ""}) == "dflt"  # as the shell: empty counts as unset
    assert substitute("$${NOT} plain", {"NOT": "y"}) == "$y plain"
    with pytest.raises(MissingVariable):
        substitute("${MISSING}", {})
