"""Hot reload of policies.yaml in a running gateway process: file edits, SIGHUP, bad edits, in-flight requests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
import yaml

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.conftest import inject, upstream_stats
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway

T = TypeVar("T")

FAST_ROUTE = "fast: {model: small, fallbacks: [large]}"
FAST_ON_LARGE = "fast: {model: large}"


# ---------------------------------------------------------------------- helpers


def _base_policy(small: SimulatedUpstream, large: SimulatedUpstream) -> str:
    # Timeouts well above the in-flight test's slow answers (a 6 s body, an 8 s stream), so a slow
    # 2-core machine never turns one of them into a timeout-and-fallback.
    text = policy_text(small, large).replace("first_byte: 1, total: 5}", "first_byte: 4, total: 30}")
    assert FAST_ROUTE in text
    return text


def _version_of(text: str) -> str:
    """What the gateway reports as the policy version: sha256 of the file's bytes, 12 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file as editors do (write a temporary file, rename it over the old one)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _chat(
    gw: GatewayProcess,
    model: str = "fast",
    content: str = "hello reload world",
    timeout: float = 10,
    key: str | None = None,
) -> httpx.Response:
    return httpx.post(
        f"{gw.base_url}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}]},
        headers={"authorization": f"Bearer {key}"} if key else None,
        timeout=timeout,
    )


def _readyz(gw: GatewayProcess) -> dict[str, Any]:
    readyz: dict[str, Any] = httpx.get(f"{gw.url}/readyz", timeout=5).json()
    return readyz


def _poll(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 30.0, step_s: float = 0.05) -> T:
    """Call ``probe`` until ``done`` accepts its value; return the last value either way (a deadline
    generous for a busy CI machine: the poll ends as soon as ``done`` holds). A fix after a rejected
    edit is polled for as a version *and* no reload error: a reload puts the new version in force
    before it clears the rejection, an await apart, and /readyz can answer in between."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(step_s)
        value = probe()
    return value


def _wait_for_ops_event(
    gw: GatewayProcess, event: str, match: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Ops log lines are written by a background thread: poll for them."""
    return _poll(lambda: [r for r in gw.ops_records(event) if match(r)], bool, timeout_s)


def _settle(gw: GatewayProcess, text: str) -> str:
    """Put ``text`` (a valid policy) in force and wait until it is; return its version."""
    _write_atomically(gw.policy_path, text)
    version = _version_of(text)
    state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == version and p["last_reload_error"] is None)
    assert state["version"] == version, f"policy reset not picked up: {state}"
    return version


# --------------------------------------------------------------------- fixtures


def _env(redis_server: EmbeddedRedis, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url, "TEST_LARGE_KEY": "sk-large-secret-123", **extra}


@pytest.fixture(scope="module")
def reload_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    """An own gateway whose policy file the tests edit (watcher on, as by default)."""
    gw = start_gateway(
        tmp_path_factory.mktemp("reload-gw"), _base_policy(small_upstream, large_upstream), env=_env(redis_server)
    )
    yield gw
    gw.stop()


@pytest.fixture
def gw(
    reload_gateway: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> Iterator[GatewayProcess]:
    """The reload gateway, left after each test with a fresh valid policy and no reload error.

    The reset writes the base policy plus a unique comment, so its version always differs
    from the one in force and the reload really happens (and clears ``last_reload_error``).
    """
    yield reload_gateway
    if reload_gateway.process.poll() is None:
        _settle(reload_gateway, _base_policy(small_upstream, large_upstream) + f"\n# reset {uuid.uuid4().hex}\n")


# ------------------------------------------------------------------------ tests


def test_file_edit_is_picked_up_without_restart(gw: GatewayProcess) -> None:
    before = _chat(gw)
    assert before.status_code == 200, before.text
    assert before.headers["x-gateway-model"] == "small"
    old_version = before.headers["x-gateway-policy-version"]
    assert _readyz(gw)["policy"]["version"] == old_version

    edited = gw.policy_path.read_text().replace(FAST_ROUTE, FAST_ON_LARGE)
    _write_atomically(gw.policy_path, edited)

    after = _poll(
        lambda: _chat(gw),
        lambda r: (
            r.headers.get("x-gateway-model") == "large" and r.headers.get("x-gateway-policy-version") != old_version
        ),
    )
    assert after.status_code == 200, after.text
    assert after.headers["x-gateway-model"] == "large", "the edit was not picked up within 30 s"
    new_version = after.headers["x-gateway-policy-version"]
    assert new_version == _version_of(edited)

    ready = _readyz(gw)
    assert ready["policy"]["version"] == new_version
    assert ready["policy"]["last_reload_error"] is None
    assert ready["policy"]["source"] == str(gw.policy_path)

    reloaded = _wait_for_ops_event(gw, "policy_reloaded", lambda r: r.get("version") == new_version)
    assert len(reloaded) == 1, gw.stderr_text()
    assert reloaded[0]["previous"] == old_version
    assert reloaded[0]["reason"] == "file changed"
    assert reloaded[0]["level"] == "info"


def test_a_route_pointed_at_another_model_does_not_serve_the_old_models_answers(
    gw: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t56: after the reload the exact cache served the old model's answer for its whole ttl_s,
    named as the old model, at no cost."""
    cached = _base_policy(small_upstream, large_upstream).replace(
        "cache: {enabled: false}", "cache: {enabled: true, semantic: {enabled: false}, redis_timeout_ms: 2000}"
    )
    assert cached != _base_policy(small_upstream, large_upstream)
    _settle(gw, cached)
    question = f"which model answers {uuid.uuid4().hex}?"
    assert _chat(gw, content=question).headers["x-gateway-cache"] == "miss"
    assert _chat(gw, content=question).headers["x-gateway-cache"] == "exact"
    _settle(gw, cached.replace(FAST_ROUTE, "fast: {model: small}"))  # the fallbacks alone: kept (t57)
    assert _chat(gw, content=question).headers["x-gateway-cache"] == "exact"
    _settle(gw, cached.replace(FAST_ROUTE, FAST_ON_LARGE))
    after = _chat(gw, content=question)
    assert (after.headers["x-gateway-cache"], after.headers["x-gateway-model"]) == ("miss", "large")


def _with_share_route(text: str, route: str, target: float | None) -> str:
    """``text`` with a classifier route ``route`` at threshold 0.99, keeping ``target`` of its prompts on large."""
    share = "" if target is None else f", target_large_share: {target}"
    return text.replace(
        FAST_ROUTE, f"{FAST_ROUTE}\n  {route}: {{strategy: classifier, model: small, threshold: 0.99{share}}}"
    )


def _threshold_in_force(gw: GatewayProcess, route: str, n: int) -> float:
    """The threshold request ``n`` of ``route`` was held against (the log's: the header is t178's too)."""
    answer = _chat(gw, model=route, content=f"Question {n}: what is {n} times {n % 7}, and why?")
    assert answer.status_code == 200, answer.text
    threshold: float = gw.wait_for_record(answer.headers["x-request-id"])["threshold"]
    return threshold


def _learn_threshold(gw: GatewayProcess, route: str) -> float:
    """Route prompts on ``route`` until its moving threshold leaves the policy's 0.99; that threshold."""
    for n in range(400):
        threshold = _threshold_in_force(gw, route, n)
        if threshold != 0.99:
            return threshold
    raise AssertionError("the threshold never moved")


def _router_status(gw: GatewayProcess, redis_server: EmbeddedRedis) -> dict[str, Any]:
    said = subprocess.run(
        [sys.executable, "-m", "gateway", "router", "status", "--tenant", "default", "--redis", redis_server.url,
         "--policies", str(gw.policy_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert said.returncode == 0, said.stderr
    assert redis_server.url not in said.stdout + said.stderr
    status: dict[str, Any] = json.loads(said.stdout)
    return status


def test_router_status_shows_the_shared_threshold_of_each_target_share_route(
    gw: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
    redis_server: EmbeddedRedis,
) -> None:  # fmt: skip
    """t178: the threshold a target-share route holds prompts against, shared in Redis, was shown
    by nothing but the request log."""
    route = f"status-{uuid.uuid4().hex[:8]}"
    _settle(gw, _with_share_route(_base_policy(small_upstream, large_upstream), route, 0.5))
    assert _router_status(gw, redis_server)["target_share_thresholds"][route] == {
        "target_large_share": 0.5,
        "threshold": None,  # nothing shared yet: the route holds prompts against its policy's 0.99
    }
    learnt = _learn_threshold(gw, route)
    shown = _router_status(gw, redis_server)["target_share_thresholds"]
    assert shown[route] == {"target_large_share": 0.5, "threshold": learnt}  # as the log rounds it
    assert "fast" not in shown and "auto" not in shown  # routes without a target share


def test_a_reload_that_changes_a_routes_target_share_starts_its_threshold_again(
    gw: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream,
    redis_server: EmbeddedRedis,
) -> None:  # fmt: skip
    """t178: the threshold learnt for a 0.7 target stayed in force (in the worker and in Redis)
    after a reload set 0.3, and half the prompts went large."""
    route, base = f"share-{uuid.uuid4().hex[:8]}", _base_policy(small_upstream, large_upstream)
    _settle(gw, _with_share_route(base, route, 0.7))
    learnt = _learn_threshold(gw, route)
    assert learnt < 0.9
    assert _threshold_in_force(gw, route, 1000) == learnt  # the same target: kept
    _settle(gw, _with_share_route(base, route, 0.3))
    assert _threshold_in_force(gw, route, 1001) == 0.99  # another target: the policy's threshold again
    assert _router_status(gw, redis_server)["target_share_thresholds"][route]["threshold"] is None
    _settle(gw, _with_share_route(base, route, None))  # removed, then added again with another value
    _settle(gw, _with_share_route(base, route, 0.3))
    assert _threshold_in_force(gw, route, 1002) == 0.99
    relearnt = _learn_threshold(gw, route)  # and it moves for the new target, shared as before
    assert _router_status(gw, redis_server)["target_share_thresholds"][route] == {
        "target_large_share": 0.3,
        "threshold": relearnt,
    }


def test_a_request_log_change_is_applied_and_said_to_need_a_restart(gw: GatewayProcess) -> None:
    edited = gw.policy_path.read_text() + "\nrequest_log: {path: never-opened.jsonl}\n"
    version = _settle(gw, edited)
    said = _wait_for_ops_event(gw, "policy_needs_restart", lambda r: r.get("section") == "request_log")
    assert said and said[0]["level"] == "warning", gw.stderr_text()
    assert _chat(gw).headers["x-gateway-policy-version"] == version  # the rest of the edit is in force
    # t200: /readyz says so too, until the edit is reverted
    assert _readyz(gw)["policy"]["restart_needed"] == ["request_log"]
    _settle(gw, edited.replace("\nrequest_log: {path: never-opened.jsonl}\n", "\n# reverted\n"))
    assert _readyz(gw)["policy"]["restart_needed"] == []


def test_a_rejected_edits_text_is_shown_only_to_an_admin_key(gw: GatewayProcess) -> None:
    """/readyz needs no key; what a rejected edit says (key ids, tenants, values from the
    environment) and the policy's path are for an admin key only once auth is on."""
    keys = (
        "auth:\n  mode: keys\n  keys:\n"
        f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}\n'
        f'    - {{id: app, tenant: team-a, hash: "{hash_key("sk-app")}"}}'
    )
    keyed = gw.policy_path.read_text().replace("auth: {mode: none}", keys)
    _write_atomically(gw.policy_path, keyed)
    admin = {"authorization": "Bearer sk-ops"}

    def as_admin() -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{gw.url}/readyz", headers=admin, timeout=5).json()
        return body

    assert _poll(as_admin, lambda r: r["policy"]["version"] == _version_of(keyed))["policy"]["source"]
    _write_atomically(gw.policy_path, keyed.replace(FAST_ROUTE, "fast: {model: no-such-model}"))
    detailed = _poll(as_admin, lambda r: r["policy"]["last_reload_error"] is not None)["policy"]
    assert "no-such-model" in detailed["last_reload_error"] and detailed["source"] == str(gw.policy_path)
    for headers in ({}, {"authorization": "Bearer sk-app"}, {"authorization": "Bearer wrong"}):
        response = httpx.get(f"{gw.url}/readyz", headers=headers, timeout=5)
        assert response.status_code == 200
        policy = response.json()["policy"]
        assert policy["last_reload_error"].startswith("a policy reload was rejected")
        assert "no-such-model" not in response.text and "ops" not in response.text and policy["source"] is None


def _keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "keys", *args], capture_output=True, text=True, timeout=60)


def _of(gw: GatewayProcess) -> tuple[str, ...]:
    """The key tools' options for this gateway's policy file and data dir."""
    return ("--policies", str(gw.policy_path), "--data-dir", str(gw.policy_path.parent / "data"))


def test_keys_still_to_be_written_to_a_key_file_written_in_place_keep_answering(gw: GatewayProcess) -> None:
    """t121: the key file written in place (a pipe, scp, an editor that saves in place) was read while
    its writer paused: its valid prefix was put in force, and the keys still to be written answered
    401 until the rest was. It waits for the writer, as policies.yaml does (f110)."""
    keys = gw.policy_path.with_name("keys.yaml")
    keyed = gw.policy_path.read_text().replace("auth: {mode: none}", "auth:\n  mode: keys\n  key_file: keys.yaml")
    ids = ("first", "second", "third")
    whole = "keys:\n" + "".join(f'  - {{id: {i}, tenant: team-a, hash: "{hash_key("sk-" + i)}"}}\n' for i in ids)
    try:
        _write_atomically(keys, whole)
        _write_atomically(gw.policy_path, keyed)
        state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == _version_of(keyed + whole), 30)
        assert state["version"] == _version_of(keyed + whole), gw.stderr_text()
        prefix = whole[: whole.index("  - {id: second")]
        seen: set[int] = set()
        with keys.open("w") as handle:
            handle.write(prefix)
            handle.flush()
            deadline = time.monotonic() + 1.5  # longer than the gateway waits for a file to stop changing
            while time.monotonic() < deadline:
                seen.add(_chat(gw, key="sk-third").status_code)
                time.sleep(0.05)
            handle.write(whole[len(prefix) :] + "# the writer's last line\n")
        assert seen == {200}, gw.stderr_text()
        written = _version_of(keyed + whole + "# the writer's last line\n")
        state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == written and not p["last_reload_error"])
        assert state["version"] == written and state["last_reload_error"] is None, gw.stderr_text()
        assert _chat(gw, key="sk-third").status_code == 200
        assert _version_of(keyed + prefix) not in {r["version"] for r in gw.ops_records("policy_reloaded")}
    finally:
        keys.unlink(missing_ok=True)


