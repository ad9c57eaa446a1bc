"""``gateway keys new`` and ``route`` read the policy through the loader; key file edits keep the file's layout."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.cli.keys import NOT_CONFIRMED
from gateway.config.edit import append_key, remove_key
from gateway.config.kept import keep_policy
from gateway.config.loader import load_keys

HASH = "sha256:" + "c" * 64
OTHER_HASH = "sha256:" + "d" * 64

POLICY = f"""\
pair: {{small: s, large: l}}
models:
  s: {{base_url: "${{KEYS_TEST_UNSET_URL}}", price: {{input: 0, output: 0}}, tier: small}}
  l: {{base_url: "${{KEYS_TEST_UNSET_URL}}", price: {{input: 0, output: 0}}, tier: large}}
routes:
  fast: {{model: s}}
auth:
  mode: keys
  key_file: keys.yaml
  keys: [{{id: inline, hash: "{HASH}"}}]
"""


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tools' default --data-dir is ./.gateway: the checkout's, where `make run` leaves its
    own (t96), unless the test runs elsewhere."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("KEYS_TEST_UNSET_URL", raising=False)
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY)
    return path


def _new(policy: Path, *args: str) -> int:
    return main(["keys", "new", "--tenant", "team", "--policies", str(policy), *args])


def test_new_key_without_upstream_urls_set_keeps_the_key_file_layout(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = policy.parent / "keys.yaml"
    key_file.write_text(f"# by hand\nkeys:\n- {{id: old, hash: '{OTHER_HASH}'}}  # the first\n\n# end\n")
    assert _new(policy, "--id", "fresh", "--models", "fast", "--rpm", "5") == 0
    assert "secret:" in capsys.readouterr().out
    text = key_file.read_text()
    assert text.startswith(f"# by hand\nkeys:\n- {{id: old, hash: '{OTHER_HASH}'}}  # the first\n- ")
    assert text.endswith("\n\n# end\n")
    [new] = [key for key in load_keys(policy).keys if key.id == "fresh"]
    assert (new.tenant, new.models, new.limits.rpm) == ("team", ["fast"], 5)


def test_a_key_made_while_auth_is_off_says_it_has_no_effect(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _new(policy) == 0
    assert "warning" not in capsys.readouterr().err
    policy.write_text(POLICY.replace("mode: keys", "mode: none"))
    assert _new(policy, "--id", "unused") == 0
    err = capsys.readouterr().err
    assert "auth mode none: no key is asked for" in err
    assert "picks it up" not in err  # t66: it went on to say a running gateway picks the key up
    assert main(["keys", "revoke", "--id", "unused", "--policies", str(policy)]) == 0
    err = capsys.readouterr().err
    assert "every request is served with or without this key" in err and "stops accepting" not in err


def test_existing_ids_are_those_the_loader_reads(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _new(policy, "--id", "inline") == 1
    assert "exists already" in capsys.readouterr().err


def test_an_invalid_auth_section_is_reported_by_field_and_line(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy.write_text(POLICY.replace("mode: keys", "mode: key"))
    assert _new(policy) == 1
    assert "auth.mode (line 8): must be one of `none`, `keys`, got 'key'" in capsys.readouterr().err
    assert not (policy.parent / "keys.yaml").exists()


def test_a_key_the_gateway_would_refuse_is_not_written(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _new(policy, "--rpm", "-1") == 1
    assert "limits.rpm: must be >= 0, got -1" in capsys.readouterr().err
    assert _new(policy, "--usd-per-day", "inf") == 1  # t41: written as Infinity, which no loader reads
    assert "limits.usd_per_day: must be a finite number, got inf" in capsys.readouterr().err
    assert _new(policy, "--usd-per-day", "nan") == 1  # t69: said "must be >= 0, got nan"
    assert "limits.usd_per_day: must be a finite number >= 0, got nan" in capsys.readouterr().err
    assert not (policy.parent / "keys.yaml").exists()


def test_a_key_whose_models_name_nothing_is_not_written(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """t134: `--models ,,` wrote `models: []`, a key that can call nothing, with exit 0 and no word;
    refused as an empty tenant is."""
    for models in (",,", "", " , "):
        assert _new(policy, "--models", models) == 1
        assert f"--models {models!r} names no route or model" in capsys.readouterr().err
    assert not (policy.parent / "keys.yaml").exists()


def test_a_bad_tenant_is_named_not_the_key_id_made_from_it(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """t69: a tenant with a tab was answered "key ids are 1-64 letters, digits, ..."."""
    for tenant in ("ac\tme", " "):
        assert main(["keys", "new", "--tenant", tenant, "--policies", str(policy)]) == 1
        err = capsys.readouterr().err
        assert "tenant: must be 1-128 characters, no control characters" in err and "key ids" not in err
    assert not (policy.parent / "keys.yaml").exists()
    assert main(["keys", "new", "--tenant", "ac me", "--policies", str(policy)]) == 0  # t200: a valid tenant, an id
    assert "key id:  ac-me-" in capsys.readouterr().out


def test_an_id_made_from_the_tenant_is_valid_and_unused_whatever_the_tenant(policy: Path) -> None:
    """t200: the id made from a valid tenant ("a b") was invalid; ``--id`` is not needed for any tenant."""
    tenants = ["a b", " a" + "x" * 120 + "é", "/ .. /", "日本", "a\u00a0b", "-._-x-._-"]
    for tenant in tenants:
        assert main(["keys", "new", f"--tenant={tenant.strip()}", "--policies", str(policy)]) == 0
    ids = [key.id for key in load_keys(policy).keys][1:]
    assert [key_id[:-7] for key_id in ids] == ["a-b", "a" + "x" * 56, "key", "key", "a-b", "x"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", key_id) for key_id in ids), ids


def _list(policy: Path, *args: str) -> int:
    return main(["keys", "list", "--policies", str(policy), *args])


def test_keys_list_says_where_each_key_is_and_what_it_may_do(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """t200: no command listed the keys; they were to be read in keys.yaml and policies.yaml by hand."""
    assert _list(policy) == 0  # a key file named but not made yet: the inline key alone
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split() == ["inline", "default", "*", "-", "-", "no", HASH[:15], f"{policy}:auth.keys"]
    assert f"1 key: 1 in {policy} (auth.keys), 0 in {policy.parent / 'keys.yaml'}" in err

    assert _new(policy, "--id", "batch", "--tpm", "1000", "--max-concurrent", "2", "--admin",
                "--engine-fields", "vllm_xargs,priority,vllm_xargs") == 0  # fmt: skip
    capsys.readouterr()
    assert _list(policy, "--json") == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert [(key["id"], key["source"]) for key in document["keys"]] == [("inline", "auth.keys"), ("batch", "key_file")]
    batch = document["keys"][1]
    assert (batch["tenant"], batch["admin"], batch["engine_fields"]) == ("team", True, ["vllm_xargs", "priority"])
    assert batch["limits"] == {"tpm": 1000, "max_concurrent": 2} and batch["file"] == str(policy.parent / "keys.yaml")
    assert "hash" not in batch and len(batch["hash_prefix"]) == len("sha256:") + 8
    assert "note:" not in err

    policy.write_text(POLICY.replace("mode: keys", "mode: none").replace("  key_file: keys.yaml\n", ""))
    assert _list(policy, "--json") == 0
    out, err = capsys.readouterr()
    assert (json.loads(out)["key_file"], [key["id"] for key in json.loads(out)["keys"]]) == (None, ["inline"])
    assert f"1 key: 1 in {policy} (auth.keys)\n" in err
    assert "auth mode none: no key is asked for, so none of these has any effect" in err


def test_keys_list_of_an_invalid_key_file_lists_nothing_and_says_why(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = policy.parent / "keys.yaml"
    key_file.write_text('keys:\n  - {id: oops, tenant: t, hash: "sha256:NOTHEX"}\n')
    assert _list(policy) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{key_file}: keys[0].hash (line 2): must be `sha256:` followed by" in err
    assert f"{key_file} is invalid as it is now (the problems above): its keys are not listed until they are" in err


def test_keys_list_says_every_problem_of_the_auth_section_that_check_says(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t201: with a key's id refused, `keys list` said that alone, and `check` the engine fields
    beside it too (of that key, and of another)."""
    policy.write_text(
        POLICY.replace(
            f'keys: [{{id: inline, hash: "{HASH}"}}]',
            f"keys:\n    - {{id: 'bad id!', hash: '{HASH}', engine_fields: [nope]}}\n"
            f"    - {{id: other, hash: '{OTHER_HASH}', engine_fields: [zzz]}}",
        )
    )
    assert main(["check", str(policy)]) == 1
    checked = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - auth.")]
    assert _list(policy) == 1
    listed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert len(checked) == 3 and listed == checked
    assert "the key at auth.keys[0] names 'nope'" in listed[1] and "key 'other' names 'zzz'" in listed[2]


