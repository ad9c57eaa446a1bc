"""policies.yaml validation: messages name the field and the line; ${VAR} substitution."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.accounting.metrics import Metrics
from gateway.auth import hash_key
from gateway.config import schema
from gateway.config.envsubst import MissingVariable, substitute
from gateway.config.kept import keep_policy, kept_key_file
from gateway.config.loader import load_keys, load_policy, load_policy_text, without_unlisted_keys
from gateway.config.schema import Limits, RequestLogPolicy
from gateway.config.validate import ENGINE_FIELDS_TAKEN
from gateway.errors import ConfigError
from gateway.runtime import RuntimeHolder, keep_last_good, load_at_start

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

CLASSIFIER = """\
pair: {small: small, large: large}
models:
  small: {base_url: "http://127.0.0.1:1/v1", price: {input: 0.2, output: 0.2}, tier: small}
  large: {base_url: "http://127.0.0.1:2/v1", price: {input: 2.5, output: 10}, tier: large}
  embed: {kind: embedding, base_url: "http://127.0.0.1:1/v1", price: {input: 0.02, output: 0}}
routes:
  auto:
    strategy: classifier
    model: small
    fallbacks: [large]
    threshold: 0.80
  fast:
    model: small
    fallbacks: [large]
auth: {mode: none}
"""
"""The shipped policy's routes and models, as the tests that edit them need them: policies.yaml
is the user's to edit (t96: with its `learning:` line uncommented, as it suggests, five tests
that add one failed on a duplicate key)."""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, environ=environ or {})
    return caught.value.problems


def test_shipped_policy_is_valid() -> None:
    environ = {"SMALL_MODEL_URL": "http://127.0.0.1:1/v1", "LARGE_MODEL_URL": "http://127.0.0.1:2/v1"}
    loaded = load_policy(Path(__file__).parents[2] / "policies.yaml", environ=environ)
    assert set(loaded.policy.routes) >= {"auto", "fast", "best"}
    assert loaded.policy.models["small"].simulated is False


def test_shipped_policy_names_the_unset_model_urls() -> None:
    with pytest.raises(ConfigError) as caught:
        load_policy(Path(__file__).parents[2] / "policies.yaml", environ={})
    assert [p.split(" ")[0] for p in caught.value.problems] == [
        "models.small.base_url", "models.large.base_url", "models.embed.base_url"
    ]  # fmt: skip
    assert "SMALL_MODEL_URL" in caught.value.problems[2]  # the embeddings server defaults to the small model's


def test_nested_defaults_resolve_only_when_used() -> None:
    from gateway.config.envsubst import MissingVariable, substitute

    assert substitute("${A:-${B}}", {"B": "http://b"}) == "http://b"
    assert substitute("${A:-${NOT_SET}}", {"A": "http://a"}) == "http://a"  # the default is never looked at
    assert substitute("x-${A:-${C:-deep}}-y", {}) == "x-deep-y"
    assert substitute("${A:-unclosed", {}) == "${A:-unclosed"
    with pytest.raises(MissingVariable):
        substitute("${A:-${NOT_SET}}", {})


def test_valid_policy_and_env_defaults() -> None:
    loaded = load_policy_text(VALID, environ={"S_CTX": "999"})
    assert loaded.policy.models["s"].context_window == 999  # a plain ${VAR} becomes an int
    assert loaded.policy.models["s"].base_url == "http://127.0.0.1:1"
    assert len(loaded.version) == 12


def test_version_changes_with_content() -> None:
    assert load_policy_text(VALID, environ={}).version != load_policy_text(VALID + "\n# edit\n", environ={}).version


def test_wrong_type_names_model_field_and_line() -> None:
    [message] = problems(VALID.replace("input: 1,", 'input: "one",'))
    assert message == "models.l.price.input (line 10): expected a number, got the string 'one'"


def test_unknown_field_is_rejected() -> None:
    [message] = problems(VALID.replace("    tier: large", "    tier: large\n    tempreature: 1"))
    assert "models.l" in message and "tempreature" in message


def test_unknown_model_reference_names_route_and_line() -> None:
    [message] = problems(VALID.replace("fallbacks: [l]", "fallbacks: [nope]"))
    assert message.startswith("routes.fast.fallbacks[0] (line 13)") and "'nope'" in message


@pytest.mark.parametrize("name", ["fast/", "/fast", "fast lane"])
def test_a_name_that_cannot_round_trip_through_a_path_is_refused(name: str) -> None:
    [message] = problems(VALID.replace("  fast: {model: s", f"  {name!r}: {{model: s"))
    assert message.startswith(f"routes.{name} (line 13)") and "no `/` at either end" in message


def test_a_name_may_hold_inner_slashes() -> None:
    assert "org/fast" in load_policy_text(VALID.replace("  fast: {model: s", "  org/fast: {model: s")).policy.routes


def test_a_key_pasted_into_api_key_env_is_refused_and_never_shown() -> None:
    [message] = problems(VALID.replace("    tier: large", "    tier: large\n    api_key_env: sk-live-SECRET123"))
    assert message.startswith("models.l.api_key_env (line 12)") and "SECRET" not in message


def test_a_key_shaped_like_a_variable_name_is_not_shown_in_the_warning() -> None:
    # "gsk_..." passes the name pattern; the warning that it is unset must not print it
    pasted = VALID.replace("    tier: large", "    tier: large\n    api_key_env: gsk_live4SECRET123")
    notes = load_policy_text(pasted, environ={}).warnings
    assert any(note.startswith("models.l.api_key_env: the variable it names") for note in notes)
    assert not any("SECRET" in note for note in notes)
    named = VALID.replace("    tier: large", "    tier: large\n    api_key_env: LARGE_MODEL_API_KEY")
    notes = load_policy_text(named, environ={}).warnings
    assert "models.l.api_key_env: LARGE_MODEL_API_KEY is not set; requests to it carry no API key" in notes


def test_a_misspelt_encoding_is_refused() -> None:
    [message] = problems(VALID.replace("    tier: large", "    tier: large\n    encoding: cl100k_bse"))
    assert message.startswith("models.l.encoding") and "'cl100k_bse'" in message and "cl100k_base" in message


def test_likely_mistakes_in_keys_are_noted() -> None:
    keys = """auth:
  mode: keys
  keys:
    - {id: k1, hash: "sha256:%s", tenant: team_a, models: [autoo, fast]}
tenants:
  team-a: {limits: {usd_per_day: 5}}