def test_the_key_tools_say_a_rejected_edit_that_moved_the_key_file_is_not_applied(gw: GatewayProcess) -> None:
    """t66: with a rejected edit that also moved auth.key_file, `keys revoke` edited the new file and
    promised the key was refused, but the policy in force reads the old one: the leaked key kept 200."""
    keys, moved = gw.policy_path.with_name("keys.yaml"), gw.policy_path.with_name("keys2.yaml")
    keyed = gw.policy_path.read_text().replace("auth: {mode: none}", "auth:\n  mode: keys\n  key_file: keys.yaml")
    listed = f'keys:\n  - {{id: leaked, tenant: team-a, hash: "{hash_key("sk-leaked")}"}}\n'
    try:
        _write_atomically(keys, listed)
        _write_atomically(gw.policy_path, keyed)
        version = _poll(lambda: _readyz(gw)["policy"]["version"], _version_of(keyed + listed).__eq__, timeout_s=30)
        assert version == _version_of(keyed + listed), gw.stderr_text()
        assert _chat(gw, key="sk-leaked").status_code == 200
        _write_atomically(moved, listed)
        _write_atomically(
            gw.policy_path,
            keyed.replace("key_file: keys.yaml", "key_file: keys2.yaml").replace(FAST_ROUTE, "fast: {model: nope}"),
        )
        assert _poll(lambda: _readyz(gw)["policy"]["last_reload_error"], bool, timeout_s=30)

        revoked = _keys_cli("revoke", "--id", "leaked", *_of(gw))
        assert revoked.returncode == 3, revoked.stderr
        assert "WARNING:" in revoked.stderr and "so it still accepts it" in revoked.stderr
        made = _keys_cli("new", "--tenant", "team-a", *_of(gw))
        assert made.returncode == 3, made.stderr
        assert "so it does not pick it up (the key gets 401)" in made.stderr
        secret = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret:"))
        assert "leaked" not in moved.read_text()
        # what the tools said is what the gateway does (its key file is re-read on each rejected reload)
        os.kill(gw.process.pid, signal.SIGHUP)
        assert _wait_for_ops_event(gw, "policy_rejected", lambda r: r.get("reason") == "SIGHUP", timeout_s=30)
        assert (_chat(gw, key="sk-leaked").status_code, _chat(gw, key=secret).status_code) == (200, 401)
    finally:
        keys.unlink(missing_ok=True)
        moved.unlink(missing_ok=True)


def test_check_refuses_with_the_gateways_words_an_edit_the_gateway_refuses(gw: GatewayProcess) -> None:
    """t94: `gateway check` said ok to an edit that dropped a section the policy in force sets, and the
    gateway then refused it; check now compares with the policy in force in serve's --data-dir."""
    in_force = gw.policy_path.read_text()
    data = gw.policy_path.parent / "data"
    check = [sys.executable, "-m", "gateway", "check", str(gw.policy_path), "--data-dir", str(data)]
    accepted = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr
    assert f"compared with the policy in force at {data / 'policy.last-accepted.yaml'}" in accepted.stdout

    _write_atomically(gw.policy_path, in_force.replace("cache: {enabled: false}\n", ""))
    refused = subprocess.run(check, capture_output=True, text=True, timeout=60)
    rejected = _wait_for_ops_event(gw, "policy_rejected", lambda r: "`cache` is missing" in str(r.get("problems")))
    assert rejected, gw.stderr_text()
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.splitlines()[1:] == [f"  - {problem}" for problem in rejected[-1]["problems"]]
    assert _readyz(gw)["policy"]["last_reload_error"] == "; ".join(rejected[-1]["problems"])