def test_keys_list_reads_the_policy_in_force_while_policies_yaml_is_not_yaml(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `new` and `revoke` find the keys (t81): through --data-dir's policy.last-accepted.yaml."""
    (policy.parent / "keys.yaml").write_text(f"keys: [{{id: app, tenant: t, hash: '{OTHER_HASH}'}}]\n")
    data = _last_accepted(policy, POLICY)
    policy.write_text(POLICY.replace("  fast: {model: s}", "\tfast: {model: s}"))
    assert _list(policy, "--data-dir", str(data)) == 0
    out, err = capsys.readouterr()
    kept = data / "policy.last-accepted.yaml"
    assert [row.split()[0] for row in out.splitlines()[1:]] == ["inline", "app"]
    assert out.splitlines()[1].endswith(f"{kept}:auth.keys") and out.splitlines()[2].endswith(
        str(policy.parent / "keys.yaml")
    )
    assert f"using the key file of the policy in force as {kept} has it" in err
    assert _list(policy, "--data-dir", str(policy.parent / "none")) == 1
    assert "give serve's --data-dir" in capsys.readouterr().err


def test_route_names_an_unknown_route_before_loading_the_classifier(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["route", "--jsonl", "-", "--policies", str(policy), "--route", "auto", "--artifacts", "/nonexistent"])
    assert exited.value.code == 1
    assert "no route 'auto'; routes are: fast" in capsys.readouterr().err


@pytest.mark.parametrize("threshold", ["nan", "5", "-1", "x"])
def test_route_refuses_a_threshold_that_is_no_probability(
    policy: Path, threshold: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """t44: nan, 5 and -1 were taken, and nan written out as NaN, which is no JSON."""
    with pytest.raises(SystemExit) as refused:
        main(["route", "--policies", str(policy), "--threshold", threshold, "auto"])
    assert refused.value.code == 2 and "--threshold" in capsys.readouterr().err


def test_route_and_calibrate_refuse_a_route_that_does_not_use_the_classifier(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["route"], ["calibrate", "--target-large-share", "0.3"]):
        with pytest.raises(SystemExit) as exited:
            main(
                [*command, "--jsonl", "-", "--policies", str(policy), "--route", "fast", "--artifacts", "/nonexistent"]
            )
        assert exited.value.code == 1
        assert "route 'fast' does not use the classifier" in capsys.readouterr().err


def test_the_router_command_says_a_redis_url_is_malformed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["router", "status", "--tenant", "acme", "--redis", "foo://x"]) == 2
    assert "invalid --redis / REDIS_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "before",
    [
        "",
        "# nothing yet\n",
        "keys: []\n",
        "keys:\n",
        "keys: ~  # none yet\n",
        "keys:\n- {id: a, hash: x}\n",
        "keys:\n    - id: a   # block style, deeper\n      models:\n        - fast\n\n# end\n",
        "keys: [{id: a},\n  {id: b}]\n",
        "keys:\n  - {id: a}",  # no final newline
    ],
)
def test_append_key_fits_any_layout(tmp_path: Path, before: str) -> None:
    path = tmp_path / "keys.yaml"
    if before:
        path.write_text(before)
    listed = (yaml.safe_load(before) or {}).get("keys") or []
    append_key(path, {"id": "new", "hash": HASH})
    after = path.read_text()
    assert [key["id"] for key in yaml.safe_load(after)["keys"]] == [*(key["id"] for key in listed), "new"]
    kept = [line for line in before.splitlines() if line.strip() and not line.startswith("keys:") and "}]" not in line]
    assert all(line in after.splitlines() for line in kept), after  # every other line as it was


