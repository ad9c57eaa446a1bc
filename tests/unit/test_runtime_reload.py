"""Reloads asked by signal: a burst reads the file once more, not once per signal."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from gateway.auth import hash_key
from gateway.config.loader import load_policy_text
from gateway.config.schema import LimitsPolicy
from gateway.errors import AuthenticationError, ConfigError
from tests.unit.conftest import POLICY, MakeHarness


async def test_a_burst_of_reload_requests_reads_the_file_once_more(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    holder = harness.holder
    assert [holder.request_reload("SIGHUP") for _ in range(50)].count(True) == 1  # the rest join it
    holder.path.write_text(POLICY.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}"))
    deadline = asyncio.get_running_loop().time() + 30  # the waiting reload settles (1 s) and reads the edit
    while holder.current.policy.routes["fast"].model != "large" and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert holder.current.policy.routes["fast"].model == "large"
    assert holder.request_reload("SIGHUP")  # nothing waits now: a new request reads the file again


def _slow_writer(path: Path, prefix: str, rest: str, pause_s: float, *, close_between: bool) -> threading.Thread:
    """A writer (a thread, as ``kubectl cp`` or scp over a slow link is a process) that writes
    ``prefix``, pauses, then ``rest``; returns once ``prefix`` is on disk, with the writer still
    running. ``close_between``: it closes the file during the pause rather than holding it open."""
    written = threading.Event()

    def write() -> None:
        with path.open("w") as handle:
            handle.write(prefix)
            handle.flush()
            if close_between:
                handle.close()
            written.set()
            time.sleep(pause_s)
            if close_between:
                with path.open("a") as again:
                    again.write(rest)
            else:
                handle.write(rest)

    thread = threading.Thread(target=write)
    thread.start()
    written.wait()
    return thread


_CUT_SHORT = POLICY.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}")
"""A valid policy that a writer still to write its last line leaves (f110)."""
_WHOLE = _CUT_SHORT + "# the writer's last line\n"


async def test_a_writer_that_pauses_mid_write_is_waited_for_where_no_one_can_tell_it_writes(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f110: a pause of over 0.25 s mid-write put the valid prefix in force, billed at its prices.
    Where the OS cannot say whether a writer holds the file (another OS, a file of another user),
    the settle (1 s) is long enough for such a pause (0.3 s here: a 0.5 s one was half the settle,
    which a writer thread woken late on a loaded machine could pass)."""
    from gateway import runtime

    monkeypatch.setattr(runtime, "_open_for_writing", lambda path: None)  # as on a system without leases
    harness = await make_harness()
    holder = harness.holder
    writer = _slow_writer(holder.path, _CUT_SHORT, _WHOLE[len(_CUT_SHORT) :], 0.3, close_between=True)
    try:
        assert await holder.reload("file changed")
    finally:
        writer.join()
    assert holder.current.version == load_policy_text(_WHOLE).version