def test_a_file_written_in_two_steps_and_cut_inside_tenants_is_refused_until_it_is_whole(gw: GatewayProcess) -> None:
    """t94: with ``tenants:`` last, an edit written in two steps (an editor on a slow mount, ``kubectl
    cp``, a paste) and cut before a tenant's ``usd_per_day`` was a valid policy: it was installed, and
    the tenant, over its budget, got 200 until the rest was written. Taking the budget off on purpose
    (``usd_per_day: null``) is a reload like any other."""
    tenant = f"cut-{uuid.uuid4().hex[:8]}"  # its own spend, whatever else this Redis has seen today
    keyed = gw.policy_path.read_text().replace(
        "auth: {mode: none}",
        f'auth:\n  mode: keys\n  keys:\n    - {{id: cut, tenant: {tenant}, hash: "{hash_key("sk-cut")}"}}',
    )
    limited = keyed + f"tenants:\n  {tenant}:\n    limits:\n      rpm: 600\n      usd_per_day: 0.000001\n"
    try:
        version = _settle(gw, limited)
        over = _chat(gw, key="sk-cut")  # a millionth of a dollar: less than a request is estimated to cost
        assert (over.status_code, over.json()["error"]["code"]) == (429, "request_too_large_for_budget"), over.text

        edited = limited.replace("rpm: 600", "rpm: 599")
        cut = edited.index("      usd_per_day")
        gw.policy_path.write_text(edited[:cut])  # closed between its steps: read, as a writer it cannot see (f110)
        rejected = _wait_for_ops_event(
            gw, "policy_rejected", lambda r: f"tenants.{tenant}.limits.usd_per_day" in str(r.get("problems")), 10
        )
        assert rejected, gw.stderr_text()
        during = _chat(gw, key="sk-cut")
        assert (during.status_code, during.headers["x-gateway-policy-version"]) == (429, version)
        with gw.policy_path.open("a") as handle:
            handle.write(edited[cut:])
        state = _poll(
            lambda: _readyz(gw)["policy"],
            lambda p: (p["version"], p["last_reload_error"]) == (_version_of(edited), None),
        )
        assert (state["version"], state["last_reload_error"]) == (_version_of(edited), None), gw.stderr_text()
        assert _chat(gw, key="sk-cut").status_code == 429

        _settle(gw, edited.replace("usd_per_day: 0.000001", "usd_per_day: null"))  # the budget off, on purpose
        assert _chat(gw, key="sk-cut").status_code == 200
    finally:
        _settle(gw, keyed + "tenants: {}\n")  # so the fixture's reset (no tenants) is not refused


def test_a_key_file_change_applies_while_a_policy_edit_is_rejected(gw: GatewayProcess) -> None:
    """t63: while policies.yaml held a rejected edit, a key deleted from the key file kept answering
    200 and one made by `keys new` 401, and nothing said the key file's change was held back."""
    keys = gw.policy_path.with_name("keys.yaml")
    admin = f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    keyed = gw.policy_path.read_text().replace(
        "auth: {mode: none}", f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys:\n{admin}"
    )
    listed = f'keys:\n  - {{id: leaving, tenant: team-a, hash: "{hash_key("sk-leaving")}"}}\n'
    ops = {"authorization": "Bearer sk-ops"}

    def admin_view() -> dict[str, Any]:
        policy: dict[str, Any] = httpx.get(f"{gw.url}/readyz", headers=ops, timeout=5).json()["policy"]
        return policy

    try:
        _write_atomically(keys, listed)
        _write_atomically(gw.policy_path, keyed)
        state = _poll(admin_view, lambda p: p["version"] == _version_of(keyed + listed), timeout_s=30)
        assert state["version"] == _version_of(keyed + listed), gw.stderr_text()
        assert _chat(gw, key="sk-leaving").status_code == 200

        _write_atomically(gw.policy_path, keyed.replace(FAST_ROUTE, "fast: {model: no-such-model}"))
        kept = _poll(admin_view, lambda p: p["last_reload_error"] is not None, timeout_s=30)["version"]
        revoked = _keys_cli("revoke", "--id", "leaving", *_of(gw))
        assert revoked.returncode == 0, revoked.stderr
        assert "is invalid as it is now" in revoked.stderr and "stops accepting it all the same" in revoked.stderr
        made = _keys_cli("new", "--tenant", "team-a", "--id", "fresh", *_of(gw))
        assert made.returncode == 0, made.stderr
        secret = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret:"))

        statuses = _poll(lambda: (_chat(gw, key="sk-leaving").status_code, _chat(gw, key=secret).status_code),
                         lambda codes: codes == (401, 200), timeout_s=30)  # fmt: skip
        assert statuses == (401, 200), gw.stderr_text()
        assert _chat(gw, key=secret).headers["x-gateway-model"] == "small"  # the rejected edit is not in force
        state = admin_view()
        assert state["version"] != kept
        said = state["last_reload_error"]
        assert "no-such-model" in said and "keys.yaml as it is now is in force, on the policy kept" in said
        assert _wait_for_ops_event(gw, "policy_rejected", lambda r: r.get("key_file") == "applied", timeout_s=30)
        assert _wait_for_ops_event(gw, "policy_reloaded", lambda r: r.get("key_file_only") is True, timeout_s=30)

        # the rules of any reload hold: an emptied key file is refused, and said to wait
        _write_atomically(keys, "")
        said = _poll(admin_view, lambda p: "its changes wait too" in (p["last_reload_error"] or ""), timeout_s=30)[
            "last_reload_error"
        ]
        assert "keys.yaml: its changes wait too" in said and "is missing, empty or has no `keys` list" in said
        assert _chat(gw, key=secret).status_code == 200
        assert _wait_for_ops_event(gw, "policy_rejected", lambda r: r.get("key_file") == "pending", timeout_s=30)
    finally:
        keys.unlink(missing_ok=True)


def test_a_key_revoked_while_the_key_file_holds_a_bad_line_is_refused_at_once(gw: GatewayProcess) -> None:
    """t98: a hand edit left one invalid entry in the key file; the gateway held back every change to
    it, and `keys revoke` exited 1 blaming the kept policy, so a leaked key kept answering 200. A key
    taken out of an invalid key file is refused; what the bad edit adds waits for a valid file."""
    keys = gw.policy_path.with_name("keys.yaml")
    admin = f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    keyed = gw.policy_path.read_text().replace(
        "auth: {mode: none}", f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys:\n{admin}"
    )
    leaked = f'  - {{id: leaked, tenant: team-a, hash: "{hash_key("sk-leaked")}"}}\n'
    staying = f'  - {{id: staying, tenant: team-b, hash: "{hash_key("sk-staying")}"}}  # by hand\n'
    listed = "keys:\n" + leaked + staying
    ops = {"authorization": "Bearer sk-ops"}

    def admin_view() -> dict[str, Any]:
        policy: dict[str, Any] = httpx.get(f"{gw.url}/readyz", headers=ops, timeout=5).json()["policy"]
        return policy

    def statuses() -> tuple[int, ...]:
        return tuple(_chat(gw, key=f"sk-{key}").status_code for key in ("leaked", "staying", "added"))

    try:
        _write_atomically(keys, listed)
        _write_atomically(gw.policy_path, keyed)
        state = _poll(admin_view, lambda p: p["version"] == _version_of(keyed + listed), timeout_s=30)
        assert state["version"] == _version_of(keyed + listed), gw.stderr_text()
        assert statuses() == (200, 200, 401)

        # a hand edit: a key added, and one line a gateway refuses
        added = f'  - {{id: added, tenant: team-a, hash: "{hash_key("sk-added")}"}}\n'
        bad = '  - {id: oops, tenant: team-b, hash: "sha256:NOTHEX"}\n'
        _write_atomically(keys, listed + added + bad)
        said = _poll(admin_view, lambda p: "keys.yaml" in (p["last_reload_error"] or ""), timeout_s=30)
        assert "keys[3].hash" in said["last_reload_error"], said
        assert said["version"] == state["version"] and statuses() == (200, 200, 401)  # nothing to take out yet

        revoked = _keys_cli("revoke", "--id", "leaked", *_of(gw))
        assert revoked.returncode == 0, revoked.stderr
        assert "keys.yaml is invalid as it is now (1 problem" in revoked.stderr
        assert "so it stops accepting it all the same" in revoked.stderr and "cannot be read" not in revoked.stderr
        assert keys.read_text() == "keys:\n" + staying + added + bad  # its line only, the others as written
        started = time.monotonic()
        refused = _poll(statuses, lambda codes: codes[0] == 401, timeout_s=30)
        took = time.monotonic() - started
        assert refused == (401, 200, 401), gw.stderr_text()  # the bad edit's key waits for a valid file
        assert took < 10, f"refused only after {took:.1f} s"
        state = admin_view()
        assert (
            "keys.yaml: a key taken out of it is refused and models, admin or engine_fields taken back from a key apply; its other changes wait"
            in state["last_reload_error"]
        )
        dropped = _wait_for_ops_event(gw, "policy_reloaded", lambda r: r.get("keys_dropped") == ["leaked"])
        assert dropped and dropped[-1]["version"] == state["version"], gw.stderr_text()
        assert _wait_for_ops_event(gw, "policy_rejected", lambda r: r.get("key_file") == "removals only")

        _write_atomically(keys, "keys:\n" + staying + added)  # the bad line fixed: the rest of the edit applies
        fixed = _poll(statuses, lambda codes: codes == (401, 200, 200), timeout_s=30)
        assert fixed == (401, 200, 200), gw.stderr_text()
        # A reload that read the bad file just before the fix, and applied the fixed key file after,
        # still says so until the next look at the files, which reads the fixed one again.
        cleared = _poll(admin_view, lambda p: p["last_reload_error"] is None, timeout_s=30)
        assert cleared["last_reload_error"] is None, gw.stderr_text()
    finally:
        keys.unlink(missing_ok=True)