def test_a_tiny_budget_is_written_as_a_number_the_loader_reads(tmp_path: Path) -> None:
    """JSON writes 1e-06, which YAML 1.1 (PyYAML) reads as a string."""
    path = tmp_path / "keys.yaml"
    append_key(path, {"id": "new", "hash": HASH, "limits": {"usd_per_day": 1e-06, "usd_per_month": 2.5e-10}})
    assert yaml.safe_load(path.read_text())["keys"][0]["limits"] == {"usd_per_day": 1e-06, "usd_per_month": 2.5e-10}


def _append_many(path: str, writer: int) -> None:
    for n in range(15):
        append_key(
            path, {"id": f"w{writer}-{n}", "tenant": "t", "hash": hashlib.sha256(f"{writer}-{n}".encode()).hexdigest()}
        )


def test_keys_added_at_once_by_several_processes_are_all_kept(tmp_path: Path) -> None:
    # each `keys new` reads, edits and writes the file: unlocked, eight at once left 2 of 20 keys
    path = tmp_path / "keys.yaml"
    append_key(path, {"id": "first", "tenant": "t", "hash": "0" * 64})
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_append_many, [(str(path), writer) for writer in range(4)])
    ids = [entry["id"] for entry in yaml.safe_load(path.read_text())["keys"]]
    assert sorted(ids) == sorted(["first", *(f"w{w}-{n}" for w in range(4) for n in range(15))])
    assert not [p for p in tmp_path.iterdir() if p.name not in ("keys.yaml", ".keys.yaml.lock")]  # no temporary left


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_a_key_added_by_root_leaves_the_key_file_to_its_owner(tmp_path: Path) -> None:
    # `sudo gateway keys new` on the service user's 0600 file: the gateway must still read it
    path = tmp_path / "keys.yaml"
    append_key(path, {"id": "first", "tenant": "t", "hash": "0" * 64})
    os.chown(path, 1234, 1234)
    os.chmod(path, 0o600)
    append_key(path, {"id": "second", "tenant": "t", "hash": "1" * 64})
    after = path.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (1234, 1234, 0o600)
    assert [entry["id"] for entry in yaml.safe_load(path.read_text())["keys"]] == ["first", "second"]