async def test_a_file_held_open_for_writing_is_read_once_closed(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f110: however long the writer pauses, a file some process holds open for writing is not read."""
    from gateway import runtime

    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 0.05)  # only the writer's open file holds the reload back
    harness = await make_harness()
    holder = harness.holder
    writer = _slow_writer(holder.path, _CUT_SHORT, _WHOLE[len(_CUT_SHORT) :], 0.6, close_between=False)
    try:
        assert await holder.reload("file changed")
    finally:
        writer.join()
    assert holder.current.version == load_policy_text(_WHOLE).version


async def test_a_file_held_open_past_the_wait_is_refused_until_closed(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import runtime

    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 0.05)
    monkeypatch.setattr(runtime, "_STABLE_WAIT_MAX_S", 0.3)
    harness = await make_harness()
    holder = harness.holder
    in_force = holder.current.version
    # held 2 s, far past the 0.3 s wait: a look there made late by a loaded machine still finds it open
    writer = _slow_writer(holder.path, _CUT_SHORT, _WHOLE[len(_CUT_SHORT) :], 2.0, close_between=False)
    try:
        assert not await holder.reload("file changed")
        assert holder.current.version == in_force
        assert "still open for writing" in (holder.last_reload_error or "")
    finally:
        writer.join()
    assert await holder.reload("file changed")
    assert holder.current.version == load_policy_text(_WHOLE).version
    assert holder.last_reload_error is None


_WITH_KEY_FILE = POLICY.replace("auth:\n  mode: keys\n", "auth:\n  mode: keys\n  key_file: keys.yaml\n")


def _key_entry(key_id: str) -> str:
    return f'  - {{id: {key_id}, tenant: team-a, hash: "{hash_key("sk-" + key_id)}"}}\n'


def test_a_start_waits_for_no_file_that_is_merely_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """t122: every start (a worker replacing one that died included) waited a settle for each file,
    however long ago it was written. Files no one writes that have held still that long are read at once."""
    from gateway import runtime

    monkeypatch.setattr(runtime, "_SETTLE_S", 30.0)  # a wait is 30 s a file, far past the bound
    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 30.0)
    policy, keys = tmp_path / "policies.yaml", tmp_path / "keys.yaml"
    policy.write_text(_WITH_KEY_FILE)
    keys.write_text('keys:\n  - {id: oops, tenant: team-a, hash: "sha256:NOTHEX"}\n')
    for path in (policy, keys):
        os.utime(path, (time.time() - 60, time.time() - 60))
    started = time.monotonic()
    assert runtime.still_written(policy) == []
    assert time.monotonic() - started < 10


async def test_a_key_file_held_open_for_writing_is_read_once_closed(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t121: a key file written in place was read mid-write: its valid prefix put in force, the keys
    still to be written answered 401 until the rest was. It waits for its writer as policies.yaml does."""
    from gateway import runtime

    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 0.05)  # only the writer's open file holds the reload back
    harness = await make_harness(_WITH_KEY_FILE)
    holder = harness.holder
    keys = holder.path.with_name("keys.yaml")
    whole = "keys:\n" + _key_entry("carol") + _key_entry("dave") + _key_entry("erin")
    keys.write_text(whole)
    assert await holder.reload("test", settle=False)
    prefix = "keys:\n" + _key_entry("carol")
    writer = _slow_writer(keys, prefix, whole[len(prefix) :] + "# the writer's last line\n", 0.6, close_between=False)
    try:
        assert await holder.reload("file changed")
        assert {"carol", "dave", "erin"} <= {key.id for key in holder.current.policy.auth.keys}
    finally:
        writer.join()
    assert holder.current.policy.auth.keys and holder.last_reload_error is None