def test_models_admin_and_limits_taken_back_while_the_key_file_holds_a_bad_line_apply_at_once(
    gw: GatewayProcess,
) -> None:
    """f232: narrowing a key's ``models``, or taking its ``admin`` away, in a key file another line
    made invalid waited with the rest of the edit, so the key kept calling the model and reading
    every key's usage; so did a budget cut to stop a key that overspends. Taking back is a removal,
    applied as a key taken out is; widening waits."""
    keys = gw.policy_path.with_name("keys.yaml")
    keyed = gw.policy_path.read_text().replace("auth: {mode: none}", "auth:\n  mode: keys\n  key_file: keys.yaml")

    def entry(key_id: str, more: str = "") -> str:
        return f'  - {{id: {key_id}, tenant: team-a, hash: "{hash_key("sk-" + key_id)}"{more}}}\n'

    def state() -> tuple[int, int, int, int, bool]:
        """What app calling fast, app large, narrow fast and spender fast are answered; whether boss is an admin."""
        boss = httpx.get(f"{gw.url}/readyz", headers={"authorization": "Bearer sk-boss"}, timeout=5).json()
        return (
            _chat(gw, model="fast", key="sk-app").status_code,
            _chat(gw, model="large", key="sk-app").status_code,
            _chat(gw, model="fast", key="sk-narrow").status_code,
            _chat(gw, model="fast", key="sk-spender").status_code,
            boss["policy"]["source"] is not None,  # the policy's path: an admin's alone
        )

    listed = (
        entry("app", ", models: [fast, large]") + entry("narrow", ", models: [best]") + entry("boss", ", admin: true")
        + entry("spender", ", limits: {usd_per_day: 5}")
    )  # fmt: skip
    try:
        _write_atomically(keys, "keys:\n" + listed)
        _write_atomically(gw.policy_path, keyed)
        ready = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == _version_of(keyed + "keys:\n" + listed))
        assert ready["last_reload_error"] is None, gw.stderr_text()
        assert state() == (200, 200, 404, 200, True)

        bad = '  - {id: oops, tenant: team-b, hash: "sha256:NOTHEX"}\n'
        edited = entry("app", ", models: [large]") + entry("narrow", ", models: [best, fast]") + entry("boss")
        edited += entry("spender", ", limits: {usd_per_day: 0}")  # spent: refused from now on
        _write_atomically(keys, "keys:\n" + edited + bad)
        taken = _poll(state, lambda s: s == (404, 200, 404, 429, False))
        assert taken == (404, 200, 404, 429, False), gw.stderr_text()  # narrow's fast waits for a valid file
        reloaded = _wait_for_ops_event(gw, "policy_reloaded", lambda r: "models_taken_back" in r)
        assert [(r["models_taken_back"], r.get("admin_taken_back"), r.get("limits_taken_back")) for r in reloaded] == [
            (["app"], ["boss"], ["spender"])
        ]
        assert _wait_for_ops_event(gw, "policy_rejected", lambda r: r.get("key_file") == "removals only")

        _write_atomically(keys, "keys:\n" + edited)  # fixed: the rest of the edit applies
        fixed = _poll(state, lambda s: s == (404, 200, 200, 429, False))
        assert fixed == (404, 200, 200, 429, False), gw.stderr_text()
    finally:
        keys.unlink(missing_ok=True)


def test_a_removed_keys_usage_stays_in_an_admins_usage(gw: GatewayProcess) -> None:
    """A key revoked today spent this month: /v1/usage lists it after the policy no longer does."""
    admin = f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    app = f'    - {{id: leaving-app, tenant: team-a, hash: "{hash_key("sk-leaving")}"}}'
    base = gw.policy_path.read_text()
    ops = {"authorization": "Bearer sk-ops"}

    def install(text: str) -> None:
        _write_atomically(gw.policy_path, text)
        # a loaded 2-core machine can take longer than the usual 5 s to notice the edit
        version = _poll(lambda: httpx.get(f"{gw.url}/readyz", headers=ops, timeout=5).json()["policy"]["version"],
                        lambda v: v == _version_of(text), timeout_s=30)  # fmt: skip
        assert version == _version_of(text), gw.stderr_text()

    def leaving_app_rows() -> list[dict[str, Any]]:
        # a loaded machine can make the usage read time out on Redis: a 503 that says so, asked again
        answer = _poll(lambda: httpx.get(f"{gw.base_url}/usage", headers=ops, timeout=10),
                       lambda r: r.status_code != 503, timeout_s=30)  # fmt: skip
        assert answer.status_code == 200, answer.text
        return [row for row in answer.json()["data"] if row["key_id"] == "leaving-app"]

    with_app = base.replace("auth: {mode: none}", f"auth:\n  mode: keys\n  keys:\n{admin}\n{app}")
    install(with_app)
    assert _chat(gw, content="count me", key="sk-leaving").status_code == 200
    install(with_app.replace(app + "\n", ""))
    leaving = leaving_app_rows()
    assert leaving and leaving[0]["tenant"] == "team-a" and leaving[0]["requests"] >= 1
    # the same key back under another tenant: each tenant's row has its own requests, none merged
    install(with_app.replace("leaving-app, tenant: team-a", "leaving-app, tenant: team-b"))
    assert _chat(gw, content="count me elsewhere", key="sk-leaving").status_code == 200
    by_tenant = {row["tenant"]: row["requests"] for row in leaving_app_rows()}
    assert by_tenant == {"team-a": leaving[0]["requests"], "team-b": 1}


def test_invalid_edits_are_rejected_and_a_fix_is_picked_up(gw: GatewayProcess) -> None:
    good = gw.policy_path.read_text()
    version = _version_of(good)
    state = _readyz(gw)["policy"]
    assert (state["version"], state["last_reload_error"]) == (version, None)

    # 1. A route that points at a model that does not exist.
    unknown_model = good.replace(FAST_ROUTE, "fast: {model: no-such-model}")
    _write_atomically(gw.policy_path, unknown_model)
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: p["last_reload_error"] is not None)
    assert policy["last_reload_error"] is not None, "the bad edit was never looked at"
    assert "routes.fast.model" in policy["last_reload_error"]
    assert "no-such-model" in policy["last_reload_error"]
    assert policy["version"] == version, "a rejected edit must keep the previous policy in force"

    answer = _chat(gw)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-policy-version"] == version
    assert answer.headers["x-gateway-model"] == "small"

    # the shipped log names the field, not the value (which may be a secret in the wrong place)
    rejected = _wait_for_ops_event(gw, "policy_rejected", lambda r: "routes.fast.model" in str(r.get("problems")))
    assert rejected, gw.stderr_text()
    assert "no-such-model" not in str(rejected[-1]["problems"])
    assert rejected[-1]["kept"] == version
    assert rejected[-1]["level"] == "error"
    assert not [r for r in gw.ops_records("policy_reloaded") if r.get("version") == _version_of(unknown_model)]

    # 2. Broken YAML.
    broken = good.replace(FAST_ROUTE, "fast: {model: small, fallbacks: [large]")
    _write_atomically(gw.policy_path, broken)
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: "YAML" in (p["last_reload_error"] or ""))
    assert "not valid YAML" in (policy["last_reload_error"] or ""), policy
    assert "line " in policy["last_reload_error"]
    assert policy["version"] == version
    answer = _chat(gw)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-policy-version"] == version
    assert _wait_for_ops_event(gw, "policy_rejected", lambda r: "YAML" in str(r.get("problems")))

    # 3. A fix (a valid, different policy) is picked up and clears the error.
    fixed = good.replace(FAST_ROUTE, FAST_ON_LARGE)
    _write_atomically(gw.policy_path, fixed)
    answer = _poll(lambda: _chat(gw), lambda r: r.headers.get("x-gateway-policy-version") == _version_of(fixed))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-policy-version"] == _version_of(fixed)
    assert answer.headers["x-gateway-model"] == "large"
    assert _poll(lambda: _readyz(gw)["policy"]["last_reload_error"], lambda e: e is None) is None


