"""``gateway keys new`` and ``route`` read the policy through the loader; key file edits keep the file's layout."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.config.edit import append_key
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
    assert _new(policy) == 0
    assert "auth mode none: no key is asked for" in capsys.readouterr().err


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
    assert not (policy.parent / "keys.yaml").exists()


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