async def test_a_key_file_held_open_past_the_wait_is_refused_until_closed(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t121: nor is the prefix of a key file still open after the wait applied as a rejected edit's
    key file (t63): its changes wait, with every key of the file last read."""
    from gateway import runtime

    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 0.05)
    monkeypatch.setattr(runtime, "_STABLE_WAIT_MAX_S", 0.3)
    harness = await make_harness(_WITH_KEY_FILE)
    holder = harness.holder
    keys = holder.path.with_name("keys.yaml")
    whole = "keys:\n" + _key_entry("carol") + _key_entry("dave")
    keys.write_text(whole)
    assert await holder.reload("test", settle=False)
    in_force = holder.current.version
    prefix = "keys:\n" + _key_entry("carol")
    writer = _slow_writer(keys, prefix, _key_entry("dave") + _key_entry("erin"), 2.0, close_between=False)  # as above
    try:
        assert not await holder.reload("file changed")
        assert holder.current.version == in_force
        said = holder.last_reload_error or ""
        assert "keys.yaml is still open for writing" in said and "keys.yaml: its changes wait too" in said, said
    finally:
        writer.join()
    assert await holder.reload("file changed")
    assert {"carol", "dave", "erin"} <= {key.id for key in holder.current.policy.auth.keys}
    assert holder.last_reload_error is None


async def test_a_key_file_emptied_or_lost_is_refused_unless_it_says_keys_empty(make_harness: MakeHarness) -> None:
    # a key file cut short (or a `keys new` that lost a race) must not switch every key off
    policy = POLICY.replace("auth:\n  mode: keys\n", "auth:\n  mode: keys\n  key_file: keys.yaml\n")
    harness = await make_harness(policy)
    holder = harness.holder
    keys = holder.path.with_name("keys.yaml")
    keys.write_text('keys:\n  - {id: carol, tenant: team-a, hash: "sha256:' + "c" * 64 + '"}\n')
    assert await holder.reload("test", settle=False)
    assert "carol" in {key.id for key in holder.current.policy.auth.keys}
    for emptied in ("", "# nothing here\n"):
        keys.write_text(emptied)
        assert not await holder.reload("test", settle=False)
        assert "key_file `keys.yaml` is missing, empty or has no `keys` list" in (holder.last_reload_error or "")
        assert "carol" in {key.id for key in holder.current.policy.auth.keys}
    keys.unlink()
    assert not await holder.reload("test", settle=False)
    # nor a policy that points at another file that is not there (a typo: keys.yml)
    keys.write_text('keys:\n  - {id: carol, tenant: team-a, hash: "sha256:' + "c" * 64 + '"}\n')
    holder.path.write_text(policy.replace("key_file: keys.yaml", "key_file: keys.yml"))
    assert not await holder.reload("test", settle=False)
    assert "carol" in {key.id for key in holder.current.policy.auth.keys}
    holder.path.write_text(policy)
    keys.write_text("keys: []\n")
    assert await holder.reload("test", settle=False)
    assert "carol" not in {key.id for key in holder.current.policy.auth.keys}


def _entry(key_id: str, tenant: str = "team-a", extra: str = "") -> str:
    return f'  - {{id: {key_id}, tenant: {tenant}, hash: "{hash_key("sk-" + key_id)}"{extra}}}\n'


async def test_an_invalid_key_file_still_takes_keys_out_never_in(make_harness: MakeHarness) -> None:
    """t98: with one bad line in the key file every change to it was held back, so a key revoked
    then kept answering 200. Keys it no longer lists (id and hash) are refused at once; what it
    adds or widens waits for a valid file."""
    policy = POLICY.replace("auth:\n  mode: keys\n", "auth:\n  mode: keys\n  key_file: keys.yaml\n")
    harness = await make_harness(policy)
    holder = harness.holder
    keys = holder.path.with_name("keys.yaml")
    keys.write_text("keys:\n" + _entry("carol") + _entry("dave", extra=", models: [fast]") + _entry("erin"))
    assert await holder.reload("test", settle=False)
    in_force = holder.current.version

    def ids() -> set[str]:
        return {key.id for key in holder.current.policy.auth.keys}

    bad = '  - {id: oops, tenant: team-b, hash: "sha256:NOTHEX"}\n'
    edited = (
        "keys:\n" + bad + _entry("dave", extra=", models: ['*'], admin: true")  # widened: waits
        + _entry("erin", tenant="team-b")  # moved: waits
        + _entry("frank")  # added: waits
    )  # fmt: skip
    keys.write_text(edited)  # carol taken out
    assert not await holder.reload("test", settle=False)
    assert ids() == {"alice", "bob", "capped", "frugal", "roomy", "dave", "erin"}
    auth = holder.current.auth
    assert (
        auth.authenticate("Bearer sk-dave").allowed == frozenset({"fast"})
        and not auth.authenticate("Bearer sk-dave").admin
    )
    assert auth.authenticate("Bearer sk-erin").tenant == "team-a"
    for refused in ("carol", "frank"):
        with pytest.raises(AuthenticationError):
            auth.authenticate(f"Bearer sk-{refused}")
    assert holder.current.version != in_force  # a version of its own, as /readyz shows
    said = holder.last_reload_error or ""
    assert (
        "keys.yaml: a key taken out of it is refused and models, admin or engine_fields taken back from a key apply; its other changes wait"
        in said
        and "keys[0].hash" in said
    )

    narrowed = holder.current.version
    assert not await holder.reload("test", settle=False)  # read again: nothing more to take out
    assert holder.current.version == narrowed
    keys.write_text(edited.replace(_entry("dave", extra=", models: ['*'], admin: true"), ""))  # dave too
    assert not await holder.reload("test", settle=False)
    assert ids() == {"alice", "bob", "capped", "frugal", "roomy", "erin"}
    keys.write_text(edited.replace('hash: "sha256:NOTHEX"', "hash: [cut"))  # not YAML: tells nothing
    assert not await holder.reload("test", settle=False)
    assert "its changes wait too" in (holder.last_reload_error or "") and "erin" in ids()

    keys.write_text(edited.replace(bad, ""))  # fixed: the file as written applies, carol still out
    assert await holder.reload("test", settle=False)
    assert ids() == {"alice", "bob", "capped", "frugal", "roomy", "dave", "erin", "frank"}
    assert holder.current.auth.authenticate("Bearer sk-dave").admin and holder.last_reload_error is None


async def test_a_rejected_edit_says_nothing_of_a_key_file_that_does_not_exist(
    make_harness: MakeHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """t200: with the shipped policy (auth off, `key_file: keys.yaml`, no such file), an invalid
    edit said "keys.yaml as it is now is in force ... key changes apply" and `key_file: in force`."""
    policy = POLICY.replace("auth:\n  mode: keys\n", "auth:\n  mode: keys\n  key_file: never-made.yaml\n")
    harness = await make_harness(policy)
    holder = harness.holder
    capsys.readouterr()
    holder.path.write_text(policy.replace("fast: {model: small,", "fast: {model: no-such-model,"))
    assert not await holder.reload("test", settle=False)
    said = holder.last_reload_error or ""
    assert "no-such-model" in said and "never-made.yaml" not in said and "in force" not in said, said
    [rejected] = [line for line in capsys.readouterr().out.splitlines() if "policy_rejected" in line]
    assert "key_file" not in rejected and "never-made.yaml" not in rejected, rejected

    holder.path.with_name("never-made.yaml").write_text("keys:\n" + _key_entry("carol"))  # made: it applies
    holder.path.write_text(policy.replace("fast: {model: small,", "fast: {model: other-model,"))
    assert not await holder.reload("test", settle=False)
    assert "never-made.yaml as it is now is in force" in (holder.last_reload_error or ""), holder.last_reload_error


async def test_a_rejected_reload_logs_no_value_it_quotes(
    make_harness: MakeHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    # a key's secret pasted where its hash goes: neither /readyz (t46) nor the shipped log shows it
    harness = await make_harness()
    holder = harness.holder
    capsys.readouterr()
    holder.path.write_text(POLICY.replace(hash_key("sk-alice"), "gw-live-PASTED-SECRET-123"))
    assert not await holder.reload("test", settle=False)
    assert "auth.keys[0].hash" in (holder.last_reload_error or "") and "got '…'" in (holder.last_reload_error or "")
    assert "PASTED-SECRET" not in (holder.last_reload_error or "")
    logged = capsys.readouterr()
    assert "policy_rejected" in logged.out + logged.err
    assert "auth.keys[0].hash" in logged.out + logged.err
    assert "PASTED-SECRET" not in logged.out + logged.err


def test_a_rejected_values_text_is_left_out_of_the_log_even_cut_short() -> None:
    """Long values are shown cut, with no closing quote: the redaction missed them (a tester saw
    56 characters of an sk-proj key in policy_rejected)."""
    from gateway.runtime import loggable_problems

    cut = "models.s.base_url (line 4): expected a URL, got 'sk-proj-0123456789abcdef0123456789abcdef0123456789..."
    assert loggable_problems([cut]) == ["models.s.base_url (line 4): expected a URL, got '…'"]


def test_the_log_keeps_the_names_the_gateway_writes_and_drops_the_values_it_quotes() -> None:
    """t22: the redaction blanked the gateway's own words too ("'…' is missing ... (write '…')")."""
    from gateway.runtime import loggable_problems

    said = [
        "`tenants` is missing while the policy in force has tenants (write `tenants: {}` to remove them all)",
        "limits.on_redis_error (line 3): must be one of `open`, `closed`, got 'sk-proj-secret'",
    ]
    assert loggable_problems(said) == [
        said[0],
        "limits.on_redis_error (line 3): must be one of `open`, `closed`, got '…'",
    ]


@pytest.mark.parametrize(
    ("edit", "hint"),
    [
        (("tier: large}", "tier: large, api_key_env: sk-live-SECRET-1234}"), "(letters, digits and `_`)"),
        ((hash_key("sk-bob"), "md5"), "must be `sha256:` followed by 64 lowercase hex digits"),
        (("  smart: {model: large}", "  smart/: {model: large}"), "no `/` at either end"),
        (("cache: {", "cors: {allow_origins: [https://a.example/x]}\ncache: {"), "no path (or `*`)"),
    ],
)
def test_the_log_keeps_the_gateways_own_hint_where_it_hides_the_value(edit: tuple[str, str], hint: str) -> None:
    """t146: the schema's own `'_'` was hidden with the value: "(letters, digits and '…')"."""
    from gateway.runtime import loggable_problems

    assert edit[0] in POLICY
    with pytest.raises(ConfigError) as rejected:
        load_policy_text(POLICY.replace(edit[0], edit[1]))
    [logged] = loggable_problems(rejected.value.problems)
    assert hint in logged and "SECRET" not in logged and "a.example" not in logged


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (("pair: {", "pair: ["), "did not find expected ',' or ']'"),
        (("  smart: {model: large}", "  smart: {model: large"), "did not find expected ',' or '}'"),
        (("  smart: {model: large}", "  smart: *sk-live-SECRET-1234"), "found undefined alias"),
        (("  smart: {model: large}", "  smart: {model: !sk-live-SECRET-1234 large}"), "for the tag '…'"),
    ],
)
def test_the_log_keeps_the_yaml_parsers_own_words_and_hides_the_files(edit: tuple[str, str], said: str) -> None:
    """t200: `pair: [` was logged as "did not find expected '…' or '…'": the parser's own
    punctuation was hidden as if it were a value of the file."""
    from gateway.runtime import loggable_problems

    assert edit[0] in POLICY
    with pytest.raises(ConfigError) as rejected:
        load_policy_text(POLICY.replace(edit[0], edit[1], 1))
    logged = loggable_problems(rejected.value.problems)
    assert "not valid YAML" in logged[0] and said in logged[0] and "SECRET" not in str(logged), logged