def test_a_rejected_edit_names_every_problem_of_every_section_at_once(gw: GatewayProcess) -> None:
    """t200: a bad value elsewhere in a section (or a route) hid the problems its rules would find
    there: /readyz and `policy_rejected` named the first few, the rest only once those were fixed."""
    good = gw.policy_path.read_text()
    version = _version_of(good)
    edits = {
        "retry: {max_attempts: 2,": "retry: {max_attempts: 50,",
        "cache: {enabled: false}": "cache: {enabled: false, semantic: {verify_threshold: 1.993, close_similarity: -3, "
        "max_temperature: -1}}",
        FAST_ROUTE: "fast: {model: small, fallbacks: [larg], threshold: 7}",
    }
    bad = good
    for old, new in edits.items():
        assert bad.count(old) == 1, old
        bad = bad.replace(old, new)
    _write_atomically(gw.policy_path, bad)
    named = [
        "retry.max_attempts",
        "cache.semantic.verify_threshold",
        "cache.semantic.close_similarity",
        "cache.semantic.max_temperature",
        "routes.fast.threshold",
        "routes.fast.fallbacks[0]",
    ]
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: p["last_reload_error"] is not None)
    said = policy["last_reload_error"] or ""
    assert [name in said for name in named] == [True] * len(named), said
    assert "unknown model 'larg'" in said and policy["version"] == version
    rejected = _wait_for_ops_event(gw, "policy_rejected", lambda r: "routes.fast.threshold" in str(r.get("problems")))
    logged = rejected[-1]["problems"]
    assert [any(line.startswith(f"{name} ") for line in logged) for name in named] == [True] * len(named), logged
    assert len(logged) == len(named), logged


def test_a_price_past_the_bound_is_refused_and_the_old_one_keeps_billing(gw: GatewayProcess) -> None:
    """t94: ``output: 1e308`` passed `check` and the reload; each request's cost was then inf
    (null in the log, +Inf in the metrics), which Redis kept as the key's spend for the month."""
    good = gw.policy_path.read_text()
    version = _version_of(good)
    absurd = good.replace("price: {input: 0.5, output: 1.5}", "price: {input: 0.5, output: 1e308}", 1)
    assert absurd != good
    line = next(n for n, text in enumerate(absurd.splitlines(), 1) if "1e308" in text)
    expected = (
        f"models.small.price.output (line {line}): must be a price in USD per million tokens, "
        "from 0 to 1,000,000, got 1e+308"
    )
    _write_atomically(gw.policy_path, absurd)
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: p["last_reload_error"] is not None)
    assert expected in (policy["last_reload_error"] or ""), policy
    assert policy["version"] == version, "a rejected edit must keep the previous policy in force"
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(gw.policy_path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 1 and expected in checked.stderr, checked.stdout + checked.stderr

    answer = _chat(gw, content="priced at the price in force")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-policy-version"] == version
    record = gw.wait_for_record(answer.headers["x-request-id"])
    billed = (record["prompt_tokens"] * 0.5 + record["completion_tokens"] * 1.5) / 1_000_000
    assert record["cost_usd"] == pytest.approx(billed) and 0 < billed < 0.01, record
    assert float(answer.headers["x-gateway-cost-usd"]) == pytest.approx(billed, abs=1e-8)
    metrics = httpx.get(f"{gw.url}/metrics", timeout=5).text
    assert "+Inf" not in "".join(line for line in metrics.splitlines() if line.startswith("gateway_cost_usd"))


def test_reverting_a_rejected_edit_clears_the_reload_error(gw: GatewayProcess) -> None:
    """Undoing a bad edit brings back the version in force: /readyz must stop reporting the error."""
    good = gw.policy_path.read_text()
    version = _version_of(good)
    _write_atomically(gw.policy_path, good.replace(FAST_ROUTE, "fast: {model: no-such-model}"))
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: p["last_reload_error"] is not None)
    assert policy["last_reload_error"] is not None

    # Revert to exactly the file in force (the usual "undo" of a bad edit), and make sure a
    # reload really runs, through the watcher and through SIGHUP.
    _write_atomically(gw.policy_path, good)
    time.sleep(0.4)
    gw.send_signal(signal.SIGHUP)
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: p["last_reload_error"] is None, timeout_s=30)
    assert policy["version"] == version
    assert policy["last_reload_error"] is None, f"the file on disk is valid and in force, yet /readyz says: {policy}"


def test_sighup_reload_alongside_the_watcher(gw: GatewayProcess) -> None:
    """A change followed at once by SIGHUP: reloaded once (whichever comes first), nothing breaks."""
    old_version = _readyz(gw)["policy"]["version"]
    edited = gw.policy_path.read_text().replace(FAST_ROUTE, FAST_ON_LARGE)
    _write_atomically(gw.policy_path, edited)
    gw.send_signal(signal.SIGHUP)
    answer = _poll(lambda: _chat(gw), lambda r: r.headers.get("x-gateway-policy-version") == _version_of(edited))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-model"] == "large"
    assert gw.process.poll() is None
    time.sleep(0.4)  # let the watcher's (debounced) reload run too: it must find nothing new
    reloads = _wait_for_ops_event(gw, "policy_reloaded", lambda r: r.get("version") == _version_of(edited))
    assert len(reloads) == 1, reloads
    assert reloads[0]["previous"] == old_version
    assert reloads[0]["reason"] in ("SIGHUP", "file changed")
    assert _chat(gw).status_code == 200


def test_in_flight_requests_survive_a_reload(
    gw: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    old_version = _readyz(gw)["policy"]["version"]
    # The non-streamed answer's body comes 6 s after its headers; the stream sends a token every
    # 500 ms (~8 s). With a 2.5 s delay (1.6 s from the 4 s first-byte timeout) and 300 ms, the two
    # and a reload that waits out a settle had about 3 s to overlap on a loaded machine.
    inject(small_upstream, {"stall_mid_body_ms": 6000}, {"chunk_delay_ms": 500})

    def slow_stream() -> tuple[int, dict[str, str], list[str]]:
        with httpx.stream(
            "POST", f"{gw.base_url}/chat/completions", timeout=15,
            json={"model": "fast", "stream": True,
                  "messages": [{"role": "user", "content": "one two three four five six"}]},
        ) as response:  # fmt: skip
            return response.status_code, dict(response.headers), [line for line in response.iter_lines() if line]

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_chat, gw, timeout=30)
        _poll(lambda: upstream_stats(small_upstream)["in_flight"], lambda n: n >= 1, timeout_s=30)
        streamed = pool.submit(slow_stream)
        _poll(lambda: upstream_stats(small_upstream)["in_flight"], lambda n: n >= 2, timeout_s=30)
        assert upstream_stats(small_upstream)["in_flight"] == 2

        # Route `fast` moves to the large model, and the small model's settings change, so
        # its provider (the one both requests are using) is replaced and retired.
        edited = (
            gw.policy_path.read_text()
            .replace(FAST_ROUTE, FAST_ON_LARGE)
            .replace("price: {input: 0.5, output: 1.5}", "price: {input: 0.7, output: 1.7}")
        )
        _write_atomically(gw.policy_path, edited)
        new_version = _version_of(edited)
        state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == new_version, timeout_s=30)
        assert state["version"] == new_version
        assert not slow.done(), "the slow request finished before the reload: the test proves nothing"
        assert not streamed.done(), "the stream finished before the reload: the test proves nothing"

        answer = slow.result(timeout=30)
        status, headers, events = streamed.result(timeout=30)

    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-model"] == "small"  # the policy the request started under
    assert answer.headers["x-gateway-policy-version"] == old_version
    assert answer.json()["choices"][0]["message"]["content"]

    assert status == 200
    assert headers["x-gateway-policy-version"] == old_version
    assert events[-1] == "data: [DONE]", events
    payloads = [msgspec.json.decode(e.removeprefix("data: ")) for e in events[:-1]]
    assert not [p for p in payloads if "error" in p], payloads
    text = "".join((p["choices"][0]["delta"].get("content") or "") for p in payloads if p.get("choices"))
    assert text.startswith("[simulated small]"), text
    assert "six five four three two one" in text

    stream_record = gw.wait_for_record(headers["x-request-id"])
    assert stream_record["status"] == 200 and stream_record["error_type"] is None

    # New requests use the new policy.
    after = _chat(gw)
    assert after.status_code == 200
    assert after.headers["x-gateway-model"] == "large"
    assert after.headers["x-gateway-policy-version"] == new_version
    assert upstream_stats(small_upstream)["cancelled"] == 0


# ------------------------------------------------------- SIGHUP, without the watcher


@pytest.fixture(scope="module")
def unwatched_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        tmp_path_factory.mktemp("nowatch-gw"),
        _base_policy(small_upstream, large_upstream),
        env=_env(redis_server, GATEWAY_WATCH_POLICIES="0"),
    )
    yield gw
    gw.stop()