""" % ("0" * 64)
    notes = load_policy_text(VALID.replace("auth: {mode: none}\n", keys), environ={}).warnings
    assert "key k1: models autoo are neither routes nor models; it cannot call them" in notes
    assert "key k1: tenant 'team_a' is not under tenants:, so no tenant limits apply to it" in notes
    no_file = "auth: {mode: keys, key_file: no-such-keys.yaml}"
    empty = load_policy_text(VALID.replace("auth: {mode: none}", no_file), environ={}).warnings
    assert any(
        note.startswith("auth: mode keys with no key (") and "no-such-keys.yaml does not exist" in note
        for note in empty
    )


def test_a_cors_origin_a_browser_never_sends_is_refused() -> None:
    allowed = 'cors: {allow_origins: ["https://App.Example/", "http://localhost:3000", "*"]}\n'
    assert load_policy_text(VALID + allowed, environ={}).policy.cors.allow_origins[1] == "http://localhost:3000"
    [message] = problems(VALID + 'cors: {allow_origins: ["https://app.example/chat"]}\n')
    assert message.startswith("cors.allow_origins[0]") and "no path" in message


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


def test_range_checks_name_the_field_and_value() -> None:
    [message] = problems(VALID.replace("input: 1,", "input: -1,"))
    assert (
        message
        == "models.l.price.input (line 10): must be a price in USD per million tokens, from 0 to 1,000,000, got -1"
    )
    [message] = problems(VALID.replace("fallbacks: [l]", "fallbacks: [l], threshold: 1.5"))
    assert message == "routes.fast.threshold (line 13): must be a number from 0 to 1, got 1.5"
    [message] = problems(VALID + "tenants:\n  t: {limits: {rpm: -1}}\n")
    assert message == "tenants.t.limits.rpm (line 16): must be >= 0, got -1"
    semantic = "cache: {semantic: {verify_threshold_close: 1.2, close_similarity: -0.1}}\n"
    assert sorted(p.split(" ")[0] for p in problems(VALID + semantic)) == [
        "cache.semantic.close_similarity",
        "cache.semantic.verify_threshold_close",
    ]


def test_problems_across_sections_and_rules_come_together() -> None:
    text = (
        VALID.replace("http://127.0.0.1:2", "ftp://x")  # a pattern, in a model (which is then left out)
        .replace("fallbacks: [l]", "fallbacks: [l, nope]")  # a reference: l is invalid, nope unknown
        .replace("tier: small", "tier: small\n    speculative: {k_min: 5, k_initial: 2}")  # a cross-field rule
    ) + "circuit_breaker: {failure_rate: 0}\nretyr: {}\n"  # an optional section; an unknown one
    found = problems(text)
    assert [p.split(" ")[0] for p in found] == [
        "models.l.base_url", "circuit_breaker.failure_rate", "retyr", "routes.fast.fallbacks[1]", "models.s.speculative",
    ], found  # fmt: skip
    assert "http:// or https://" in found[0] and "'ftp://x'" in found[0]


def test_an_invalid_required_section_leaves_the_rules_of_the_others_running() -> None:
    """t134: an invalid `auth` (or any required section) hid every cross-reference problem, so
    check listed them one run at a time; the rules that need only valid sections run, and none is
    said of a section that is invalid (no "unknown model" when `models` itself is not a mapping)."""

    def fields(text: str) -> list[str]:
        return [p.split(" ")[0].rstrip(":") for p in problems(text)]

    smol = VALID.replace("fallbacks: [l]", "fallbacks: [smol]")
    assert fields(smol.replace("mode: none", "mode: key")) == ["auth.mode", "routes.fast.fallbacks[0]"]
    assert fields(smol.replace("auth: {mode: none}\n", "")) == ["auth", "routes.fast.fallbacks[0]"]
    assert fields(smol.replace("{small: s, large: l}", "[s, l]")) == ["pair", "routes.fast.fallbacks[0]"]
    smol = VALID.replace("large: l}", "large: smol}")
    assert fields(smol.replace("models:\n", "models: []\nx:\n")) == ["models", "x"]  # nothing said of a model
    assert fields(smol.replace("fast: {model: s, fallbacks: [l]}", "- fast")) == ["routes", "pair.large"]


def test_a_reference_in_flow_style_is_told_how_to_write_it() -> None:
    """t134: YAML ends a bare value at the `{` of `${` inside `{...}` or `[...]`, and quoted it is
    text: each message led to the other. Both now say what to write: quotes for text, block style
    (where an unquoted reference reads as its value) for a number or true/false."""
    flow = VALID.replace("tier: large", "tier: large\n    timeouts: {connect: ${CONNECT_S:-3}}")
    assert problems(flow) == [
        "line 12: not valid YAML: inside `{...}` or `[...]` a bare value ends at the `{` of `${`: quote the "
        "reference where the value is text, else write that mapping or list in block style, one `key: ${VAR}` or "
        "`- ${VAR}` a line"
    ]
    assert problems(flow.replace("${CONNECT_S:-3}", '"${CONNECT_S:-3}"')) == [
        "models.l.timeouts.connect (line 12): expected a number, got the string '3'; the quotes around it make it "
        "text, and inside `{...}` or `[...]` a `${...}` needs them: write that mapping or list in block style, one "
        "`key: ${VAR}` or `- ${VAR}` a line, without the quotes"
    ]
    text = flow.replace("[l]", '["${FB:-l}"]').replace("${CONNECT_S:-3}", "3")  # text: quoted, as it says
    assert load_policy_text(text, environ={}).policy.routes["fast"].fallbacks == ["l"]
    block = VALID.replace("tier: large", "tier: large\n    timeouts:\n      connect: ${CONNECT_S:-3}")
    assert load_policy_text(block, environ={}).policy.models["l"].timeouts.connect == 3
    [message] = problems(block.replace("${CONNECT_S:-3}", '"${CONNECT_S:-3}"'))
    assert message.endswith("the quotes around it make it text: write it without them")


def test_unknown_field_suggests_the_close_one() -> None:
    [message] = problems(VALID.replace("tier: large", "tier: large\n    context_windw: 9"))
    assert message == "models.l.context_windw (line 12): unknown field; did you mean `context_window`?"


def test_a_key_that_is_no_field_name_is_not_quoted() -> None:
    """A secret pasted as a key reached the policy_rejected log (found by an outside tester)."""
    [message] = problems(VALID.replace("tier: large", "tier: large\n    sk-PASTEDSECRET-4444: 9"))
    assert message.startswith("models.l.(a key that is no field name) (line 12): unknown field")
    assert "PASTED" not in message
    # at the top level too, and a lowercase hex token (t17 found both shown)
    found = problems(VALID + "sk-TOPLEVELSECRET-1: 1\n" + "d41d8cd98f00b204e9800998ecf8427e: 1\n")
    assert len(found) == 2 and not any("TOPLEVEL" in p or "d41d8cd9" in p for p in found), found
    assert all("(a key that is no field name)" in p and "(line " in p for p in found)


def test_merge_keys_and_unknown_tags_are_problems_not_crashes() -> None:
    assert problems(VALID + "cache: {<<: {enabled: true}}\n") == [
        "cache (line 15): YAML merge keys (<<) are not supported"
    ]
    [message] = problems(VALID.replace("tier: large", "tier: !big large"))
    assert message.startswith("models.l.tier (line 11): not valid YAML") and "!big" in message
    for key in ("{a: 1}", "[1, 2]"):  # a mapping or a list as a key once crashed the loader (unhashable)
        assert problems(VALID + f"tenants: {{{key}: {{}}}}\n") == [
            "tenants (line 15): a key must be a plain name, not a mapping or a list"
        ]


def _with_key_file(tmp_path: Path, policy: str, keys: str) -> Path:
    (tmp_path / "keys.yaml").write_text(keys)
    path = tmp_path / "policies.yaml"
    path.write_text(policy)
    return path


def _alias_bomb(levels: int) -> str:
    """Under 1 KB of YAML that expands to 10 ** (levels + 1) values."""
    return "x-a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"x-{i}: &l{i} [{', '.join([f'*{prev}'] * 10)}]\n"
        for i, prev in enumerate(["a", *(f"l{j}" for j in range(1, levels))], 1)
    )


def test_an_alias_bomb_in_the_key_file_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    """f170: the key file's bound was 5,000,000 values, each read and its path kept before the bound
    refused it: 700 bytes of aliases cost each worker half a minute and 3 GB on a reload. The
    values are counted on the composed tree (each node once) before anything is built."""
    hashed = "sha256:" + "a" * 64
    path = _with_key_file(tmp_path, KEYED, f"keys: [{{id: a, hash: '{hashed}'}}]\n" + _alias_bomb(7))
    with pytest.raises(ConfigError) as caught:
        load_policy(path, environ={})
    key_file = tmp_path / "keys.yaml"
    assert caught.value.problems == [f"{key_file}: more than 2,000,000 values (YAML aliases included): not a key file"]
    kept = load_policy_text(KEYED, environ={}, key_file_text=f"keys: [{{id: a, hash: '{hashed}'}}]\n")
    assert without_unlisted_keys(kept, tmp_path, environ={}) is None  # says nothing of its keys: none dropped


def test_a_key_file_of_100000_keys_with_every_field_is_within_the_bound(tmp_path: Path) -> None:
    """f170: the bound leaves room for a large key file, its entries written in full (three models
    each: 15 values a key); 2,000 of them are read here, as loading 100,000 takes half a minute."""
    import yaml

    from gateway.config import loader

    limits = "&l {rpm: 60, tpm: 100000, usd_per_day: 5, usd_per_month: 100, max_concurrent: 4}"
    entry = "  - {{id: k{n}, tenant: t, hash: 'sha256:{n:064x}', models: {models}, limits: {limits}, admin: false}}\n"
    text = "keys:\n" + entry.format(n=0, models="&m [fast, s, l]", limits=limits)
    text += "".join(entry.format(n=n, models="*m", limits="*l") for n in range(1, 2_000))
    loaded = load_policy(_with_key_file(tmp_path, KEYED, text), environ={})
    assert len(loaded.policy.auth.keys) == 2_000 and loaded.policy.auth.keys[-1].limits.max_concurrent == 4
    root = yaml.compose(text, Loader=loader._Loader)
    assert root is not None
    per_key = (loader._values_in(root, 10**9) - 2) / 2_000
    assert per_key == 15 and 2 + 100_000 * per_key <= loader._MAX_KEY_FILE_VALUES * 0.8


def test_key_file_problems_name_that_file_and_its_line(tmp_path: Path) -> None:
    hashed = "sha256:" + "a" * 64
    policy = VALID.replace(
        "auth: {mode: none}", f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys: [{{id: a, hash: '{hashed}'}}]"
    )
    path = _with_key_file(
        tmp_path,
        policy,
        f"keys:\n  - {{id: b, hash: '{hashed}'}}\n  - {{id: a, hash: '{hashed}'}}\n  - {{id: c, hash: md5}}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_policy(path, environ={})
    key_file = tmp_path / "keys.yaml"
    assert caught.value.problems == [
        f"{key_file}: keys[2].hash (line 4): must be `sha256:` followed by 64 lowercase hex digits, got 'md5'",
        f"{key_file}: keys[0].hash (line 2): key 'b' has the same secret as key 'a'",
        f"{key_file}: keys[1].id (line 3): duplicate key id 'a'",
        f"{key_file}: keys[1].hash (line 3): key 'a' has the same secret as key 'a'",
    ]  # t200: the keys beside a bad one are judged in the same check, not the next one
    other, third = "sha256:" + "b" * 64, "sha256:" + "c" * 64
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - {{id: b, hash: '{other}'}}\n  - {{id: a, hash: '{third}'}}\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path, environ={})
    assert caught.value.problems == [f"{key_file}: keys[1].id (line 3): duplicate key id 'a'"]


def test_the_rules_judge_the_rest_of_an_entry_with_a_bad_value_and_say_nothing_of_its_stand_in() -> None:
    """t200: the rules run on a stand-in of a refused model, route or section, so that they judge
    its other values in the same run; what a rule would say only of the stand-in's defaults (a
    tier or strategy misspelt, a key list with a bad key) is not said."""
    hashed = "sha256:" + "a" * 64
    text = (
        VALID.replace("tier: small\n", "tier: smal\n    encoding: cl200k\n")
        .replace("tier: large\n", "tier: large\n    speculative: {k_min: 10, k_initial: 20, k_max: 100}\n")
        .replace(
            "fast: {model: s, fallbacks: [l]}",
            "fast: {model: s, fallbacks: [l, 7, nope], strategy: clasifier, target_large_share: 0.3}",
        )
        .replace(
            "auth: {mode: none}",
            f"auth: {{mode: keys, keys: [{{id: a, hash: '{hashed}'}}, {{id: a, hash: md5}}, {{id: a, hash: '{hashed}'}}]}}",
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, environ={})
    assert caught.value.problems == [
        "models.s.tier (line 6): must be one of `small`, `large`, got 'smal'",
        "models.l.speculative.k_max (line 13): must be >= 1 and <= 64, got 100",
        "routes.fast.fallbacks[1] (line 15): expected text, got 7; write it in quotes to have it read as text",
        "routes.fast.strategy (line 15): must be one of `fixed`, `classifier`, got 'clasifier'",
        "auth.keys[1].hash (line 16): must be `sha256:` followed by 64 lowercase hex digits, got 'md5'",
        "routes.fast.fallbacks[2] (line 15): unknown model 'nope'; models are: l, s",
        "models.s.encoding (line 7): unknown encoding 'cl200k'; encodings are: "
        "cl100k_base, gpt2, o200k_base, o200k_harmony, p50k_base, p50k_edit, r50k_base",
        "auth.keys[1].id (line 16): duplicate key id 'a'",
        "auth.keys[2].id (line 16): duplicate key id 'a'",
        "auth.keys[2].hash (line 16): key 'a' has the same secret as key 'a'",
    ]


def test_a_key_whose_id_is_refused_is_named_by_its_place_and_load_keys_says_all_that_check_says(
    tmp_path: Path,
) -> None:
    """t201: a key whose id was refused was called ``key ''`` (its placeholder's) by the rules, and
    load_keys (``keys list``, ``new``, ``revoke``) said only the refused id, not the rules' problems."""
    a, b, c = ("sha256:" + digit * 64 for digit in "abc")
    policy = VALID.replace(
        "auth: {mode: none}",
        "auth:\n  mode: keys\n  key_file: keys.yaml\n  keys:\n"
        f"    - {{id: ok, hash: '{a}'}}\n"
        f"    - {{id: 'bad id!', hash: '{b}', engine_fields: [priority, nope]}}\n"
        f"    - {{id: other, hash: '{c}', engine_fields: [zzz]}}\n",
    )
    path = _with_key_file(tmp_path, policy, f"keys:\n  - {{id: 'x y', hash: '{a}'}}\n")
    key_file = tmp_path / "keys.yaml"
    no_engine_field = f"which is no engine field; `engine_fields` takes {ENGINE_FIELDS_TAKEN}"
    id_refused = "must be 1-128 characters, no spaces or control characters, got"
    with pytest.raises(ConfigError) as checked:
        load_policy(path, environ={})
    assert checked.value.problems == [
        f"auth.keys[1].id (line 19): {id_refused} 'bad id!'",
        f"{key_file}: keys[0].id (line 2): {id_refused} 'x y'",
        f"auth.keys[1].engine_fields[1] (line 19): the key at auth.keys[1] names 'nope', {no_engine_field}",
        f"auth.keys[2].engine_fields[0] (line 20): key 'other' names 'zzz', {no_engine_field}",
        f"{key_file}: keys[0].hash (line 2): the key at keys[0] has the same secret as key 'ok'",
    ]
    with pytest.raises(ConfigError) as read:
        load_keys(path, environ={})
    assert read.value.problems == checked.value.problems


def test_a_value_yaml_cannot_build_is_one_problem_and_the_rest_is_judged(tmp_path: Path) -> None:
    """t201: `mode: !!int sk-...` said "(ValueError)", then "must be one of `none`, `keys`, got None"
    of the None in its place; the keys beside it, and those beside a key file's such value, were judged too."""
    a = "sha256:" + "a" * 64
    policy = VALID.replace(
        "auth: {mode: none}",
        f"auth:\n  mode: !!int sk-secret-1\n  key_file: keys.yaml\n  keys: [{{id: ok, hash: '{a}', engine_fields: [zzz]}}]\n",
    )
    path = _with_key_file(tmp_path, policy, "keys:\n  - {id: k, hash: !!int sk-secret-2}\n  - {id: ok, hash: md5}\n")
    key_file = tmp_path / "keys.yaml"
    unbuilt = "not a value YAML can build as `!!int` (the value is not shown here): remove the tag or fix the value"
    with pytest.raises(ConfigError) as checked:
        load_policy(path, environ={})
    assert checked.value.problems == [
        f"auth.mode (line 15): {unbuilt}",
        f"{key_file}: keys[0].hash (line 2): {unbuilt}",
        f"{key_file}: keys[1].hash (line 3): must be `sha256:` followed by 64 lowercase hex digits, got 'md5'",
        "auth.keys[0].engine_fields[0] (line 17): key 'ok' names 'zzz', which is no engine field; `engine_fields` "
        f"takes {ENGINE_FIELDS_TAKEN}",
        f"{key_file}: keys[1].id (line 3): duplicate key id 'ok'",
    ]
    with pytest.raises(ConfigError) as read:
        load_keys(path, environ={})
    assert read.value.problems == checked.value.problems


def test_two_keys_with_one_secret_are_refused(tmp_path: Path) -> None:
    # Else the secret would act as whichever key was read last: another tenant's cache, limits and usage.
    hashed = "sha256:" + "a" * 64
    policy = VALID.replace(
        "auth: {mode: none}", f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys: [{{id: a, hash: '{hashed}'}}]"
    )
    path = _with_key_file(tmp_path, policy, f"keys:\n  - {{id: z, tenant: other, hash: '{hashed}'}}\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path, environ={})
    assert caught.value.problems == [
        f"{tmp_path / 'keys.yaml'}: keys[0].hash (line 2): key 'z' has the same secret as key 'a'"
    ]


@pytest.mark.parametrize(
    ("entry", "field"),
    [("{id: '', hash: H}", "id"), ('{id: "a\\tb", hash: H}', "id"), ("{id: a, tenant: ' A ', hash: H}", "tenant"),
     ('{id: a, tenant: "x\\x7fy", hash: H}', "tenant"), ("{id: a, tenant: '', hash: H}", "tenant")],
)  # fmt: skip
def test_key_ids_and_tenants_are_printable_and_unpadded(entry: str, field: str) -> None:
    auth = "auth:\n  mode: keys\n  keys: [" + entry.replace("H", "'sha256:" + "a" * 64 + "'") + "]"
    [message] = problems(VALID.replace("auth: {mode: none}", auth))
    assert message.startswith(f"auth.keys[0].{field} (line "), message


def test_numbers_that_would_disable_a_safeguard_are_refused() -> None:
    found = problems(
        VALID
        + "limits: {default_completion_tokens: -100000, body_read_timeout_s: -1}\n"
        + "cache: {exact: {ttl_s: -5}, semantic: {ttl_s: 0, max_entries: -1}, coalesce: {wait_s: -30}}\n"
        + "retry: {backoff_initial_ms: -100}\n"
        + "version: 7\n"
    )
    assert sorted(p.split(" ")[0] for p in found) == [
        "cache.coalesce.wait_s",
        "cache.exact.ttl_s",
        "cache.semantic.max_entries",
        "cache.semantic.ttl_s",
        "limits.body_read_timeout_s",
        "limits.default_completion_tokens",
        "retry.backoff_initial_ms",
        "version",
    ]


def test_numbers_are_finite_and_may_be_written_with_an_exponent() -> None:
    """t41: ``.inf`` passed as a budget (and ``keys new`` wrote a key file no gateway could load);
    ``2e-6``, which YAML 1.1 reads as a string, was "got str"."""
    found = problems(VALID + "limits: {body_read_timeout_s: .inf}\nretry: {backoff_max_ms: .nan}\n")
    assert sorted(found) == [
        "limits.body_read_timeout_s (line 15): must be a finite number, got inf",
        "retry.backoff_max_ms (line 16): must be a finite number >= 0 and <= 60000, got nan",  # t69
    ]
    loaded = load_policy_text(VALID.replace("input: 0.1", "input: 2e-1"), environ={})
    assert loaded.policy.models["s"].price.input_per_mtok == 0.2


def test_a_quoted_number_is_text_whatever_its_spelling() -> None:
    """t164: ``" 1e3 "`` (and ``"1e3"``) was read as 1000.0 where ``" 2 "`` is refused; a variable's
    ``' 1e3 '`` too, and its ``' 2 '`` was told to drop quotes it did not have. A number with an
    exponent and no dot is read as a number only where written plain, as YAML 1.2 reads it."""
    for written in ('" 1e3 "', '"1e3"', '" 2 "', '"2"'):
        assert problems(VALID.replace("input: 0.1", f"input: {written}")) == [
            f"models.s.price.input (line 5): expected a number, got the string {written[1:-1]!r}; "
            "the quotes around it make it text: write it without them"
        ]
    block = VALID.replace("price: {input: 0.1, output: 0.2}", "price:\n      input: ${PRICE}\n      output: 0.2")
    for value in (" 1e3 ", " 2 "):
        assert problems(block, {"PRICE": value}) == [
            "models.s.price.input (line 6, from $PRICE): expected a number, got text (not shown here); "
            "the variable's value has spaces around it, which make it text: set it without them"
        ]
    for value, price in (("1e3", 1000.0), ("2", 2), ("2.5E-1", 0.25)):
        assert load_policy_text(block, environ={"PRICE": value}).policy.models["s"].price.input_per_mtok == price
    for value in ("1e3", "2"):
        assert problems(block.replace("${PRICE}", '"${PRICE}"'), {"PRICE": value}) == [
            "models.s.price.input (line 6, from $PRICE): expected a number, got text (not shown here); "
            "the quotes around it make it text: write it without them"
        ]


def test_load_keys_reads_only_auth_and_the_key_file(tmp_path: Path) -> None:
    hashed = "sha256:" + "b" * 64
    policy = VALID.replace("http://127.0.0.1:2", "${UNSET_URL}").replace(
        "auth: {mode: none}",
        f"auth:\n  mode: keys\n  key_file: ${{KEY_FILE:-keys.yaml}}\n  keys: [{{id: a, hash: '{hashed}'}}]",
    )
    other = "sha256:" + "c" * 64
    path = _with_key_file(tmp_path, policy, f"# made by hand\nkeys:\n  - {{id: b, hash: '{other}'}}\n")
    ring = load_keys(path, environ={})
    assert ring.key_file == tmp_path / "keys.yaml"
    assert [key.id for key in ring.keys] == ["a", "b"]
    path.write_text(policy.replace("mode: keys", "mode: some"))
    with pytest.raises(ConfigError) as caught:
        load_keys(path, environ={})
    assert caught.value.problems == ["auth.mode (line 15): must be one of `none`, `keys`, got 'some'"]


def test_libyaml_and_pure_python_composers_agree_on_lines() -> None:
    import yaml

    from gateway.config import loader

    if loader._Loader is yaml.SafeLoader:
        pytest.skip("PyYAML without libyaml")
    text = (Path(__file__).parents[2] / "policies.yaml").read_text()
    results = []
    for composer in (yaml.SafeLoader, yaml.CSafeLoader):
        problems = loader.Problems()  # type: ignore[attr-defined]  # a private piece, compared on purpose
        root = yaml.compose(text, Loader=composer)
        assert root is not None
        data = loader._NodeReader("<policy>", {}, problems, notes=[]).read(root, ())
        results.append((data, [(path, problems.line_of(path)) for path in _paths(data)]))
    assert results[0] == results[1]


def _paths(value: object, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in items:
        yield from _paths(item, (*path, key))


def test_a_target_large_share_needs_a_classifier_route(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        CLASSIFIER.replace("  fast:\n    model: small\n", "  fast:\n    model: small\n    target_large_share: 0.3\n", 1)
    )
    with pytest.raises(ConfigError, match="target_large_share"):
        load_policy(path)


@pytest.mark.parametrize(
    ("route", "learning", "problem"),
    [
        ("fast", "{shadow_share: 0.1}", "only a classifier route has a router to teach"),
        ("auto", "{judge: nowhere}", "nowhere"),
        ("auto", "{judge: embed}", "not a chat model"),
        ("auto", "{shadow_share: 1.5}", "shadow_share"),
        ("auto", "{scope: everyone}", "scope"),
    ],
)
def test_a_learning_block_is_checked(tmp_path: Path, route: str, learning: str, problem: str) -> None:
    anchor = f"  {route}:\n"
    assert anchor in CLASSIFIER
    path = tmp_path / "p.yaml"
    path.write_text(CLASSIFIER.replace(anchor, f"{anchor}    learning: {learning}\n", 1))
    with pytest.raises(ConfigError, match=problem):
        load_policy(path)


def test_a_learning_block_on_the_classifier_route_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        CLASSIFIER.replace(
            "  auto:\n", "  auto:\n    learning: {shadow_share: 0.02, judge: large, usd_per_day: 5}\n", 1
        )
    )
    route = load_policy(path).policy.routes["auto"]
    assert route.learning is not None and route.learning.shadow_share == 0.02 and route.learning.scope == "tenant"


def test_a_speculative_tokenizer_is_read_from_the_policy_files_folder(tmp_path: Path) -> None:
    spec = "    tier: large\n    speculative: {mode: gateway, draft: s, tokenizer: tok/tokenizer.json}\n"
    path = tmp_path / "p.yaml"
    path.write_text(VALID.replace("    tier: large\n", spec))
    with pytest.raises(ConfigError, match=r"models\.l\.speculative\.tokenizer.*no such file"):
        load_policy(path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    loaded = load_policy(path)
    assert loaded.policy.models["l"].speculative.tokenizer == str(tmp_path / "tok" / "tokenizer.json")


def test_only_openai_chat_models_can_serve_the_responses_api() -> None:
    anthropic = VALID.replace(
        "    tier: large\n", "    tier: large\n    provider: anthropic\n    responses_api: true\n"
    )
    [message] = problems(anthropic)
    assert message.startswith("models.l.responses_api") and "openai chat model" in message
    assert load_policy_text(
        VALID.replace("    tier: small\n", "    tier: small\n    responses_api: true\n"), environ={}
    )


def test_a_broken_file_falls_back_to_the_policy_last_accepted_with_its_problems(tmp_path: Path) -> None:
    path, last_good = tmp_path / "policies.yaml", tmp_path / "last.yaml"
    path.write_text(VALID)
    accepted, rejected, _, _ = load_at_start(path, last_good)
    assert rejected == []
    keep_last_good(accepted, last_good)
    path.write_text("pair: [")
    loaded, rejected, _, _ = load_at_start(path, last_good)
    assert loaded.version == accepted.version and "(last accepted)" in loaded.source
    assert rejected and "not valid YAML" in rejected[0]


async def test_a_worker_started_on_the_policy_last_accepted_names_the_file_once_the_edit_is_reverted(
    tmp_path: Path,
) -> None:
    """t149: once the file in place was read again (the rejected edit put back: ``by: reverted``),
    /readyz still said the policy came from ``(last accepted)`` until the next new version."""
    path, last_good = tmp_path / "policies.yaml", tmp_path / "last.yaml"
    path.write_text(VALID)
    keep_last_good(load_at_start(path, last_good).loaded, last_good)
    path.write_text("pair: [")
    holder = RuntimeHolder(path, Metrics(), last_good=last_good)
    try:
        started = holder.start(load_at_start(path, last_good))
        assert "(last accepted)" in started.loaded.source
        path.write_text(VALID)
        with capture_logs() as logged:
            assert await holder.reload("test", settle=False)
        assert [(line["event"], line.get("by")) for line in logged] == [("policy_rejection_cleared", "reverted")]
        assert holder.current.loaded.source == str(path) and holder.current.version == started.version
    finally:
        await holder.aclose()


async def test_a_request_log_edit_needs_a_restart_until_it_is_put_back_to_the_one_in_force(tmp_path: Path) -> None:
    """t149: the request log is the one ``serve`` started with, in every worker; a worker started
    after an edit of it (a dead one's replacement) says so at its start, and an edit back to the
    one in force needs no restart."""
    path = tmp_path / "policies.yaml"
    in_force = RequestLogPolicy(path="requests.jsonl")
    path.write_text(VALID + "request_log: {path: moved.jsonl}\n")
    holder = RuntimeHolder(path, Metrics(), request_log=in_force)
    try:
        with capture_logs() as logged:
            holder.start()
            path.write_text(VALID + "request_log: {path: requests.jsonl}\n")
            assert await holder.reload("test", settle=False)
            path.write_text(VALID + "request_log: {path: requests.jsonl, stdout: false}\n")
            assert await holder.reload("test", settle=False)
        said = [line["event"] for line in logged if line["event"] in ("policy_reloaded", "policy_needs_restart")]
        assert said == ["policy_needs_restart", "policy_reloaded", "policy_reloaded", "policy_needs_restart"]
    finally:
        await holder.aclose()


KEYED = VALID.replace("auth: {mode: none}", "auth: {mode: keys, key_file: keys.yaml}")


def _key(key_id: str, digest: str | None = None) -> str:
    return f'  - {{id: {key_id}, tenant: t, hash: "{digest or hash_key(f"sk-{key_id}")}"}}\n'


async def test_a_worker_started_while_the_key_file_holds_a_bad_line_serves_the_keys_its_siblings_do(
    tmp_path: Path,
) -> None:
    """f87: the fallback read the key file as it is now, so while it held a bad line a worker's
    replacement could not start (the server then stopped the whole gateway). It starts on the
    keys last accepted, kept beside the policy, less those the file no longer lists, as a
    running worker narrows them (t98), and says and logs what that worker says."""
    path, last_good, keys = tmp_path / "policies.yaml", tmp_path / "last.yaml", tmp_path / "keys.yaml"
    path.write_text(KEYED)
    keys.write_text("keys:\n" + _key("leaked") + _key("staying"))
    running = RuntimeHolder(path, Metrics(), last_good=last_good)
    accepted = running.start()
    kept = kept_key_file(last_good)
    assert kept.read_text() == keys.read_text() and kept.stat().st_mode & 0o777 == 0o600
    try:
        keys.write_text("keys:\n" + _key("staying") + _key("added") + _key("oops", "sha256:NOTHEX"))
        assert not await running.reload("test", settle=False)
        with capture_logs() as logged:
            replacement = RuntimeHolder(path, Metrics(), last_good=last_good)
            started = replacement.start()
        await replacement.aclose()
    finally:
        await running.aclose()
    assert [key.id for key in running.current.policy.auth.keys] == ["staying"]  # the sibling's, as t98 has it
    assert [key.id for key in started.policy.auth.keys] == ["staying"]  # "added" waits for a valid file
    assert started.version == running.current.version != accepted.version
    assert "(last accepted)" in started.loaded.source
    said = running.last_reload_error
    assert (
        said
        and "keys.yaml: a key taken out of it is refused and models, admin or engine_fields taken back from a key apply; its other changes wait"
        in said
    )
    assert replacement.last_reload_error == said
    [rejected] = [line for line in logged if line["event"] == "policy_rejected"]
    assert rejected["reason"] == "start-up" and rejected["key_file"] == "removals only"
    assert "keys[2].hash" in rejected["key_file_problems"][0] and "NOTHEX" not in str(rejected)
    assert kept.read_text() == "keys:\n" + _key("leaked") + _key("staying")  # not replaced by a rejected file


def test_an_invalid_key_file_takes_back_engine_fields_never_grants_them(tmp_path: Path) -> None:
    """f229: a grant taken back is a removal, applied while the file is invalid as a key taken out
    is; a grant widened waits, as does one whose ``engine_fields`` no longer reads as a list."""

    def entry(key_id: str, granted: str) -> str:
        return _key(key_id).replace("}\n", f", engine_fields: {granted}}}\n")

    written = ("k", "[priority, vllm_xargs]"), ("w", "[priority]"), ("s", "[priority, rid]"), ("d", "[priority]")
    kept = load_policy_text(
        KEYED, environ={}, base_dir=tmp_path, key_file_text="keys:\n" + "".join(entry(*e) for e in written)
    )
    bad = _key("oops", "sha256:NOTHEX")
    (tmp_path / "keys.yaml").write_text(
        "keys:\n" + entry("k", "[vllm_xargs]") + entry("w", "[priority, lora_path]") + entry("s", "priority")
        + entry("d", "[priority, rid]") + entry("d", "[]") + bad
    )  # fmt: skip
    removals = without_unlisted_keys(kept, tmp_path, environ={})
    assert removals is not None and (removals.dropped, removals.taken_back) == ([], {"engine_fields": ["k"]})
    granted = {key.id: key.engine_fields for key in removals.loaded.policy.auth.keys}
    assert granted == {"k": ["vllm_xargs"], "w": ["priority"], "s": ["priority", "rid"], "d": ["priority"]}
    assert removals.loaded.version != kept.version
    (tmp_path / "keys.yaml").write_text("keys:\n" + entry("k", "[priority, vllm_xargs]") + _key("w") + bad)
    removals = without_unlisted_keys(kept, tmp_path, environ={})
    assert removals is not None and (removals.dropped, removals.taken_back) == (["s", "d"], {"engine_fields": ["w"]})
    assert {key.id: key.engine_fields for key in removals.loaded.policy.auth.keys} == {
        "k": ["priority", "vllm_xargs"],
        "w": [],
    }


def test_an_invalid_key_file_takes_back_models_and_admin_never_grants_them(tmp_path: Path) -> None:
    """f232: a key's ``models`` narrowed, or its ``admin`` taken away, in a key file another line
    made invalid waited with the rest of the edit, so the key kept what the operator took back.
    Taking back is a removal, applied as a key taken out is; a grant widened waits, as does one
    whose ``models`` no longer reads as a list or whose ``admin`` is no boolean."""

    def entry(key_id: str, more: str) -> str:
        return _key(key_id).replace("}\n", f", {more}}}\n")

    written = (
        ("all", "admin: true"),  # every model, and admin
        ("two", "models: [fast, s]"),
        ("one", "models: [s]"),
        ("odd", "models: [s, l], admin: true"),
    )
    kept = load_policy_text(
        KEYED, environ={}, base_dir=tmp_path, key_file_text="keys:\n" + "".join(entry(*e) for e in written)
    )
    bad = _key("oops", "sha256:NOTHEX")
    (tmp_path / "keys.yaml").write_text(
        "keys:\n" + entry("all", "models: [fast]") + entry("two", "models: [s, l]") + entry("one", "admin: true")
        + entry("odd", "models: s, admin: 'no'") + bad
    )  # fmt: skip
    removals = without_unlisted_keys(kept, tmp_path, environ={})
    assert removals is not None and removals.dropped == []
    assert removals.taken_back == {"models": ["all", "two"], "admin": ["all"]}
    keys = {key.id: (key.models, key.admin) for key in removals.loaded.policy.auth.keys}
    assert keys == {"all": (["fast"], False), "two": (["s"], False), "one": (["s"], False), "odd": (["s", "l"], True)}
    assert removals.loaded.version != kept.version
    (tmp_path / "keys.yaml").write_text(  # listed twice: what either grants is kept
        "keys:\n" + entry("all", "models: [s]") + entry("all", "models: ['*'], admin: true") + "".join(
            entry(*e) for e in written[1:]) + bad
    )  # fmt: skip
    removals = without_unlisted_keys(kept, tmp_path, environ={})
    assert removals is not None and removals.taken_back == {} and removals.loaded.version == kept.version


def test_an_invalid_key_file_lowers_limits_never_raises_them(tmp_path: Path) -> None:
    """A budget or rate cut for a key that overspends, in a key file another line made invalid,
    waited with the rest of the edit: the key went on spending. A cap lowered (or set where none
    was) is a removal, applied as a key taken out is; a cap raised or left out waits, as does one
    that is no number the schema takes, and a ``limits`` that is no mapping takes back nothing."""

    def entry(key_id: str, limits: str) -> str:
        return _key(key_id).replace("}\n", f", limits: {limits}}}\n")

    written = (
        ("spender", "{usd_per_day: 5, rpm: 100}"),
        ("free", "{}"),
        ("raised", "{usd_per_day: 1, tpm: 1000}"),
        ("odd", "{rpm: 10, max_concurrent: 4}"),
    )
    kept = load_policy_text(
        KEYED, environ={}, base_dir=tmp_path, key_file_text="keys:\n" + "".join(entry(*e) for e in written)
    )
    bad = _key("oops", "sha256:NOTHEX")
    (tmp_path / "keys.yaml").write_text(
        "keys:\n" + entry("spender", "{usd_per_day: 0, rpm: 100}") + entry("free", "{usd_per_month: 20, rpm: 5}")
        + entry("raised", "{usd_per_day: 2}") + entry("odd", "{rpm: '1', max_concurrent: 0.5, tpm: true}") + bad
    )  # fmt: skip
    removals = without_unlisted_keys(kept, tmp_path, environ={})
    assert removals is not None and removals.dropped == []
    assert removals.taken_back == {"limits": ["free", "spender"]}
    limits = {key.id: key.limits for key in removals.loaded.policy.auth.keys}
    assert limits["spender"] == Limits(usd_per_day=0, rpm=100)
    assert limits["free"] == Limits(usd_per_month=20, rpm=5)
    assert limits["raised"] == Limits(usd_per_day=1, tpm=1000) and limits["odd"] == Limits(rpm=10, max_concurrent=4)
    assert removals.loaded.version != kept.version
    (tmp_path / "keys.yaml").write_text(  # listed twice: the higher of each cap both set, none where either sets none
        "keys:\n" + entry("spender", "{usd_per_day: 1}") + entry("spender", "{usd_per_day: 2, rpm: 10}")
        + entry("free", "{rpm: 5}") + entry("free", "limits_are_not_a_mapping") + "".join(entry(*e) for e in written[2:]) + bad
    )  # fmt: skip
    removals = without_unlisted_keys(kept, tmp_path, environ={})
    assert removals is not None and removals.taken_back == {"limits": ["spender"]}
    assert {key.id: key.limits for key in removals.loaded.policy.auth.keys}["spender"] == Limits(usd_per_day=2, rpm=100)


async def test_a_worker_started_on_the_policy_last_accepted_logs_the_rejection_once(tmp_path: Path) -> None:
    """t121: its start-up check read the unchanged file again and logged ``policy_rejected`` a second
    time ("changed during start-up"), so an alert counting them counted every worker's start twice.
    A change during start-up is still read."""
    path, last_good, keys = tmp_path / "policies.yaml", tmp_path / "last.yaml", tmp_path / "keys.yaml"
    path.write_text(KEYED)
    keys.write_text("keys:\n" + _key("staying"))
    keep_last_good(load_at_start(path, last_good).loaded, last_good)
    path.write_text("pair: [")
    holder = RuntimeHolder(path, Metrics(), last_good=last_good)
    try:
        with capture_logs() as logged:
            holder.start(load_at_start(path, last_good))
            holder.reload_on_sighup()
            await asyncio.sleep(0)  # the start-up check takes the reload lock: the next reload runs after it
            assert not await holder.reload("file changed", settle=False)
        assert [line["reason"] for line in logged if line["event"] == "policy_rejected"] == ["start-up"]
        assert holder.last_reload_error and "not valid YAML" in holder.last_reload_error
        path.write_text("pair: {small: nope")  # another problem: said
        with capture_logs() as logged:
            assert not await holder.reload("file changed", settle=False)
        assert [line["event"] for line in logged] == ["policy_rejected"]
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await holder.aclose()


def test_a_worker_started_while_the_key_file_is_emptied_keeps_the_keys_last_accepted(tmp_path: Path) -> None:
    """As a running worker refuses an emptied key file (its changes wait), so does one started then."""
    path, last_good, keys = tmp_path / "policies.yaml", tmp_path / "last.yaml", tmp_path / "keys.yaml"
    path.write_text(KEYED)
    keys.write_text("keys:\n" + _key("staying"))
    accepted = load_at_start(path, last_good).loaded
    keep_last_good(accepted, last_good)
    keys.write_text("")
    path.write_text("pair: [")
    loaded, rejected, state, _ = load_at_start(path, last_good)
    assert [key.id for key in loaded.policy.auth.keys] == ["staying"] and state == "pending"
    assert loaded.version == accepted.version and "not valid YAML" in rejected[0]
    keys.write_text("keys:\n" + _key("staying") + _key("added"))  # valid: applied as it is now (t63)
    loaded, _, state, key_problems = load_at_start(path, last_good)
    assert [key.id for key in loaded.policy.auth.keys] == ["staying", "added"]
    assert (state, key_problems) == ("applied", [])


@pytest.mark.parametrize("edit", ["emptied", "deleted"])
async def test_a_worker_started_while_the_key_file_is_emptied_serves_its_siblings_keys(
    tmp_path: Path, edit: str
) -> None:
    """f90: the policy file loads cleanly then (a missing or empty key file is "no keys made
    yet"), so a worker started then served no keys while its siblings refused the emptying on
    reload, and kept the empty file in place of the kept keys: every later replacement started
    keyless too. It is held to the reload rules against the policy last accepted and falls back."""
    path, last_good, keys = tmp_path / "policies.yaml", tmp_path / "last.yaml", tmp_path / "keys.yaml"
    path.write_text(KEYED)
    keys.write_text("keys:\n" + _key("staying"))
    running = RuntimeHolder(path, Metrics(), last_good=last_good)
    accepted = running.start()
    kept = kept_key_file(last_good)
    kept_policy, kept_keys = last_good.read_bytes(), kept.read_bytes()
    try:
        if edit == "emptied":
            keys.write_text("")
        else:
            keys.unlink()
        assert not await running.reload("test", settle=False)
        with capture_logs() as logged:
            replacement = RuntimeHolder(path, Metrics(), last_good=last_good)
            started = replacement.start()
        await replacement.aclose()
    finally:
        await running.aclose()
    assert [key.id for key in running.current.policy.auth.keys] == ["staying"]  # the sibling refused it
    assert [key.id for key in started.policy.auth.keys] == ["staying"]
    assert started.version == running.current.version == accepted.version
    said = running.last_reload_error
    assert said and "keys.yaml: its changes wait too" in said and "is missing, empty" in said
    assert replacement.last_reload_error == said
    [rejected] = [line for line in logged if line["event"] == "policy_rejected"]
    assert rejected["reason"] == "start-up" and rejected["key_file"] == "pending"
    assert "is missing, empty" in rejected["problems"][0]
    assert (last_good.read_bytes(), kept.read_bytes()) == (kept_policy, kept_keys)  # not replaced by the empty file


def test_a_fresh_start_still_refuses_an_invalid_key_file(tmp_path: Path) -> None:
    """Only a worker started later falls back; with nothing kept, the key file is read as it is now."""
    path, last_good, keys = tmp_path / "policies.yaml", tmp_path / "last.yaml", tmp_path / "keys.yaml"
    path.write_text(KEYED)
    keys.write_text("keys:\n" + _key("oops", "sha256:NOTHEX"))
    with pytest.raises(ConfigError):
        load_at_start(path, None)
    with pytest.raises(ConfigError):
        load_at_start(path, last_good)  # nothing kept
    keys.write_text("keys:\n" + _key("staying"))
    keep_last_good(load_at_start(path, None).loaded, last_good)
    kept_key_file(last_good).unlink()  # kept by a gateway before f87: the key file as it is now, as then
    keys.write_text("keys:\n" + _key("oops", "sha256:NOTHEX"))
    with pytest.raises(ConfigError):
        load_at_start(path, last_good)


def test_what_cannot_work_is_refused_by_check() -> None:
    """t56: a space in a server's host passed and every request fell over to the other model; an
    embedding model passed as a route's baseline."""
    found = problems(VALID.replace("http://127.0.0.1:2", "http://127.0.0.1 :2"))
    assert [p.split(" ")[0] for p in found] == ["models.l.base_url"]
    [port] = problems(VALID.replace("http://127.0.0.1:2", "http://127.0.0.1:99999"))
    assert port.startswith("models.l.base_url") and "not a usable URL" in port  # t57
    embedding = "  e: {kind: embedding, base_url: 'http://e.test/v1', price: {input: 0.02, output: 0}}\n"
    with_embedding = VALID.replace("routes:\n", embedding + "routes:\n", 1)
    assert "routes:\n" in VALID and load_policy_text(with_embedding, environ={})
    [message] = problems(with_embedding.replace("fast: {model: s", "fast: {baseline: e, model: s", 1))
    assert message.startswith("routes.fast.baseline") and "embedding model" in message


def test_a_base_url_with_a_fragment_or_credentials_is_refused_and_one_with_a_query_is_taken() -> None:
    """t177: a fragment is never sent, and the gateway sends no user or password from a URL (and
    would log it); a query (Azure OpenAI's ``api-version``) goes on every call."""
    [fragment] = problems(VALID.replace("http://127.0.0.1:2", "http://127.0.0.1:2/v1#part"))
    assert fragment.startswith("models.l.base_url") and "fragment" in fragment
    [userinfo] = problems(VALID.replace("http://127.0.0.1:2", "http://user:secret@127.0.0.1:2/v1"))
    assert userinfo.startswith("models.l.base_url") and "user name or password" in userinfo
    assert "secret" not in userinfo
    azure = "http://127.0.0.1:2/openai/deployments/dep1?api-version=2024-10-21"
    assert load_policy_text(VALID.replace("http://127.0.0.1:2", azure), environ={}).policy.models["l"].base_url == azure


def test_retries_are_bounded() -> None:
    """t56: max_attempts 3000 made one request call a failing upstream 1,025 times, then a 500
    (2**attempt overflowed); a Retry-After of a day was waited for."""
    found = problems(VALID + "retry: {max_attempts: 3000, max_retry_after_s: 86400}\n")
    assert [p.split(" ")[0] for p in found] == ["retry.max_attempts", "retry.max_retry_after_s"]


def test_the_policy_last_accepted_is_the_owners_alone(tmp_path: Path) -> None:
    """A policy may hold secrets (an upstream's header): its copy was 0644 beside a 0600 file (t56).
    So may its key file (hashes, or a secret pasted for one), kept beside it (f87), as serve keeps both."""
    path, last_good, keys = tmp_path / "policies.yaml", tmp_path / "last.yaml", tmp_path / "keys.yaml"
    path.write_text(KEYED)
    keys.write_text("keys:\n" + _key("staying"))
    for old in (last_good, kept_key_file(last_good)):
        old.write_text("old")
        old.chmod(0o644)
    keep_last_good(load_at_start(path, None).loaded, last_good)
    assert last_good.stat().st_mode & 0o777 == kept_key_file(last_good).stat().st_mode & 0o777 == 0o600
    assert (last_good.read_text(), kept_key_file(last_good).read_text()) == (KEYED, keys.read_text())
    (tmp_path / "data").mkdir()
    kept = keep_policy(tmp_path / "data", KEYED, path, keys.read_text())
    assert kept.stat().st_mode & 0o777 == kept_key_file(kept).stat().st_mode & 0o777 == 0o600
    path.write_text(VALID)  # no key file named: none kept, none left from before
    keep_last_good(load_at_start(path, None).loaded, last_good)
    assert last_good.read_text() == VALID and not kept_key_file(last_good).exists()


def test_a_broken_file_with_nothing_to_fall_back_to_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("pair: [")
    with pytest.raises(ConfigError):
        load_at_start(path, None)
    with pytest.raises(ConfigError):
        load_at_start(path, tmp_path / "never-written.yaml")


def test_a_file_that_is_not_a_policy_is_refused_without_quoting_it(tmp_path: Path) -> None:
    """An outside tester's files: each froze reloads (or printed the file in a traceback), or took
    gigabytes; each is now a problem line, and none quotes the file, which may hold secrets."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(VALID.encode() + b"# caf\xe9 sk-secret\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(latin1)
    at = len(VALID.encode()) + len("# caf")
    assert caught.value.problems == [f"not UTF-8 text: byte {at} (0xe9) cannot be read"]
    assert problems(_alias_bomb(8)) == ["more than 200,000 values (YAML aliases included): not a policy"]
    assert problems(VALID + "x-loop: &loop [*loop]\n") == [
        "a YAML alias inside the value it names (it never ends): not a policy"
    ]
    assert "not valid YAML" in problems("a: " + "[" * 1000 + "]" * 1000)[0]
    # a value YAML cannot build is a problem line with its field and line, its text never shown
    built = problems(VALID + "version: !!timestamp 2026-02-30\n")
    assert any(p.startswith("version (line 15): not a value YAML can build") for p in built), built
    assert all("sk-secret" not in p for p in problems(VALID.replace("input: 0.1", "input: !!int sk-secret-1")))
    assert problems(VALID.replace("input: 0.1", "input: .inf")) == [
        "models.s.price.input (line 5): must be a price in USD per million tokens, from 0 to 1,000,000, got inf"
    ]


def test_check_notes_an_unset_variable_in_a_number_field_and_finds_nothing_wrong() -> None:
    """t22: `gateway check` failed on `${VAR}` in a number or true/false field: the placeholder
    that stands in for it is a URL, and that was judged instead of the file."""
    text = VALID.replace("${S_CTX:-4096}", "${MY_CONTEXT_WINDOW}")
    loaded = load_policy_text(text, environ={}, unset_ok=True)
    assert any("MY_CONTEXT_WINDOW is not set" in note for note in loaded.warnings)
    assert "MY_CONTEXT_WINDOW" in problems(text)[0]  # serving still needs it
    assert not any("unset-" in problem for problem in problems(text))  # the gateway's placeholder is not shown (t29)


def test_a_header_http_forbids_is_refused_and_a_keys_surrounding_whitespace_dropped() -> None:
    """t29: a Secret written with ``echo`` (a key ending in a newline), a CR/LF in a header value
    or a space in its name made every request fail before it left, and go to the fallback."""
    from gateway.upstreams.registry import api_key

    with_headers = VALID.replace("    tier: large\n", "    tier: large\n    headers: {HEADERS}\n")
    bad_value = with_headers.replace("{HEADERS}", '{x-api-version: "2026\\r\\nX-Evil: 1"}')
    assert problems(bad_value) == [
        "models.l.headers.x-api-version (line 12): holds a line break or NUL, which HTTP forbids in a header"
    ]
    bad_name = problems(with_headers.replace("{HEADERS}", '{"api version": "1"}'))
    assert len(bad_name) == 1 and bad_name[0].startswith("models.l.headers") and "HTTP token" in bad_name[0]
    assert "api version" not in bad_name[0]  # not quoted: a misplaced secret may be there
    fine = load_policy_text(with_headers.replace("{HEADERS}", "{anthropic-version: '2023-06-01'}"), environ={})
    model = fine.policy.models["l"]
    assert model.headers == {"anthropic-version": "2023-06-01"}
    keyed = load_policy_text(VALID.replace("    tier: large\n", "    tier: large\n    api_key_env: L_KEY\n"),
                             environ={}).policy.models["l"]  # fmt: skip
    assert api_key(keyed, {"L_KEY": "sk-live-123\n"}) == "sk-live-123"
    assert api_key(keyed, {"L_KEY": "  sk-live-123 \r\n"}) == "sk-live-123"
    assert api_key(keyed, {}) is None


def test_a_total_timeout_shorter_than_the_first_bytes_is_warned_of() -> None:
    loaded = load_policy_text(VALID.replace("    tier: large\n", "    tier: large\n    timeouts: {first_byte: 30, total: 10}\n"),
                              environ={})  # fmt: skip
    assert any(w.startswith("models.l.timeouts.total: 10 s is shorter than first_byte") for w in loaded.warnings)


def test_a_price_that_looks_per_token_is_warned_of() -> None:
    loaded = load_policy_text(VALID.replace("input: 0.1", "input: 0.0000001"), environ={})
    assert any(w.startswith("models.s.price.input: $1e-07 per million tokens") for w in loaded.warnings), (
        loaded.warnings
    )
    assert not any("per million" in w for w in load_policy_text(VALID, environ={}).warnings)


def test_a_price_past_the_bound_is_refused_with_its_field_line_and_bound() -> None:
    """t94: ``output: 1e308`` passed: each request's cost overflowed to inf, which Redis kept as
    the key's spend for the month. A price is at most $1,000,000 per million tokens (or per 1,000
    uses of a server tool), far above any model's."""
    huge = VALID.replace("price: {input: 1, output: 2}", "price: {input: 1, output: 1e308, cached_input: 2000000}")
    assert problems(huge) == [
        "models.l.price.output (line 10): must be a price in USD per million tokens, from 0 to 1,000,000, got 1e+308",
        "models.l.price.cached_input (line 10): must be a price in USD per million tokens, from 0 to 1,000,000, "
        "got 2000000",
    ]
    fee = VALID.replace("price: {input: 1, output: 2}", "price: {input: 1, output: 2, server_tools: {web_search: 1e7}}")
    assert problems(fee) == [
        "models.l.price.server_tools.web_search (line 10): must be a fee in USD per 1,000 uses, from 0 to 1,000,000, "
        "got 10000000.0"
    ]
    at_the_bound = VALID.replace("price: {input: 1, output: 2}", "price: {input: 1000000, output: 1000000}")
    assert load_policy_text(at_the_bound, environ={}).policy.models["l"].price.output_per_mtok == 1_000_000


def test_headers_the_gateway_writes_and_a_key_with_a_line_break_are_caught() -> None:
    """t31: a policy Host or Content-Length went out beside the gateway's own; a two-line Secret
    failed every request before it left, and check said nothing."""
    with_headers = VALID.replace(
        "    tier: large\n", "    tier: large\n    api_key_env: L_KEY\n    headers: {HEADERS}\n"
    )
    for header in ("Host", "content-length", "Transfer-Encoding", "Authorization"):
        found = problems(with_headers.replace("{HEADERS}", f"{{{header}: x}}"), environ={"L_KEY": "k"})
        assert len(found) == 1 and found[0].startswith(f"models.l.headers.{header} (line"), found
    split = load_policy_text(with_headers.replace("{HEADERS}", "{}"), environ={"L_KEY": "sk-a\nsk-b\n"})
    assert any("L_KEY holds a line break" in warning for warning in split.warnings), split.warnings


def test_a_request_log_in_a_folder_that_is_not_there_is_warned_of(tmp_path: Path) -> None:
    """t33: check said ok, serve said it was serving, then exited 3."""
    policy = tmp_path / "policies.yaml"
    policy.write_text(VALID + "request_log: {path: missing-folder/requests.jsonl}\n")
    assert any(w.startswith("request_log.path: its folder does not exist") for w in load_policy(policy).warnings)
    (tmp_path / "a-folder").mkdir()
    policy.write_text(VALID + "request_log: {path: a-folder}\n")  # t41: not warned of
    assert any(w.startswith("request_log.path: it is a folder") for w in load_policy(policy).warnings)
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone" / "requests.jsonl")
    policy.write_text(VALID + "request_log: {path: dangling.jsonl}\n")  # t44: a symlink into a missing folder
    assert any(w.startswith("request_log.path: its folder does not exist") for w in load_policy(policy).warnings)
    policy.write_text(VALID + "request_log: {path: requests.jsonl}\n")  # the policy's own folder
    assert not any(w.startswith("request_log.path") for w in load_policy(policy).warnings)


def test_the_gateways_own_names_in_problems_are_in_backticks() -> None:
    """The log hides quoted text (it may be a secret in the wrong place): a field the gateway
    names is in backticks, so the log keeps it (t36: `missing required field '…'`)."""
    found = problems(VALID.replace("    tier: large\n", ""))
    assert any("missing required field `tier`" in p for p in found), found


def test_option_prices_are_read_and_checked() -> None:
    """t59: fast mode, inference geos and server tools have prices of their own."""
    priced = VALID.replace(
        "price: {input: 1, output: 2}",
        "price: {input: 1, output: 2, speed: {fast: 6}, inference_geo: {us: 1.1}, server_tools: {web_search: 10}}",
    )
    price = load_policy_text(priced, environ={}).policy.models["l"].price
    assert price.speed_multipliers == {"fast": 6} and price.inference_geo_multipliers == {"us": 1.1}
    assert price.server_tools_per_1k == {"web_search": 10}
    assert problems(priced.replace("web_search: 10", "web_search: .inf")) == [
        "models.l.price.server_tools.web_search (line 10): must be a fee in USD per 1,000 uses, from 0 to 1,000,000, got inf"
    ]
    assert problems(priced.replace("fast: 6", "fast: 0"))[0].startswith("models.l.price.speed")


# ------------------------------------------------------------------ t63: YAML 1.2 scalars, ${...} notes, wording


def test_scalars_are_read_as_yaml_12_core_not_yaml_11() -> None:
    """t63: PyYAML's YAML 1.1 resolvers read ``rpm: 010`` as 8, ``rpm: 1:30`` as 90 and a
    tenant named ``no`` as ``False``; a date-like header value was a date, not text."""
    with_tenants = VALID + "tenants:\n  no: {limits: {rpm: 0o10}}\n  off: {limits: {rpm: 1_000, tpm: 0x10}}\n"
    loaded = load_policy_text(with_tenants.replace("fast: {", "on: {"), environ={})
    assert {name: t.limits.rpm for name, t in loaded.policy.tenants.items()} == {"no": 8, "off": 1000}
    assert loaded.policy.tenants["off"].limits.tpm == 16 and set(loaded.policy.routes) == {"on"}
    headers = load_policy_text(VALID.replace("tier: large", "tier: large\n    headers: {X-V: 2023-06-01}"), environ={})
    assert headers.policy.models["l"].headers == {"X-V": "2023-06-01"}
    octal, base60 = problems(VALID + "tenants:\n  a: {limits: {rpm: 010}}\n  b: {limits: {rpm: 1:30}}\n")
    assert octal.startswith("tenants.a.limits.rpm (line 16): expected a whole number, got the string '010'; a number")
    assert "without the leading 0" in octal
    assert base60 == "tenants.b.limits.rpm (line 17): expected a whole number, got the string '1:30'"
    [yes] = problems(VALID.replace("tier: small", "tier: small\n    simulated: yes"))
    assert yes.startswith("models.s.simulated (line 7): expected true or false, got the string 'yes'; YAML reads only")


def test_the_shipped_strings_that_look_like_yaml_11_booleans_stay_strings(tmp_path: Path) -> None:
    """``on_redis_error: open`` and the like were strings under YAML 1.1 too: nothing shipped reads differently."""
    loaded = load_policy_text(VALID + "limits: {on_redis_error: open}\n", environ={})
    assert loaded.policy.limits.on_redis_error == "open"
    key_file = tmp_path / "keys.yaml"
    key_file.write_text(f"keys:\n  - {{id: no, tenant: off, hash: 'sha256:{'a' * 64}'}}\n")
    policy = tmp_path / "policies.yaml"
    policy.write_text(VALID.replace("auth: {mode: none}", "auth: {mode: keys, key_file: keys.yaml}"))
    [key] = load_policy(policy, environ={}).policy.auth.keys
    assert (key.id, key.tenant) == ("no", "off")


def test_a_name_yaml_reads_as_a_number_or_boolean_says_to_quote_it() -> None:
    """t63: a tenant ``2024`` gave ``Expected str, got int`` and ``true`` gave ``tenants.True``."""
    assert problems(VALID + "tenants:\n  2024: {}\n  true: {}\n  ~: {}\n  '2025': {}\n") == [
        "tenants.2024 (line 16): 2024 is read as a number, not a name; write it in quotes ('2024') to use it as a name",
        "tenants.true (line 17): true is read as true or false, not a name; write it in quotes ('true') to use it as "
        "a name",
        "tenants.~ (line 18): ~ is read as null (no value), not a name; write it in quotes ('~') to use it as a name",
    ]


def test_text_that_is_not_a_complete_reference_is_noted_by_check_and_serve() -> None:
    """t63: ``${NAME:-small`` (no ``}``) and ``$NAME`` were used as written, with no word: the
    upstream was asked for a model named ``${SMALL_MODEL_NAME:-small``."""
    from gateway.config.envsubst import malformed

    assert malformed("${A}-${B:-${C}}-$5-$$") == []
    assert malformed("${A:-x") == ["`${A:-` has no closing `}`"]
    assert malformed("x-$A") == ["`$A` is not a reference (write `${A}`)"]
    assert malformed("${A:-$B}") == ["`$B` is not a reference (write `${B}`)"]  # inside a default too
    assert malformed("${A-x}") == ["`${A` is followed by '-': a reference is ${A} or ${A:-default}"]
    assert malformed("${ A }") == ["`${` is not followed by a variable name (letters, digits and _)"]
    text = VALID.replace("tier: small", "tier: small\n    upstream_model: ${M:-small\n    headers: {X-T: $TOKEN}")
    for unset_ok in (False, True):  # serve's warnings and check's notes
        loaded = load_policy_text(text, environ={}, unset_ok=unset_ok)
        assert loaded.policy.models["s"].upstream_model == "${M:-small"
        assert loaded.warnings == [
            "models.s.upstream_model (line 7): `${M:-` has no closing `}`; the value is used as written",
            "models.s.headers.X-T (line 8): `$TOKEN` is not a reference (write `${TOKEN}`); the value is used as written",
        ]


def test_references_nested_past_the_bound_are_refused() -> None:
    """t164: 500 levels of ``${A:-${A:-...}}`` raised a RecursionError (330 were read)."""

    def nested(levels: int) -> str:
        return VALID.replace("${S_URL:-http://127.0.0.1:1}", "${A:-" * levels + "http://127.0.0.1:1" + "}" * levels)

    assert load_policy_text(nested(16), environ={}).policy.models["s"].base_url == "http://127.0.0.1:1"
    for levels in (17, 500, 5_000):
        assert problems(nested(levels)) == ["models.s.base_url (line 4): `${...}` nested more than 16 deep in defaults"]


def test_a_reference_in_a_name_is_not_substituted_and_says_so() -> None:
    """t63: a tenant written ``${TEAM:-team-x}:`` was a tenant of that literal name, in silence."""
    loaded = load_policy_text(VALID + "tenants:\n  ${TEAM:-team-x}: {limits: {rpm: 5}}\n", environ={"TEAM": "a"})
    assert set(loaded.policy.tenants) == {"${TEAM:-team-x}"}
    assert loaded.warnings == [
        "tenants.${TEAM:-team-x} (line 16): ${...} is substituted in values, not in names; this name is used as written"
    ]


def test_problem_wording_t63() -> None:
    """t63's message nits: the tab, msgspec's ``int | null``, the quotes that make a number text, ``tier None``."""
    assert problems(VALID.replace("    tier: small", "\ttier: small")) == [
        "line 6: not valid YAML: a tab character; YAML indents with spaces only"
    ]
    assert problems(VALID + "tenants:\n  a: {limits: {rpm: 100O}}\n") == [
        "tenants.a.limits.rpm (line 16): expected a whole number, got the string '100O'"
    ]
    assert problems(VALID.replace("${S_CTX:-4096}", '"${S_CTX:-4096}"')) == [
        "models.s.context_window (line 7): expected a whole number, got the string '4096'; "
        "the quotes around it make it text: write it without them"
    ]
    assert problems(VALID.replace("tier: small", "tier: small\n    upstream_model: 7")) == [
        "models.s.upstream_model (line 7): expected text, got 7; write it in quotes to have it read as text"
    ]
    assert problems(VALID.replace("    tier: small\n", "")) == [
        "pair.small (line 1): model 's' has no tier; the pair's small model needs `tier: small`",
        "models.s (line 4): missing required field `tier` (`small` or `large`) for a chat model",
    ]


def test_a_model_standing_in_for_an_unset_variable_is_still_named_in_hints() -> None:
    """t63: with ``${VAR}`` unset where check runs, its model was left out of "models are: ..."."""
    text = VALID.replace("${S_CTX:-4096}", "${S_CTX}").replace("fast: {model: s,", "fast: {model: sx,")
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, environ={}, unset_ok=True)
    assert caught.value.problems == ["routes.fast.model (line 13): unknown model 'sx'; models are: l, s"]


def test_a_downgrade_without_any_budget_is_warned_of() -> None:
    """t63: ``downgrade_auto_at`` is a share of a USD budget, the tenant's or one of its keys'."""
    text = (
        VALID + "tenants:\n  a: {downgrade_auto_at: 0.8}\n  b: {downgrade_auto_at: 0.8, limits: {usd_per_month: 5}}\n"
    )
    assert load_policy_text(text, environ={}).warnings == [
        "tenants.a.downgrade_auto_at: neither the tenant nor any of its keys has usd_per_day or usd_per_month, "
        "so it never applies"
    ]
    key = f"{{id: k, tenant: a, hash: 'sha256:{'a' * 64}', limits: {{usd_per_day: 1}}}}"
    keyed = text.replace("auth: {mode: none}", f"auth: {{mode: keys, keys: [{key}]}}")
    assert load_policy_text(keyed, environ={}).warnings == []


def test_a_rate_of_zero_is_warned_of() -> None:
    """t146: `rpm: 0` or `tpm: 0` refuses every request (429 with a retry-after, which SDKs retry);
    valid, as a zero budget is, but likely not meant."""
    key = f"{{id: k, tenant: a, hash: 'sha256:{'a' * 64}', limits: {{tpm: 0, usd_per_day: 0}}}}"
    text = VALID.replace("auth: {mode: none}", f"auth: {{mode: keys, keys: [{key}]}}")
    text += "tenants:\n  a: {limits: {rpm: 0}}\n"
    assert load_policy_text(text, environ={}).warnings == [
        "key k: limits.tpm 0 refuses every request it makes (429, with a retry-after SDKs retry on); "
        "leave it out for no limit, or revoke the key",
        "tenants.a.limits.rpm: 0 refuses every request of the tenant's keys (429, with a retry-after SDKs "
        "retry on); leave it out for no limit",
    ]


def test_a_bad_value_from_a_variable_names_the_variable_and_hides_the_value() -> None:
    """t66: `SMALL_CONTEXT_WINDOW=08192` got "(line 19): ... write it without the leading 0" for a line
    that holds only `${...}`; the variable is named, and its value (perhaps a secret) is not shown."""
    text = VALID.replace("tier: large", "tier: large\n    continue_final_message: ${L_CONT:-false}")
    found = problems(text, {"S_CTX": "08192", "L_CONT": "yes"})
    assert found == [
        "models.s.context_window (line 7, from $S_CTX): expected a whole number, got text (not shown here); "
        "a number may not start with 0 (YAML 1.1 reads it as octal): set the variable without the leading 0",
        "models.l.continue_final_message (line 12, from $L_CONT): expected true or false, got text (not shown "
        "here); YAML reads only true and false as booleans (not yes, no, on, off)",
    ]
    [url] = problems(VALID, {"S_URL": "ftp://user:hunter2@host"})
    assert url.startswith("models.s.base_url (line 4, from $S_URL): must be a URL") and "hunter2" not in url
    # a default written in the file is the file's: its value is shown, no variable named
    [default] = problems(VALID.replace("${S_CTX:-4096}", "${S_CTX:-04096}"))
    assert default.startswith("models.s.context_window (line 7): expected a whole number, got the string '04096'")


def test_an_unclosed_reference_is_said_with_the_values_problem() -> None:
    """t66: `${SMALL_MODEL_URL` (no `}`) in base_url got only the URL error; the note on the missing
    `}` was a warning, which a refused file never shows."""
    [message] = problems(VALID.replace("${S_URL:-http://127.0.0.1:1}", "${S_URL"))
    assert message == (
        "models.s.base_url (line 4): must be a URL starting with http:// or https://, no spaces, "
        "got '${S_URL' (`${S_URL` has no closing `}`: used as written)"
    )


def test_a_simulated_model_is_not_said_to_lack_its_api_key() -> None:
    """t66: `make run` printed three "api_key_env ... is not set" warnings for the simulated
    upstreams, which need no key and about which a new user can do nothing."""
    named = VALID.replace("    tier: large", "    tier: large\n    api_key_env: L_KEY\n    simulated: ${L_SIM:-false}")
    assert not any("L_KEY" in note for note in load_policy_text(named, environ={"L_SIM": "true"}).warnings)
    assert "models.l.api_key_env: L_KEY is not set; requests to it carry no API key" in (
        load_policy_text(named, environ={}).warnings
    )
    broken = load_policy_text(named, environ={"L_SIM": "true", "L_KEY": "a\nb"}).warnings
    assert any(note.startswith("models.l.api_key_env: L_KEY holds a line break") for note in broken)


@pytest.mark.parametrize(
    ("kind", "good"),
    [
        (schema.TenantName, "acme"),
        (schema.KeyId, "app-1"),
        (schema.ModelName, "gpt-x"),
        (schema.EnvVarName, "OPENAI_API_KEY"),
        (schema.OptionValue, "fast"),
        (schema.HttpUrl, "http://127.0.0.1:2/v1"),
        (schema.KeyHash, "sha256:" + "0" * 64),
    ],
)
def test_a_name_with_a_trailing_newline_is_refused(kind: object, good: str) -> None:
    """``$`` matches before a final newline: ``"acme\\n"`` passed as a tenant name, and a
    tenant the CLI was told as ``--tenant "acme\\n"`` was another tenant (f150)."""
    assert msgspec.convert(good, kind) == good
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(good + "\n", kind)