def test_a_name_that_is_an_environment_variables_value_is_hidden_from_admins_too() -> None:
    """t48: ``model: ${AN_KEY}`` in a route: the unknown model's name, the upstream's key, reached
    an admin's /readyz (names the gateway cannot place stay, for ops to read)."""
    from gateway.runtime import _shown_to_admins

    said = [
        "routes.r.model (line 9): unknown model 'sk-ant-UPSTREAMSECRET-222'; models are: 'small', 'large'",
        "routes.r.fallbacks[0] (line 10): unknown model \"sk-ant-UPSTREAMSECRET-222\"; models are: 'small'",
        "routes.q.model (line 11): unknown model 'smal'; models are: 'small'",
    ]
    shown = _shown_to_admins(said, {"AN_KEY": "sk-ant-UPSTREAMSECRET-222", "SHORT": "small"})
    assert shown == [
        "routes.r.model (line 9): unknown model '…'; models are: 'small', 'large'",
        "routes.r.fallbacks[0] (line 10): unknown model '…'; models are: 'small'",
        said[2],
    ]
    # t111: a key's secret typed in place (no variable holds it) reads as a key, and is hidden too
    typed = ["routes.fast.model (line 9): unknown model 'sk-live-TOPSECRET-9f8e7d6c5b4a'; models are: 'small'"]
    assert _shown_to_admins(typed, {}) == ["routes.fast.model (line 9): unknown model '…'; models are: 'small'"]