def test_sighup_alone_reloads_the_policy(unwatched_gateway: GatewayProcess) -> None:
    """With GATEWAY_WATCH_POLICIES=0 only SIGHUP can reload: the file watcher is off, the signal is not."""
    gw = unwatched_gateway
    old_version = _readyz(gw)["policy"]["version"]
    edited = gw.policy_path.read_text().replace(FAST_ROUTE, FAST_ON_LARGE)
    _write_atomically(gw.policy_path, edited)
    time.sleep(0.4)  # longer than a watcher's debounce: nothing may have reloaded
    assert _readyz(gw)["policy"]["version"] == old_version
    assert _chat(gw).headers["x-gateway-model"] == "small"

    gw.send_signal(signal.SIGHUP)
    answer = _poll(lambda: _chat(gw), lambda r: r.headers.get("x-gateway-model") == "large", timeout_s=30)
    assert gw.process.poll() is None  # the worker survives the signal
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-model"] == "large", "SIGHUP did not reload the policy"
    assert answer.headers["x-gateway-policy-version"] == _version_of(edited)
    state = _readyz(gw)["policy"]
    assert (state["version"], state["last_reload_error"]) == (_version_of(edited), None)
    reloaded = _wait_for_ops_event(gw, "policy_reloaded", lambda r: r.get("version") == _version_of(edited))
    assert [(r["reason"], r["previous"]) for r in reloaded] == [("SIGHUP", old_version)]

    # A bad file on SIGHUP is rejected the same way as on a file change.
    _write_atomically(gw.policy_path, edited.replace(FAST_ON_LARGE, "fast: {model: no-such-model}"))
    gw.send_signal(signal.SIGHUP)
    policy = _poll(lambda: _readyz(gw)["policy"], lambda p: p["last_reload_error"] is not None, timeout_s=30)
    assert "no-such-model" in (policy["last_reload_error"] or ""), policy
    assert policy["version"] == _version_of(edited)
    rejected = _wait_for_ops_event(gw, "policy_rejected", lambda r: r.get("reason") == "SIGHUP")
    assert rejected and rejected[-1]["kept"] == _version_of(edited)
    assert _chat(gw).headers["x-gateway-model"] == "large"


# ---------------------------------------------------------- Kubernetes ConfigMap layout


def _configmap_publish(folder: Path, generation: int, text: str) -> None:
    """Update a mounted ConfigMap the way the kubelet does.

    ``policies.yaml -> ..data/policies.yaml``, ``..data -> ..<timestamp>``: a new timestamped
    folder is written, ``..data`` is swapped to it with a rename, the old folder is deleted.
    """
    stamped = folder / f"..2024_01_01_00_00_0{generation}.000000001"
    stamped.mkdir()
    (stamped / "policies.yaml").write_text(text)
    data = folder / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = folder / "..data_tmp"
    tmp.symlink_to(stamped.name)
    os.replace(tmp, data)
    if old is not None:
        shutil.rmtree(folder / old)


@pytest.fixture(scope="module")
def configmap_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> Iterator[GatewayProcess]:
    # The gateway's folder is the mount: <workdir>/policies.yaml -> ..data/policies.yaml
    # (start_gateway writes the policy through that link, into the timestamped folder).
    workdir = tmp_path_factory.mktemp("configmap-gw")
    base = _base_policy(small_upstream, large_upstream)
    _configmap_publish(workdir, 1, base)
    (workdir / "policies.yaml").symlink_to("..data/policies.yaml")
    gw = start_gateway(workdir, base, env=_env(redis_server))
    yield gw
    gw.stop()


def test_configmap_updates_are_all_picked_up(configmap_gateway: GatewayProcess) -> None:
    """Every update, not just the first: the first one deletes the folder the link resolved to at start."""
    gw = configmap_gateway
    mount = gw.policy_path.parent
    base = gw.policy_path.read_text()

    first = base.replace(FAST_ROUTE, FAST_ON_LARGE)
    _configmap_publish(mount, 2, first)
    state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == _version_of(first))
    assert state["version"] == _version_of(first), "first ConfigMap update not picked up"

    second = base.replace(FAST_ROUTE, "fast: {model: small}")
    _configmap_publish(mount, 3, second)
    state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == _version_of(second), timeout_s=30)
    assert state["version"] == _version_of(second), "second ConfigMap update not picked up"


async def test_an_edit_made_while_a_worker_starts_is_not_lost(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """A SIGHUP sent between a worker's load of the file and its handler is lost; the worker catches up."""
    import asyncio

    from gateway.accounting.metrics import Metrics
    from gateway.runtime import RuntimeHolder

    path = tmp_path / "policies.yaml"
    path.write_text(_base_policy(small_upstream, large_upstream))
    holder = RuntimeHolder(path, Metrics())
    started = holder.start()
    path.write_text(_base_policy(small_upstream, large_upstream).replace(FAST_ROUTE, FAST_ON_LARGE))
    try:
        holder.reload_on_sighup()  # no signal arrives after this
        for _ in range(100):
            if holder.current.version != started.version:
                break
            await asyncio.sleep(0.02)
        assert holder.current.version != started.version
        assert holder.current.policy.routes["fast"].model == "large"
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await holder.aclose()


_KEYED_AUTH = 'auth:\n  mode: keys\n  keys:\n    - {id: app, tenant: team-a, hash: "sha256:' + "0" * 64 + '"}\n'


def _shipped_with_keys(auth: str = _KEYED_AUTH) -> str:
    """The shipped policies.yaml with auth on (an inline key nobody has the secret of), or with
    ``auth`` for its auth section, however that is written: the file is the user's to edit (t96:
    the tests that read it must hold for any valid edit)."""
    shipped = (Path(__file__).parents[2] / "policies.yaml").read_text()
    root = yaml.compose(shipped, Loader=yaml.SafeLoader)
    assert isinstance(root, yaml.MappingNode), "policies.yaml is no mapping of sections"
    for key, value in root.value:
        if key.value == "auth":  # to where the next section starts (a block) or the closing brace (flow)
            return shipped[: key.start_mark.index] + auth + shipped[value.end_mark.index :]
    return shipped + "\n" + auth


async def test_defect3_no_truncated_prefix_of_the_policy_turns_auth_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prefix a half-finished write can leave, cut at each line and inside lines, keeps keys required."""
    from gateway import runtime
    from gateway.accounting.metrics import Metrics
    from gateway.errors import AuthenticationError
    from gateway.runtime import RuntimeHolder

    monkeypatch.setattr(runtime, "_SETTLE_S", 0.001)  # the stability wait has its own test
    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 0.001)
    monkeypatch.setenv("SMALL_MODEL_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LARGE_MODEL_URL", "http://127.0.0.1:9/v1")
    full = _shipped_with_keys()
    path = tmp_path / "policies.yaml"
    path.write_text(full)
    holder = RuntimeHolder(path, Metrics())
    tenants = holder.start().policy.tenants
    cuts = sorted({i + 1 for i, c in enumerate(full) if c == "\n"} | set(range(0, len(full), 37)))
    try:
        for cut in cuts:
            path.write_text(full[:cut])
            await holder.reload("test")
            runtime_now = holder.current
            assert runtime_now.policy.auth.mode == "keys", (
                f"auth off after a cut at {cut}: {full[max(0, cut - 60) : cut]!r}"
            )
            with pytest.raises(AuthenticationError):
                runtime_now.auth.authenticate(None)
            assert runtime_now.policy.tenants == tenants
            path.write_text(full)
            assert await holder.reload("restore")
    finally:
        await holder.aclose()
    assert len(cuts) > 100


def test_defect3_a_file_still_being_written_is_not_loaded(
    gw: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """A writer that pauses mid-file (a slow kubectl cp) is waited for; the gateway loads the whole file."""
    full = gw.policy_path.read_text().replace(FAST_ROUTE, FAST_ON_LARGE)
    assert full != gw.policy_path.read_text()
    half = full[: full.index("\nauth:")]
    rejected_before = len(gw.ops_records("policy_rejected"))
    with gw.policy_path.open("w") as handle:
        handle.write(half[: len(half) // 2])
        handle.flush()
        for start in range(len(half) // 2, len(full), 200):
            time.sleep(0.02)  # a writer that pauses, but for far less than the settle time
            handle.write(full[start : start + 200])
            handle.flush()
    state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == _version_of(full), timeout_s=30.0)
    assert state["version"] == _version_of(full)
    assert len(gw.ops_records("policy_rejected")) == rejected_before


def test_a_valid_prefix_is_not_put_in_force_while_its_writer_pauses(gw: GatewayProcess) -> None:
    """f110: a writer that paused over 0.25 s (scp over a slow link, a pipe) put a prefix that
    was itself a valid policy in force (logged ``policy_reloaded``, billed by it), then the whole."""
    prefix = gw.policy_path.read_text().replace(FAST_ROUTE, FAST_ON_LARGE)
    full = prefix + "# the writer's last line\n"
    with gw.policy_path.open("w") as handle:
        handle.write(prefix)
        handle.flush()
        seen = {_readyz(gw)["policy"]["version"]}
        deadline = time.monotonic() + 1.5  # longer than the gateway waits for a file to stop changing
        while time.monotonic() < deadline:
            seen.add(_readyz(gw)["policy"]["version"])
            time.sleep(0.05)
        handle.write(full[len(prefix) :])
    state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == _version_of(full), timeout_s=30.0)
    assert state["version"] == _version_of(full)
    assert _version_of(prefix) not in seen
    assert _version_of(prefix) not in {record["version"] for record in gw.ops_records("policy_reloaded")}


async def test_auth_cannot_be_turned_off_by_an_edit_where_serve_required_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` on a public address refuses auth off at start-up; neither a reload nor a worker
    started later (which falls back to the policy last accepted) may turn it off afterwards."""
    from gateway import runtime
    from gateway.accounting.metrics import Metrics
    from gateway.runtime import RuntimeHolder, keep_last_good, load_at_start

    monkeypatch.setattr(runtime, "_SETTLE_S", 0.001)
    monkeypatch.setattr(runtime, "_SETTLE_TOLD_S", 0.001)
    monkeypatch.setenv("SMALL_MODEL_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LARGE_MODEL_URL", "http://127.0.0.1:9/v1")
    keyed = _shipped_with_keys()
    opened = _shipped_with_keys("auth:\n  mode: none\n")
    path, last_good = tmp_path / "policies.yaml", tmp_path / "last-good.yaml"
    path.write_text(keyed)
    holder = RuntimeHolder(path, Metrics(), last_good=last_good, auth_required=True)
    keep_last_good(holder.start().loaded, last_good)
    try:
        path.write_text(opened)
        assert not await holder.reload("test")
        assert holder.current.policy.auth.mode == "keys"
        assert holder.last_reload_error is not None and "auth.mode 'none' is refused" in holder.last_reload_error
        loaded, problems, _, _ = load_at_start(path, last_good, auth_required=True)  # a worker replaced now
        assert loaded.policy.auth.mode == "keys" and "refused" in problems[0]
        assert load_at_start(path, last_good)[0].policy.auth.mode == "none"  # loopback: allowed
        open_holder = RuntimeHolder(path, Metrics())
        open_holder.start()
        await open_holder.aclose()
    finally:
        await holder.aclose()


def test_serve_on_a_public_address_refuses_a_reload_to_auth_off(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    secret = "gw-public-bind-secret-1"
    keyed = _base_policy(small_upstream, large_upstream).replace(
        "auth: {mode: none}",
        f'auth:\n  mode: keys\n  keys:\n    - {{id: ops, tenant: team-a, admin: true, hash: "{hash_key(secret)}"}}',
    )
    assert "mode: keys" in keyed
    gw = start_gateway(
        tmp_path, keyed, env={**_env(redis_server), "GATEWAY_ALLOW_NO_AUTH": ""}, serve_args=("--host", "0.0.0.0")
    )
    try:
        _write_atomically(gw.policy_path, keyed.replace("mode: keys", "mode: none"))
        admin = {"authorization": f"Bearer {secret}"}
        state = _poll(
            lambda: httpx.get(f"{gw.url}/readyz", headers=admin, timeout=5).json()["policy"],
            lambda p: bool(p.get("last_reload_error")),
        )
        assert "auth.mode 'none' is refused" in state["last_reload_error"], state
        assert _chat(gw).status_code == 401
        ok = httpx.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]},
            headers=admin,
            timeout=10,
        )
        assert ok.status_code == 200, ok.text
    finally:
        gw.stop()