def test_new_warns_of_what_check_warns_about(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """t63: a misspelt model and a tenant not under tenants: went unsaid, though check and serve warn."""
    policy.write_text(POLICY + "tenants:\n  team: {}\n")
    assert main(["keys", "new", "--tenant", "team-typo", "--id", "k", "--models", "fast,autoo",
                 "--policies", str(policy)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: key k: models autoo are neither routes nor models; it cannot call them" in err
    assert "warning: key k: tenant 'team-typo' is not under tenants:, so no tenant limits apply to it" in err
    assert "A running gateway picks it up by itself." in err
    assert _new(policy, "--id", "fine", "--models", "fast") == 0
    assert "warning" not in capsys.readouterr().err


def test_new_warns_of_a_rate_of_zero_which_refuses_every_request(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t146: `--rpm 0` made, in silence, a key every request of which is a 429 with a retry-after,
    which SDKs retry. The policy accepts it (as `rpm: 0` in a key file), so the tool does too, and
    says what it does, as `check` and serve do."""
    assert _new(policy, "--id", "idle", "--rpm", "0", "--tpm", "0") == 0
    err = capsys.readouterr().err
    for limit in ("rpm", "tpm"):
        assert f"warning: key idle: limits.{limit} 0 refuses every request it makes (429, with a retry-after" in err, (
            err
        )
    assert [key.limits.rpm for key in load_keys(policy).keys if key.id == "idle"] == [0]


def test_new_says_how_the_key_applies_while_the_policy_is_invalid(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t63: it promised a running gateway picks the key up while the file was one the gateway rejects."""
    data = _last_accepted(policy, POLICY)
    policy.write_text(POLICY.replace("fast: {model: s}", "fast: {model: nope}"))
    assert _new(policy, "--id", "k", "--data-dir", str(data)) == 0
    err = capsys.readouterr().err
    assert "picks it up by itself" not in err
    assert f"note: {policy} is invalid as it is now (1 problem: `gateway check {policy}` lists them)" in err
    assert f"which reads {policy.parent / 'keys.yaml'} too" in err and "so it picks it up all the same" in err


def _last_accepted(policy: Path, text: str) -> Path:
    """A data dir as serve leaves it: the policy in force in policy.last-accepted.yaml, kept for ``policy``."""
    data = policy.parent / "data"
    data.mkdir(exist_ok=True)
    keep_policy(data, text, policy)
    return data


def test_a_policy_kept_for_another_file_is_not_taken_for_the_one_in_force(
    policy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """t96: `make run` left .gateway/ in the checkout; `keys new --policies` of a file elsewhere, its
    auth section invalid, took that stopped, unrelated gateway's policy for the one in force and
    wrote the key (exit 0) to the key file it names, read against the other file's folder."""
    checkout = policy.parent / "checkout"
    (checkout / ".gateway").mkdir(parents=True)
    keep_policy(checkout / ".gateway", POLICY, checkout / "policies.yaml")
    monkeypatch.chdir(checkout)
    policy.write_text(POLICY.replace("mode: keys", "mode: key"))
    assert _new(policy) == 1
    err = capsys.readouterr().err
    assert "auth.mode (line 8): must be one of `none`, `keys`, got 'key'" in err
    kept = Path(".gateway") / "policy.last-accepted.yaml"
    assert f"no policy in force found ({kept} was kept for {checkout / 'policies.yaml'}, not for {policy})" in err
    assert not (policy.parent / "keys.yaml").exists()

    # while the file holds an edit a gateway rejects, the tool says it cannot confirm, and why
    policy.write_text(POLICY.replace("fast: {model: s}", "fast: {model: nope}"))
    assert _new(policy, "--id", "k") == NOT_CONFIRMED
    assert f"cannot confirm that it is {policy.parent / 'keys.yaml'} ({kept} was kept for" in capsys.readouterr().err

    # a kept policy that does not say which file it was kept for is not taken either
    (checkout / ".gateway" / "policy.last-accepted.source").unlink()
    policy.write_text(POLICY.replace("mode: keys", "mode: key"))
    assert _new(policy) == 1
    assert f"({kept} does not say which policy file it was kept for)" in capsys.readouterr().err

    # the same file through a symlink is the same file
    keep_policy(checkout / ".gateway", POLICY, checkout / "policies.yaml")
    (checkout / "policies.yaml").symlink_to(policy)
    assert _new(policy, "--id", "k2") == 0
    assert "using the key file of the policy in force" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["new", "revoke"])
def test_the_key_tools_warn_when_a_rejected_edit_moved_the_key_file(
    policy: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """t66: a rejected edit that also moved auth.key_file: `revoke` took the key out of the new file and
    promised a running gateway stops accepting it, while the policy in force still read the old file."""
    (policy.parent / "keys.yaml").write_text(f"keys: [{{id: app, tenant: t, hash: '{OTHER_HASH}'}}]\n")
    data = _last_accepted(policy, POLICY)
    shutil.copy(policy.parent / "keys.yaml", policy.parent / "keys2.yaml")
    policy.write_text(POLICY.replace("key_file: keys.yaml", "key_file: keys2.yaml").replace("model: s}", "model: no}"))
    args = ["--id", "app"] if command == "revoke" else ["--tenant", "t"]
    status = main(["keys", command, *args, "--policies", str(policy), "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert status == NOT_CONFIRMED, err
    assert f"WARNING: {policy} is invalid as it is now" in err
    assert f"reads {policy.parent / 'keys.yaml'}, not {policy.parent / 'keys2.yaml'}" in err
    assert ("still accepts it" if command == "revoke" else "does not pick it up (the key gets 401)") in err
    assert "all the same" not in err and "by itself" not in err

    # where the policy in force cannot be read, the tool says it cannot confirm
    shutil.copy(policy.parent / "keys.yaml", policy.parent / "keys2.yaml")
    status = main(["keys", command, *args, "--policies", str(policy), "--data-dir", str(policy.parent / "none")])
    err = capsys.readouterr().err
    assert status == NOT_CONFIRMED, err
    assert f"cannot confirm that it is {policy.parent / 'keys2.yaml'} (there is no {policy.parent / 'none'}" in err


def test_check_says_a_keys_model_is_not_public(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """t63: a model with public: false was said to be neither a route nor a model."""
    hidden = POLICY.replace("tier: small}", "tier: small, public: false}")
    policy.write_text(hidden.replace("keys: [{id: inline,", "keys: [{id: inline, models: [s, fast],"))
    assert main(["check", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "note: key inline: models s are not public (public: false); it cannot call them" in out
    assert "neither" not in out


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("keys:\n- {id: a, hash: x}  # first\n- {id: b, hash: y}\n", "keys:\n- {id: b, hash: y}\n"),
        ("keys:\n- {id: b, hash: y}\n- {id: a, hash: x}\n\n# end\n", "keys:\n- {id: b, hash: y}\n\n# end\n"),
        ("keys:\n  - id: a\n    models:\n      - fast\n  - id: b\n", "keys:\n  - id: b\n"),
        ("keys: [{id: a}, {id: b}]\n", "keys: [{id: b}]\n"),
        ("keys: [{id: b},\n  {id: a}]  # flow\n", "keys: [{id: b}]  # flow\n"),
        ("# mine\nkeys:\n  - {id: a}  # the only one\n", "# mine\nkeys: []  # the only one\n"),
        ("keys: [{id: a}]\n", "keys: []\n"),
        ("keys:\n- id: a\n  hash: x\n", "keys: []\n"),
        ("keys:\n- {id: a}", "keys: []"),
    ],
)
def test_revoke_takes_only_that_key_out(tmp_path: Path, before: str, after: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(before)
    assert remove_key(path, "a")
    assert path.read_text() == after
    assert not remove_key(path, "a")


@pytest.mark.parametrize("other", ["on", "no", "0123", "2024-01-01", "1:30"])
def test_revoke_reads_the_other_keys_ids_as_the_gateway_does(tmp_path: Path, other: str) -> None:
    """t66: an id that YAML 1.1 reads as no text (`on` is True), which the gateway reads as text
    (YAML 1.2), made every revoke fail: the check after the edit read the file as YAML 1.1."""
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - id: {other}\n    hash: x\n  - id: leaked\n    hash: y\n")
    assert remove_key(path, "leaked")
    assert path.read_text() == f"keys:\n  - id: {other}\n    hash: x\n"
    assert remove_key(path, other)
    assert path.read_text() == "keys: []\n"


def test_revoke_from_the_cli(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """t63: no command revoked a key; the last one out leaves `keys: []`, which a gateway applies
    (an empty file would be refused as one cut short)."""
    assert _new(policy, "--id", "going") == 0
    capsys.readouterr()
    assert main(["keys", "revoke", "--id", "going", "--policies", str(policy)]) == 0
    err = capsys.readouterr().err
    assert "key going removed from" in err and "A running gateway stops accepting it by itself." in err
    assert [key.id for key in load_keys(policy).keys] == ["inline"]
    assert yaml.safe_load((policy.parent / "keys.yaml").read_text()) == {"keys": []}
    assert main(["keys", "revoke", "--id", "going", "--policies", str(policy)]) == 1
    assert "lists no key 'going': no such key" in capsys.readouterr().err
    assert main(["keys", "revoke", "--id", "inline", "--policies", str(policy)]) == 1
    assert f"it is written in {policy} under auth.keys: delete it there" in capsys.readouterr().err


def test_revoke_of_an_inline_key_with_no_key_file_says_where_it_is(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t146: with keys only under auth.keys it said to add a key_file, which revokes nothing."""
    policy.write_text(POLICY.replace("  key_file: keys.yaml\n", ""))
    assert main(["keys", "revoke", "--id", "inline", "--policies", str(policy)]) == 1
    err = capsys.readouterr().err
    assert f"key inline is written in {policy} under auth.keys: delete it there" in err and "add e.g." not in err
    assert main(["keys", "revoke", "--id", "nobody", "--policies", str(policy)]) == 1
    assert f"{policy} names no auth.key_file and lists no key 'nobody' under auth.keys" in capsys.readouterr().err
    assert not (policy.parent / "keys.yaml").exists()


@pytest.mark.parametrize("command", ["new", "revoke"])
def test_the_key_tools_work_while_the_policy_is_not_even_yaml(
    policy: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """t81: with a tab in policies.yaml `keys revoke` printed the YAML error and exited 1, the key
    still live, though a running gateway keeps the policy in force and applies its key file."""
    (policy.parent / "keys.yaml").write_text(f"keys: [{{id: app, tenant: t, hash: '{OTHER_HASH}'}}]\n")
    data = _last_accepted(policy, POLICY)
    policy.write_text(POLICY.replace("  fast: {model: s}", "\tfast: {model: s}"))
    args = ["--id", "app"] if command == "revoke" else ["--id", "fresh", "--tenant", "t"]
    assert main(["keys", command, *args, "--policies", str(policy), "--data-dir", str(data)]) == 0
    err = capsys.readouterr().err
    assert f"using the key file of the policy in force as {data / 'policy.last-accepted.yaml'} has it" in err
    assert "all the same" in err
    ids = [key["id"] for key in yaml.safe_load((policy.parent / "keys.yaml").read_text())["keys"]]
    assert ids == ([] if command == "revoke" else ["app", "fresh"])
    # with no policy in force to fall back on, the YAML error, and where to point the tool (t82)
    assert main(["keys", command, *args, "--policies", str(policy), "--data-dir", str(policy.parent / "none")]) == 1
    assert "give serve's --data-dir" in capsys.readouterr().err


def test_the_key_tools_follow_the_key_file_in_force_after_an_edit_moved_it_to_a_new_file(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t82: an edit naming a key file that did not exist was rejected; `keys new` created that file,
    so the edit loaded, and promised a running gateway would pick the key up (401 for 20 s and
    more); `keys revoke` said "no such key" while the key stayed live in the file in force."""
    (policy.parent / "keys.yaml").write_text(f"keys: [{{id: app, tenant: t, hash: '{OTHER_HASH}'}}]\n")
    data = _last_accepted(policy, POLICY)
    policy.write_text(POLICY.replace("key_file: keys.yaml", "key_file: other.yaml"))
    assert _new(policy, "--id", "fresh", "--data-dir", str(data)) == NOT_CONFIRMED
    err = capsys.readouterr().err
    assert f"reads {policy.parent / 'keys.yaml'}, so it does not pick it up" in err and "by itself" not in err
    assert main(["keys", "revoke", "--id", "app", "--policies", str(policy), "--data-dir", str(data)]) == 0
    assert f"key app removed from {policy.parent / 'keys.yaml'}" in capsys.readouterr().err
    assert yaml.safe_load((policy.parent / "keys.yaml").read_text()) == {"keys": []}


def test_revoke_takes_a_key_out_of_a_key_file_another_line_of_which_is_invalid(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """t98: one bad line a hand edit left in the key file, and `keys revoke` exited 1, the file as it
    was and the leaked key live, saying the kept policy "cannot be read"; a running gateway drops a
    key taken out of an invalid key file (gateway.runtime), so the tool takes it out."""
    key_file = policy.parent / "keys.yaml"
    app = f'  - {{id: app, tenant: t, hash: "{OTHER_HASH}"}}  # leaked\n'
    bad = '  - {id: oops, tenant: t, hash: "sha256:NOTHEX"}\n'
    other = "  - {id: other, tenant: t, hash: 'sha256:" + "e" * 64 + "'}\n"
    key_file.write_text("# by hand\nkeys:\n" + app + bad + other)
    data = _last_accepted(policy, POLICY)
    revoke = ["keys", "revoke", "--policies", str(policy), "--data-dir", str(data), "--id"]
    assert main([*revoke, "app"]) == 0
    err = capsys.readouterr().err
    assert key_file.read_text() == "# by hand\nkeys:\n" + bad + other  # its line only: the others as written
    assert f"{key_file}: invalid\n  - {key_file}: keys[1].hash (line 4): must be `sha256:` followed by" in err
    assert f"key app removed from {key_file}." in err
    assert f"note: {key_file} is invalid as it is now (1 problem: `gateway check {policy}` lists them)" in err
    # t121: serve starts on the policy its data dir keeps (f113), so "a gateway cannot start on it" was untrue
    assert "cannot start on it" not in err
    assert (
        f"`gateway serve` started now exits 2, unless its --data-dir keeps a policy last accepted for {policy}" in err
    )
    assert "drops the keys taken out of it even so" in err and "so it stops accepting it all the same" in err
    assert "cannot be read" not in err and "no policy in force found" not in err

    # a key is not added to a file a running gateway takes no new key from
    assert _new(policy, "--id", "fresh", "--data-dir", str(data)) == 1
    err = capsys.readouterr().err
    assert f"{key_file} is invalid as it is now (the problems above): a running gateway takes no new key" in err
    assert "secret:" not in capsys.readouterr().out and "fresh" not in key_file.read_text()

    # while policies.yaml is not even YAML, through the policy in force (t81), the same
    policy.write_text(POLICY.replace("  fast: {model: s}", "\tfast: {model: s}"))
    assert main([*revoke, "other"]) == 0
    assert key_file.read_text() == "# by hand\nkeys:\n" + bad
    assert "using the key file of the policy in force" in capsys.readouterr().err

    # a key file that is not YAML: nothing can be taken out of it, and the tool says why
    key_file.write_text("keys:\n" + bad + "  - {id: cut, hash: 'x\n")
    policy.write_text(POLICY)
    assert main([*revoke, "oops"]) == 1
    assert f"cannot take the key out of {key_file}: it is not YAML as it is now" in capsys.readouterr().err

    # a kept policy that was read is not said to be unreadable: what is wrong with it is
    policy.write_text(POLICY.replace("  fast: {model: s}", "\tfast: {model: s}"))
    keep_policy(data, POLICY.replace("mode: keys", "mode: key"), policy)
    assert main([*revoke, "oops"]) == 1
    kept = data / "policy.last-accepted.yaml"
    assert f"no policy in force found (the auth section of {kept} is invalid: auth.mode (line 8)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("argv", "usage", "extra"),
    [
        (["check", "--bogus", "policies.yaml"], "python -m gateway check", "--bogus"),
        (["keys", "new", "--tenant", "team-a", "--id", "a", "b"], "python -m gateway keys new", "b"),
        (["keys", "--bogus", "new", "--tenant", "team-a"], "python -m gateway keys", "--bogus"),
        (["router", "status", "--tenant", "a", "--bogus"], "python -m gateway router status", "--bogus"),
        (["report", "log.jsonl", "--bogus"], "python -m gateway report", "--bogus"),
    ],
)
def test_an_argument_a_command_does_not_take_is_refused_with_that_commands_usage(
    argv: list[str], usage: str, extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """t166: the top level's usage (`python -m gateway [-h] {serve,check,...}`) was printed instead."""
    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert err.startswith(f"usage: {usage} ") and f"{usage}: error: unrecognized arguments: {extra}\n" in err, err


@pytest.mark.parametrize("given", ["", "  "])
def test_an_empty_key_id_is_refused_not_made_up(policy: Path, given: str, capsys: pytest.CaptureFixture[str]) -> None:
    """t166: ``--id ''`` made an id from the tenant, as if --id had been left out."""
    with pytest.raises(SystemExit) as refused:
        _new(policy, "--id", given)
    assert refused.value.code == 2
    assert "argument --id: empty: leave --id out for one made from the tenant" in capsys.readouterr().err
    assert not (policy.parent / "keys.yaml").exists()