async def test_a_secret_typed_into_a_number_or_switch_field_is_hidden_from_admins(make_harness: MakeHarness) -> None:
    """t107: "expected a number, got the string '…'" kept the value for an admin's /readyz, which
    hid it after a bare "got" only."""
    harness = await make_harness()
    holder = harness.holder
    edit = POLICY.replace("price: {input: 0.5", "price: {input: sk-PASTE1-aaaaaaaa")
    holder.path.write_text(edit.replace("cache: {enabled: true", "cache: {enabled: sk-PASTE6-ffffffff"))
    assert not await holder.reload("test", settle=False)
    said = holder.last_reload_error or ""
    assert "models.small.price.input" in said and "cache.enabled" in said
    assert "PASTE" not in said and said.count("got the string '…'") == 2


async def test_a_file_cut_before_its_cache_section_is_refused_not_read_as_the_defaults(
    make_harness: MakeHarness,
) -> None:
    """t56: a file cut just before ``limits:`` or ``cache:`` reloaded with the defaults, the cache
    back on and ``on_redis_error: open``. Writing the section empty takes the defaults on purpose."""
    harness = await make_harness()
    holder = harness.holder
    section = "cache: {enabled: true, coalesce: {enabled: true, wait_s: 2}}\n"
    assert section in POLICY
    holder.path.write_text(POLICY.replace(section, ""))
    assert not await holder.reload("test", settle=False)
    assert "`cache` is missing while the policy in force sets it" in (holder.last_reload_error or "")
    holder.path.write_text(POLICY.replace(section, "cache: {}\n"))
    assert await holder.reload("test", settle=False)


async def test_a_file_cut_inside_its_cache_section_is_refused_where_a_default_would_change(
    make_harness: MakeHarness,
) -> None:
    """t57: a file cut just after ``exact:`` reloaded with ``semantic.enabled`` at its default,
    and semantic hits came back (now the default is off: they went away). A setting left out
    whose default is what the policy says is fine."""
    harness = await make_harness()
    holder = harness.holder
    section = "cache: {enabled: true, coalesce: {enabled: true, wait_s: 2}}\n"
    written = "cache:\n  enabled: true\n  exact: {ttl_s: 3600}\n  semantic: {enabled: true}\n  coalesce: {wait_s: 2}\n"
    holder.path.write_text(POLICY.replace(section, written))
    assert await holder.reload("test", settle=False)
    assert holder.current.policy.cache.semantic.enabled
    cut = "cache:\n  enabled: true\n  exact: {ttl_s: 3600}\n"
    holder.path.write_text(POLICY.replace(section, cut))
    assert not await holder.reload("test", settle=False)
    said = holder.last_reload_error or ""
    assert (
        "`cache.semantic` is missing while the policy in force sets it, and left out all of it takes its "
        "defaults: write `semantic: {}` under `cache` to mean that"
    ) in said
    assert "`cache.coalesce`" in said and "cache.semantic.enabled" not in said  # the mapping, not each setting
    assert holder.current.policy.cache.semantic.enabled
    # `enabled: true` and `ttl_s: 3600` are the defaults: leaving them out changes nothing
    holder.path.write_text(POLICY.replace(section, "cache:\n  semantic: {enabled: true}\n  coalesce: {wait_s: 2}\n"))
    assert await holder.reload("test", settle=False)
    # turning it back off is written out
    holder.path.write_text(POLICY.replace(section, "cache:\n  semantic: {enabled: false}\n  coalesce: {wait_s: 2}\n"))
    assert await holder.reload("test", settle=False)
    assert not holder.current.policy.cache.semantic.enabled
    holder.path.write_text(POLICY.replace(section, "cache: {enabled: false, semantic: {enabled: false}}\n"))
    assert await holder.reload("test", settle=False)
    holder.path.write_text(POLICY.replace(section, "cache: {enabled: false}\n"))
    assert await holder.reload("test", settle=False)  # with the cache off, nothing in it is weakened