def test_browser_origins_are_allowed_as_the_policy_says_and_reloaded(
    gw: GatewayProcess, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """A browser app calls with its own key: an allowed origin's preflight is answered before
    auth, its answers (errors and streams too) carry the origin; other origins get nothing."""
    app, other = "https://app.example", "https://evil.example"
    preflight = {
        "origin": app,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os",
    }
    closed = httpx.options(f"{gw.base_url}/chat/completions", headers=preflight, timeout=5)
    assert "access-control-allow-origin" not in closed.headers  # no cors section: none allowed
    listed = "HTTPS://App.Example/"  # as an operator may write it; browsers send scheme and host in lower case
    _settle(gw, _base_policy(small_upstream, large_upstream) + f'cors: {{allow_origins: ["{listed}"]}}\n')
    for path in ("/chat/completions", "/messages", "/responses", "/models"):
        answered = httpx.options(f"{gw.base_url}{path}", headers=preflight, timeout=5)
        assert answered.status_code == 204 and answered.headers["access-control-allow-origin"] == app
        assert answered.headers["access-control-allow-headers"] == preflight["access-control-request-headers"]
        assert "POST" in answered.headers["access-control-allow-methods"]
    chat = {"model": "fast", "messages": [{"role": "user", "content": "from a browser"}]}
    plain = httpx.post(f"{gw.base_url}/chat/completions", json=chat, headers={"origin": app}, timeout=10)
    assert plain.status_code == 200 and plain.headers["access-control-allow-origin"] == app
    assert plain.headers["access-control-expose-headers"] == "*"  # x-request-id, x-gateway-*, retry-after
    with httpx.stream(
        "POST", f"{gw.base_url}/chat/completions", json={**chat, "stream": True}, headers={"origin": app}, timeout=10
    ) as streamed:
        assert streamed.headers["access-control-allow-origin"] == app and "[DONE]" in streamed.read().decode()
    refused = httpx.post(f"{gw.base_url}/chat/completions", json={**chat, "model": "nope"}, headers={"origin": app})
    assert refused.status_code == 404 and refused.headers["access-control-allow-origin"] == app  # readable error
    foreign = httpx.post(f"{gw.base_url}/chat/completions", json=chat, headers={"origin": other}, timeout=10)
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
    foreign_preflight = httpx.options(f"{gw.base_url}/messages", headers={**preflight, "origin": other}, timeout=5)
    assert "access-control-allow-origin" not in foreign_preflight.headers


def test_a_second_serve_on_the_same_data_dir_is_refused(gw: GatewayProcess) -> None:
    """t29: a second run on one data folder started a second private Redis on the first's socket
    and wiped its metrics; it now exits 2 naming the first run, which goes on serving."""
    second = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policies", str(gw.policy_path), "--port", "1",
         "--data-dir", str(gw.policy_path.parent / "data")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": ""},
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert f"(pid {gw.process.pid})" in second.stderr and "--data-dir" in second.stderr
    assert _chat(gw).status_code == 200


def test_serve_refuses_a_request_log_it_cannot_write_before_it_says_it_serves(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t41: a log path that is a folder (or in a missing one) was said to be served, then a
    30-line traceback and exit 3."""
    (tmp_path / "logs").mkdir()
    policy = tmp_path / "policies.yaml"
    for path in ("logs", "missing/requests.jsonl"):
        policy.write_text(f"{_base_policy(small_upstream, large_upstream)}\nrequest_log: {{path: {path}}}\n")
        refused = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--port", "1",
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1"},
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "request_log.path" in refused.stderr and "serving" not in refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_symlinked_policy_and_a_key_file_elsewhere_are_watched(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t29: the folder's events missed a policy that is a symlink into another folder, and a key
    file outside the policy's folder (a Secret mounted apart): edits there need no SIGHUP."""
    real, secrets, served = tmp_path / "release", tmp_path / "secrets", tmp_path / "served"
    for folder in (real, secrets, served):
        folder.mkdir()
    keys = "auth:\n  mode: keys\n  key_file: ../secrets/keys.yaml\n  keys:\n" + (
        f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    )
    text = _base_policy(small_upstream, large_upstream).replace("auth: {mode: none}", keys)
    (real / "policies.yaml").write_text(text)
    (served / "policies.yaml").symlink_to(real / "policies.yaml")
    gw = start_gateway(served, "", env=_env(redis_server), policy_path=served / "policies.yaml")
    try:
        made = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "new", "--tenant", "team-z", "--policies",
             str(real / "policies.yaml"), "--data-dir", str(served / "data")],  # kept for the symlink: the same file
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        secret = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret:"))
        assert (secrets / "keys.yaml").exists()
        answered = _poll(lambda: _chat(gw, key=secret), lambda r: r.status_code == 200, timeout_s=30)
        assert answered.status_code == 200, "the new key in a file outside the policy's folder was not picked up"
        edited = text.replace(FAST_ROUTE, FAST_ON_LARGE)
        _write_atomically(real / "policies.yaml", edited)  # the symlink's target, in another folder
        after = _poll(lambda: _chat(gw, key="sk-ops"), lambda r: r.headers.get("x-gateway-model") == "large",
                      timeout_s=30)  # fmt: skip
        assert after.headers["x-gateway-model"] == "large", "an edit behind the symlink was not picked up"
    finally:
        gw.stop()


def test_a_relative_request_log_path_is_taken_from_the_policys_folder(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t27: it was taken from wherever serve ran, and a log went to the checkout it was started in."""
    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    text = _base_policy(small_upstream, large_upstream) + "\nrequest_log: {path: requests.jsonl}\n"
    gw = start_gateway(tmp_path / "policy", text, env=_env(redis_server), cwd=elsewhere)
    try:
        answered = _chat(gw, content="where does my line go?")
        assert answered.status_code == 200
        written = gw.policy_path.parent / "requests.jsonl"
        line = _poll(
            lambda: written.read_text() if written.exists() else "", lambda t: answered.headers["x-request-id"] in t
        )
        assert answered.headers["x-request-id"] in line
        assert not (elsewhere / "requests.jsonl").exists()
    finally:
        gw.stop()


def _serve_refused(policies: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policies", str(policies), "--port", "1",
         "--data-dir", str(data_dir), *extra],
        capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1",
                                                          "GATEWAY_ALLOW_NO_AUTH": ""},
    )  # fmt: skip


def test_serve_restarted_while_the_file_is_invalid_serves_the_policy_last_accepted(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """f113: a pod's container restarted (liveness, OOMKill) while the ConfigMap held an edit the
    running gateway had rejected exited 2 at the policy load, and every restart drained one more
    pod (CrashLoopBackOff), although its data dir kept the policy in force. It starts on that
    policy, says so, shows the rejection in /readyz, and takes the next valid edit; with no
    policy kept for this file (a fresh data dir, or one kept for another file) it exits 2."""
    text = _base_policy(small_upstream, large_upstream)
    first = start_gateway(tmp_path / "gw", text, env=_env(redis_server))
    first.stop()
    policy, data = first.policy_path, tmp_path / "gw" / "data"
    _write_atomically(policy, text.replace("version: 1", "version: 1\npair: [", 1))
    gw = start_gateway(tmp_path / "gw", "", policy_path=policy, env=_env(redis_server))
    try:
        said = gw.stderr_text()
        assert f"{policy} is invalid:" in said, said
        kept = data / "policy.last-accepted.yaml"
        assert f"serving the policy last accepted, version {_version_of(text)}, from {kept}" in said, said
        state = _readyz(gw)["policy"]
        assert state["version"] == _version_of(text) and state["last_reload_error"], state
        assert _wait_for_ops_event(gw, "policy_rejected", lambda r: r["reason"] == "start-up")
        answer = _chat(gw)
        assert answer.status_code == 200 and answer.headers["x-gateway-model"] == "small"
        assert kept.read_text() == text  # kept as it was: not the broken file
        fixed = text.replace(FAST_ROUTE, FAST_ON_LARGE)
        _settle(gw, fixed)
        assert _chat(gw).headers["x-gateway-model"] == "large"
        assert kept.read_text() == fixed
        # once, not again by the start-up check of the same file (t121)
        assert [r["reason"] for r in gw.ops_records("policy_rejected")] == ["start-up"], gw.stderr_text()
    finally:
        gw.stop()
    _write_atomically(policy, fixed.replace("version: 1", "version: 1\npair: [", 1))
    fresh = _serve_refused(policy, tmp_path / "fresh")  # a new pod: an empty emptyDir
    assert fresh.returncode == 2 and f"{policy} is invalid:" in fresh.stderr, fresh.stderr
    assert "serving" not in fresh.stderr and "Traceback" not in fresh.stderr
    other = tmp_path / "other" / "policies.yaml"  # another deployment's file on this data dir
    other.parent.mkdir()
    shutil.copy(policy, other)
    foreign = _serve_refused(other, data)
    assert foreign.returncode == 2 and f"was kept for {policy}, not for {other}" in foreign.stderr, foreign.stderr
    assert "serving" not in foreign.stderr
    # the kept policy has auth off: on a public address it is refused as the file itself would be
    public = _serve_refused(policy, data, "--host", "0.0.0.0")
    assert public.returncode == 2 and "auth is off and --host 0.0.0.0" in public.stderr, public.stderr
    assert "serving" not in public.stderr  # t121: it announced serving the kept policy, then refused it


def test_serve_restarted_while_the_file_is_invalid_keeps_the_keys_last_accepted(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """f113: the policy kept with auth on starts with the keys kept with it, on a public address
    too; an emptied key file beside the broken policy lets no one in and keeps no key out."""
    secret = "gw-kept-key-secret-1"
    text = _base_policy(small_upstream, large_upstream).replace(
        "auth: {mode: none}", "auth: {mode: keys, key_file: keys.yaml}"
    )
    workdir = tmp_path / "gw"
    workdir.mkdir()
    (workdir / "keys.yaml").write_text(f'keys:\n  - {{id: k1, tenant: default, hash: "{hash_key(secret)}"}}\n')
    env = {**_env(redis_server), "GATEWAY_ALLOW_NO_AUTH": ""}
    first = start_gateway(workdir, text, env=env, serve_args=("--host", "0.0.0.0"))
    first.stop()
    _write_atomically(first.policy_path, text.replace("version: 1", "version: 1\npair: [", 1))
    (workdir / "keys.yaml").write_text("")
    gw = start_gateway(workdir, "", policy_path=first.policy_path, env=env, serve_args=("--host", "0.0.0.0"))
    try:
        assert "serving the policy last accepted" in gw.stderr_text()
        assert "auth ON" in gw.stderr_text()
        assert _chat(gw).status_code == 401
        assert _chat(gw, key=secret).status_code == 200
    finally:
        gw.stop()


def test_serve_started_while_its_key_file_is_written_in_place_keeps_no_half_of_it(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t122: a gateway started while its key file was written in place served the keys written so
    far (the others 401 while the writer held the file), and kept them as the ones last accepted.
    It waits for the writer as a reload does, and meanwhile serves the keys last accepted."""
    from gateway.config.kept import kept_key_file, read_kept_policy

    text = _base_policy(small_upstream, large_upstream).replace(
        "auth: {mode: none}", "auth: {mode: keys, key_file: keys.yaml}"
    )
    workdir = tmp_path / "gw"
    workdir.mkdir()
    keys = workdir / "keys.yaml"
    whole = "keys:\n" + "".join(f'  - {{id: {i}, tenant: team-a, hash: "{hash_key("sk-" + i)}"}}\n' for i in ("a", "b"))
    keys.write_text(whole)
    start_gateway(workdir, text, env=_env(redis_server)).stop()
    prefix = whole[: whole.index("  - {id: b")]
    kept = kept_key_file(read_kept_policy(workdir / "data", workdir / "policies.yaml")[0])
    with keys.open("w") as handle:
        handle.write(prefix)
        handle.flush()
        gw = start_gateway(workdir, "", policy_path=workdir / "policies.yaml", env=_env(redis_server), timeout_s=40)
        try:
            assert _chat(gw, key="sk-b").status_code == 200, gw.stderr_text()
            assert kept.read_text() == whole
            handle.write(whole[len(prefix) :] + "# the writer's last line\n")
        except BaseException:
            gw.stop()
            raise
    try:
        written = _version_of(text + whole + "# the writer's last line\n")
        state = _poll(lambda: _readyz(gw)["policy"], lambda p: p["version"] == written and not p["last_reload_error"])
        assert state["version"] == written and state["last_reload_error"] is None, gw.stderr_text()
        assert _chat(gw, key="sk-b").status_code == 200
        assert kept.read_text() == whole + "# the writer's last line\n"
    finally:
        gw.stop()


def test_serve_refusing_an_invalid_file_at_start_up_hides_the_values_it_quotes(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t134: a secret pasted into a price or a base_url was printed whole to stderr, the operational
    log, when serve refused the file at start-up (a reload of the same file hid it), and so was one
    in a policy last accepted that is invalid now too. `gateway check`, run by ops on a candidate
    file, still shows the whole text."""
    from gateway.config.kept import keep_policy

    secret = "sk-proj-LEAKEDSECRET1234567890abcdef"
    text = _base_policy(small_upstream, large_upstream)
    pasted = text.replace("price: {input: 0.5,", f"price: {{input: {secret},", 1).replace(
        f"base_url: {large_upstream.url}", f"base_url: {secret}", 1
    )
    assert pasted.count(secret) == 2
    policy = tmp_path / "policies.yaml"
    policy.write_text(pasted)
    refused = _serve_refused(policy, tmp_path / "fresh")
    assert refused.returncode == 2 and f"{policy} is invalid:" in refused.stderr, refused.stderr
    assert "models.small.price.input" in refused.stderr and "models.large.base_url" in refused.stderr
    assert secret not in refused.stderr and "LEAKED" not in refused.stderr, refused.stderr
    assert f"gateway check {policy}` shows them" in refused.stderr
    (tmp_path / "kept").mkdir()
    keep_policy(tmp_path / "kept", pasted, policy)  # a kept copy that is invalid too
    kept = _serve_refused(policy, tmp_path / "kept")
    assert kept.returncode == 2 and "is invalid now too" in kept.stderr, kept.stderr
    assert "LEAKED" not in kept.stderr, kept.stderr
    worker = subprocess.run(  # a worker started on it with no policy kept to fall back to
        [sys.executable, "-m", "uvicorn", "--factory", "gateway.api.app:create_app", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "GATEWAY_POLICIES": str(policy), "GATEWAY_POLICY_LAST_GOOD": "", "REDIS_URL": ""},
    )  # fmt: skip
    assert worker.returncode != 0 and "worker failed to start: ConfigError" in worker.stderr, worker.stderr
    assert "LEAKED" not in worker.stderr, worker.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(policy), "--data-dir", str(tmp_path / "fresh")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 1 and secret in checked.stderr, checked.stderr