async def test_limits_on_redis_error_left_out_is_refused_while_in_force_closed(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    holder = harness.holder
    section = "cache: {enabled: true, coalesce: {enabled: true, wait_s: 2}}\n"
    holder.path.write_text(POLICY.replace(section, section + "limits: {on_redis_error: closed}\n"))
    assert await holder.reload("test", settle=False)
    holder.path.write_text(POLICY.replace(section, section + "limits: {max_body_bytes: 4194304}\n"))
    assert not await holder.reload("test", settle=False)
    assert (
        "`limits.on_redis_error` is missing while the policy in force sets it to `closed`, and left out it "
        "would be `open`: write `on_redis_error: open` under `limits` for the default (or `limits: {}` for "
        "all of `limits`'s defaults), or `on_redis_error: closed` to keep it"
    ) in (holder.last_reload_error or "")
    assert holder.current.policy.limits.on_redis_error == "closed"
    holder.path.write_text(POLICY.replace(section, section + "limits: {}\n"))
    assert await holder.reload("test", settle=False)  # the defaults, on purpose
    assert holder.current.policy.limits == LimitsPolicy()


_TENANTS = "tenants:\n  team-a: {}\n  team-b: {}\n  team-c: {}\n  team-d: {}\n  team-e: {}\n"


def _tenants_last(team_b: str, policy: str = POLICY) -> str:
    """``policy`` with ``tenants:`` last (the part that grows) and team-b's entry as given."""
    assert _TENANTS in policy
    return policy.replace(_TENANTS, "") + _TENANTS.replace("  team-b: {}\n", team_b)


async def test_a_file_cut_inside_a_tenants_entry_is_refused_where_a_limit_would_lift(
    make_harness: MakeHarness,
) -> None:
    """t94: with ``tenants:`` last, a file written in two steps and cut just before team-b's
    ``usd_per_day`` was installed, and the over-budget tenant was served until the rest came."""
    policy = _tenants_last(
        "  team-b:\n    limits:\n      rpm: 600\n      usd_per_day: 10\n    downgrade_auto_at: 0.8\n"
    )
    harness = await make_harness(policy)
    holder = harness.holder
    holder.path.write_text(policy[: policy.index("      usd_per_day")])
    assert not await holder.reload("test", settle=False)
    said = holder.last_reload_error or ""
    assert (
        "`tenants.team-b.limits.usd_per_day` is missing while the policy in force sets it to `10.0`, and left out "
        "it would be `null` (no limit): write `usd_per_day: null` under `tenants.team-b.limits` for the default (or "
        "`limits: {}` for all of `tenants.team-b.limits`'s defaults), or `usd_per_day: 10.0` to keep it"
    ) in said
    assert (
        "`tenants.team-b.downgrade_auto_at` is missing while the policy in force sets it to `0.8`, and left out it "
        "would be `null`: write `downgrade_auto_at: null` under `tenants.team-b` for the default (or `team-b: {}` "
        "for all of `tenants.team-b`'s defaults), or `downgrade_auto_at: 0.8` to keep it"
    ) in said
    assert "team-c" not in said  # cut off too, but written empty in force: left out, it changes nothing
    assert holder.current.policy.tenants["team-b"].limits.usd_per_day == 10
    holder.path.write_text(policy[: policy.index("    downgrade_auto_at")])
    assert not await holder.reload("test", settle=False)
    # the limits taken off on purpose: the setting written null, the mapping written empty
    holder.path.write_text(policy.replace("usd_per_day: 10", "usd_per_day: null"))
    assert await holder.reload("test", settle=False)
    assert holder.current.policy.tenants["team-b"].limits.usd_per_day is None
    holder.path.write_text(_tenants_last("  team-b:\n    limits: {}\n    downgrade_auto_at: 0.8\n"))
    assert await holder.reload("test", settle=False)
    assert holder.current.policy.tenants["team-b"].limits.rpm is None


async def test_a_tenant_left_out_is_refused_while_a_key_names_it(make_harness: MakeHarness) -> None:
    """t94: a file cut before a tenant's entry dropped its limits for every key of the tenant. Its
    entry written empty takes them off on purpose, and a tenant retired with its keys may go."""
    limited = _tenants_last("  team-b: {limits: {usd_per_day: 10}}\n")
    harness = await make_harness(limited)
    holder = harness.holder
    holder.path.write_text(limited.replace("  team-b: {limits: {usd_per_day: 10}}\n", ""))
    assert not await holder.reload("test", settle=False)
    assert holder.last_reload_error == (
        "`tenants.team-b` is missing while the policy in force sets it, and key bob still names it: left out, no "
        "tenant limits apply; write `team-b: {}` under `tenants` to mean that (a tenant no key names may be left out)"
    )
    assert holder.current.policy.tenants["team-b"].limits.usd_per_day == 10
    holder.path.write_text(limited.replace("  team-a: {}\n", ""))  # in force without limits: nothing lifts
    assert await holder.reload("test", settle=False)
    holder.path.write_text(limited.replace("team-b: {limits: {usd_per_day: 10}}", "team-b: {}"))
    assert await holder.reload("test", settle=False)
    assert holder.current.policy.tenants["team-b"].limits.usd_per_day is None
    holder.path.write_text(limited)
    assert await holder.reload("test", settle=False)
    bob = next(line for line in limited.splitlines(keepends=True) if "id: bob" in line)
    holder.path.write_text(limited.replace(bob, "").replace("  team-b: {limits: {usd_per_day: 10}}\n", ""))
    assert await holder.reload("test", settle=False)  # retired with its key: no one is left under its limits
    assert "team-b" not in holder.current.policy.tenants


def test_the_default_tenant_left_out_with_auth_off_is_refused() -> None:
    """With ``auth: {mode: none}`` every request is tenant ``default``, though no key names it."""
    from gateway.config.guard import refuse_weakening_by_omission
    from gateway.config.loader import load_policy_text

    auth = POLICY[POLICY.index("auth:\n") : POLICY.index("tenants:\n")]
    open_policy = POLICY.replace(auth, "auth: {mode: none}\n")
    current = load_policy_text(_tenants_last("  default: {limits: {rpm: 60}}\n", open_policy))
    with pytest.raises(ConfigError) as refused:
        refuse_weakening_by_omission(current, load_policy_text(_tenants_last("", open_policy)))
    assert refused.value.problems == [
        "`tenants.default` is missing while the policy in force sets it, and auth mode none puts every request under "
        "it: left out, no tenant limits apply; write `default: {}` under `tenants` to mean that (a tenant no key names "
        "may be left out)"
    ]
    refuse_weakening_by_omission(current, load_policy_text(_tenants_last("  default: {}\n", open_policy)))


def _many_tenants(entry: str, count: int = 2000, keys: str = "") -> str:
    """POLICY with ``keys`` added to its keys, and ``tenants:`` last with ``count`` tenants ``t0000``...
    each written as ``entry``."""
    tenants = "".join(f"  t{n:04}: {entry}\n" for n in range(count))
    return POLICY.replace(_TENANTS, "").replace("  keys:\n", "  keys:\n" + keys) + "tenants:\n" + tenants


def test_the_guard_gives_the_same_verdicts_over_thousands_of_tenants() -> None:
    """t164: the guard held each path against every other, and a SIGHUP with 2,000 tenants held
    every worker for 6 s. It says the same of each setting left out as it did."""
    from gateway.config.guard import refuse_weakening_by_omission

    keys = "".join(
        f'    - {{id: {name}, tenant: {tenant}, hash: "{hash_key("sk-" + name)}"}}\n'
        for name, tenant in (("k0007", "t0007"), ("k1500", "t1500"), ("k1999a", "t1999"), ("k1999b", "t1999"))
    )
    limited = "{limits: {rpm: 5, usd_per_day: 10}}"
    current = load_policy_text(_many_tenants(limited, keys=keys))
    refuse_weakening_by_omission(current, load_policy_text(_many_tenants(limited, keys=keys) + "# touched\n"))
    for emptied in ("{}", "{limits: {}}"):
        refuse_weakening_by_omission(current, load_policy_text(_many_tenants(emptied, keys=keys)))
    refuse_weakening_by_omission(current, load_policy_text(POLICY.replace(_TENANTS, "tenants: {}\n")))
    with pytest.raises(ConfigError) as refused:
        refuse_weakening_by_omission(current, load_policy_text(_many_tenants("{limits: {usd_per_day: 10}}", keys=keys)))
    assert refused.value.problems == [
        f"`tenants.t{n:04}.limits.rpm` is missing while the policy in force sets it to `5`, and left out it would be "
        f"`null` (no limit): write `rpm: null` under `tenants.t{n:04}.limits` for the default (or `limits: {{}}` for "
        f"all of `tenants.t{n:04}.limits`'s defaults), or `rpm: 5` to keep it"
        for n in range(2000)
    ]
    cut = _many_tenants(limited, keys=keys)
    with pytest.raises(ConfigError) as refused:  # cut inside the tenants: only those a key names count
        refuse_weakening_by_omission(current, load_policy_text(cut[: cut.index("  t1000:")]))
    assert refused.value.problems == [
        f"`tenants.{tenant}` is missing while the policy in force sets it, and {users}: left out, no tenant limits "
        f"apply; write `{tenant}: {{}}` under `tenants` to mean that (a tenant no key names may be left out)"
        for tenant, users in (("t1500", "key k1500 still names it"), ("t1999", "keys k1999a, k1999b still name it"))
    ]


async def test_a_reload_judges_a_changed_file_off_the_event_loop(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t164: the guard ran on the event loop, and a reload of 2,000 tenants held /healthz for 6 s;
    an unchanged file (a SIGHUP, a touch) paid it too, for nothing."""
    from gateway import runtime
    from gateway.config.guard import refuse_weakening_by_omission as guard
    from gateway.config.loader import LoadedPolicy

    judged_in: list[str] = []

    def watched(current: LoadedPolicy, new: LoadedPolicy) -> None:
        judged_in.append(threading.current_thread().name)
        guard(current, new)

    monkeypatch.setattr(runtime, "refuse_weakening_by_omission", watched)
    harness = await make_harness()
    holder = harness.holder
    assert await holder.reload("SIGHUP", settle=False)
    assert judged_in == []  # the same bytes: nothing to hold them to
    holder.path.write_text(POLICY + "# touched\n")
    assert await holder.reload("file changed", settle=False)
    assert judged_in and threading.current_thread().name not in judged_in
    assert holder.current.version == load_policy_text(POLICY + "# touched\n").version


async def test_a_rejected_edit_put_back_says_so_in_the_log(
    make_harness: MakeHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """t66: /readyz was clean again, but the last policy event stayed policy_rejected, and an alert
    built on it never resolved."""
    harness = await make_harness()
    holder = harness.holder
    holder.path.write_text(POLICY.replace("auth:", "auth:\n  nonsense: 1\n"))
    assert not await holder.reload("test", settle=False)
    capsys.readouterr()
    holder.path.write_text(POLICY)
    assert await holder.reload("test", settle=False)
    assert holder.last_reload_error is None
    assert "by=reverted" in _cleared(capsys.readouterr().out)
    assert await holder.reload("test", settle=False)  # once: nothing was rejected since
    assert "policy_rejection_cleared" not in capsys.readouterr().out


async def test_a_rejected_edit_fixed_in_a_new_version_says_so_in_the_log(
    make_harness: MakeHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """t69: fixing the typo but keeping the rest of the edit (the common fix) logged
    policy_reloaded only, so an alert on policy_rejected never resolved."""
    harness = await make_harness()
    holder = harness.holder
    holder.path.write_text(POLICY.replace("auth:", "auth:\n  nonsense: 1\n"))
    assert not await holder.reload("test", settle=False)
    capsys.readouterr()
    holder.path.write_text(POLICY + "# the intended change\n")
    assert await holder.reload("test", settle=False)
    assert holder.last_reload_error is None
    out = capsys.readouterr().out
    assert "policy_reloaded" in out
    assert "by=new_version" in _cleared(out)
    holder.path.write_text(POLICY + "# and another\n")
    assert await holder.reload("test", settle=False)  # a reload with no rejection before it: nothing cleared
    assert "policy_rejection_cleared" not in capsys.readouterr().out


def _cleared(log: str) -> str:
    (line,) = [line for line in log.splitlines() if "policy_rejection_cleared" in line]
    return line


async def test_a_reload_asked_for_on_an_unchanged_file_says_so_once(
    make_harness: MakeHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """t166: a SIGHUP on an unchanged policies.yaml logged nothing, so an operator could not tell
    the signal had arrived. A reload the file's watch makes on its own stays quiet (no spam)."""
    harness = await make_harness()
    holder = harness.holder
    version = holder.current.version
    capsys.readouterr()
    assert await holder.reload("SIGHUP", settle=False)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "policy_" in line]
    assert "policy_unchanged" in line and f"version={version}" in line and "reason=SIGHUP" in line
    holder.path.touch()
    assert await holder.reload("file changed", settle=False)
    assert "policy_" not in capsys.readouterr().out
