"""Probes and metrics of the gateway process, its behaviour with Redis down, and ``python -m gateway check``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.auth import hash_key
from gateway.config.kept import keep_policy
from gateway.services.redis_server import start_embedded_redis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway, stop_with_its_redis_back

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _chat(gw: GatewayProcess, model: str = "fast") -> httpx.Response:
    return httpx.post(f"{gw.base_url}/chat/completions", timeout=10,
                      json={"model": model, "messages": [{"role": "user", "content": "ready or not"}]})  # fmt: skip


def _metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


# --------------------------------------------------------------- the shared gateway


def test_healthz(gateway: GatewayProcess) -> None:
    response = httpx.get(f"{gateway.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_redis_and_the_policy_in_force(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    answer = _chat(gateway)
    assert answer.status_code == 200, answer.text
    response = httpx.get(f"{gateway.url}/readyz", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["redis"] == "ok"
    assert body["policy"]["version"] == answer.headers["x-gateway-policy-version"]
    assert re.fullmatch(r"[0-9a-f]{12}", body["policy"]["version"])
    assert body["policy"]["source"] == str(gateway.policy_path)
    assert body["policy"]["last_reload_error"] is None
    assert set(body["upstreams"]) >= {"small", "large"}


def test_metrics_are_prometheus_text(gateway: GatewayProcess, small_upstream: SimulatedUpstream) -> None:
    assert _chat(gateway).status_code == 200
    response = httpx.get(f"{gateway.url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE gateway_requests_total counter" in text
    assert any('route="fast"' in line and 'model="small"' in line and 'status="200"' in line
               for line in _metric_lines(text, "gateway_requests_total"))  # fmt: skip
    cost = [line for line in _metric_lines(text, "gateway_cost_usd_total") if 'model="small"' in line]
    assert cost, text
    assert float(cost[0].rsplit(" ", 1)[1]) > 0
    assert _metric_lines(text, "gateway_overhead_seconds_bucket")
    assert 'le="+Inf"' in "".join(_metric_lines(text, "gateway_overhead_seconds_bucket"))
    assert "gateway_redis_up 1.0" in text.splitlines()
    version = httpx.get(f"{gateway.url}/readyz", timeout=5).json()["policy"]["version"]
    assert f'gateway_policy_info{{version="{version}"}} 1.0' in text.splitlines()
    assert "_created" not in text  # t166: prometheus_client's own series, which the README does not list
    # Every sample line parses as "<name>{labels} <float>".
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# ------------------------------------------------------------------------ Redis down


@pytest.fixture(scope="module")
def redisless_gateway(
    tmp_path_factory: pytest.TempPathFactory, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> Iterator[GatewayProcess]:
    redis_url = f"redis://:pw-down@127.0.0.1:{free_port()}/0"  # nothing listens there
    workdir = tmp_path_factory.mktemp("redisless-gw")
    gw = start_gateway(
        workdir,
        policy_text(small_upstream, large_upstream),
        env={"REDIS_URL": redis_url, "TEST_LARGE_KEY": "sk-large-secret-123"},
        expect_ready=False,
    )
    yield gw
    stop_with_its_redis_back(gw, redis_url, workdir / "redis")


def test_redis_down_means_not_ready_but_still_serving(
    redisless_gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    gw = redisless_gateway
    started = time.monotonic()
    for _ in range(4):  # spaced over > 1 s, so Redis is really checked again (checks are at most 1/s)
        response = httpx.get(f"{gw.url}/readyz", timeout=5)
        assert response.status_code == 503
        body = response.json()
        assert body["ready"] is False
        assert body["redis"] == "unavailable"
        assert body["policy"]["version"]
        time.sleep(0.4)
    assert time.monotonic() - started > 1.2

    # The gateway never fails a request because of Redis.
    for _ in range(2):
        answer = _chat(gw)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200

    metrics = httpx.get(f"{gw.url}/metrics", timeout=5)
    assert metrics.status_code == 200
    assert "gateway_redis_up 0.0" in metrics.text.splitlines()

    unavailable = gw.wait_for_ops("redis_unavailable")  # ops lines are written by a background thread
    assert len(unavailable) == 1, f"expected one redis_unavailable line per outage, got {len(unavailable)}"
    assert unavailable[0]["level"] == "error"
    assert not gw.ops_records("redis_recovered")


def test_start_up_warns_of_a_cache_salt_keyed_on_nothing_secret(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t117: the Deployment salted vLLM's prefix cache per tenant with no upstream key and no
    GATEWAY_CACHE_SALT_KEY, so the salt was keyed on the model's name, in silence."""
    salted = f"  vllm: {{base_url: {small_upstream.url}, price: {{input: 0, output: 0}}, tier: small, "
    salted += "tenant_cache_salt: true}\n"
    gw = start_gateway(
        tmp_path / "gw",
        policy_text(small_upstream, large_upstream, extra_models=salted),
        env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "GATEWAY_CACHE_SALT_KEY": ""},
        expect_ready=False,
    )
    gw.stop()
    said = "models.vllm.tenant_cache_salt: keyed on the model's name"
    assert f"[gateway] warning: {said}" in gw.stderr_text()  # serve's start-up lines
    assert any(line["detail"].startswith(said) for line in gw.ops_records("policy_warning"))  # the ops log


# ------------------------------------------------------------------------ Redis full


def test_a_full_redis_keeps_the_gateway_ready_and_its_cache_hits_served(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t116: a Redis whose memory is full (``noeviction``) still answers reads, yet it was taken for
    down: /readyz 503 (the shipped readinessProbe then takes every pod out at once), redis_up 0,
    and cache hits lost. Its refused writes are skipped and counted instead."""
    server = start_embedded_redis(tmp_path / "redis")
    policy = policy_text(
        small_upstream, large_upstream, cache="{enabled: true, semantic: {enabled: false}, redis_timeout_ms: 2000}"
    )
    gw = start_gateway(tmp_path / "gw", policy, env={"REDIS_URL": server.url, "TEST_LARGE_KEY": "k"})
    body = {"model": "fast", "messages": [{"role": "user", "content": "kept while full"}]}
    try:
        stored = httpx.post(f"{gw.base_url}/chat/completions", json=body, timeout=10)
        assert stored.status_code == 200 and stored.headers["x-gateway-cache"] == "miss"
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
        for _ in range(3):  # hits, each after writes Redis refused (the new answer's, usage)
            assert _chat(gw).status_code == 200
            hit = httpx.post(f"{gw.base_url}/chat/completions", json=body, timeout=10)
            assert hit.status_code == 200 and hit.headers["x-gateway-cache"] == "exact"
        ready = httpx.get(f"{gw.url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["ready"] is True and ready.json()["redis"] == "full"
        lines = httpx.get(f"{gw.url}/metrics", timeout=5).text.splitlines()
        assert "gateway_redis_up 1.0" in lines
        refused = _metric_lines("\n".join(lines), "gateway_redis_writes_refused_total")
        assert refused and float(refused[0].rsplit(" ", 1)[1]) >= 3, refused
        full = gw.wait_for_ops("redis_full")  # ops lines are written by a background thread
        assert not gw.ops_records("redis_unavailable")
        assert len(full) == 1 and full[0]["level"] == "warning"  # said once in 10 s, not per write
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("maxmemory", 0)
        assert httpx.get(f"{gw.url}/readyz", timeout=5).json()["redis"] == "ok"
    finally:
        gw.stop()
        server.stop()


# --------------------------------------------------------------------------- the CLI


def _check(
    path: Path, env: dict[str, str] | None = None, data_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``gateway check PATH --data-dir DATA_DIR``; by default a data dir that does not exist, so the
    ``.gateway`` of a ``make run`` in the project's folder is never what the file is compared with."""
    child_env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TEST_UNSET_VARIABLE"}
    child_env.update(env or {})
    data = data_dir or path.parent / "no-data-dir"
    return subprocess.run([sys.executable, "-m", "gateway", "check", str(path), "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT, env=child_env)  # fmt: skip


def _in_force(folder: Path, text: str) -> Path:
    """A data dir as ``serve`` leaves it: the policy in force in policy.last-accepted.yaml."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    (data / "policy.last-accepted.yaml").write_text(text)
    return data


def _line_of(text: str, fragment: str) -> int:
    """1-based number of the only line of ``text`` containing ``fragment``."""
    numbers = [i for i, line in enumerate(text.splitlines(), start=1) if fragment in line]
    assert len(numbers) == 1, (fragment, numbers)
    return numbers[0]


def test_cli_check_accepts_a_valid_file(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(policy_text(small_upstream, large_upstream))
    result = _check(path, {"TEST_LARGE_KEY": "x", "TEST_ANTHROPIC_KEY": "y"})
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "fast" in result.stdout and "best" in result.stdout


def test_cli_check_names_field_and_line_of_a_problem(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    text = policy_text(small_upstream, large_upstream).replace(
        "fast: {model: small, fallbacks: [large]}", "fast: {model: small, fallbacks: [no-such-model]}"
    )
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    result = _check(path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = _line_of(text, "fallbacks: [no-such-model]")
    assert f"routes.fast.fallbacks[0] (line {line})" in result.stderr, result.stderr
    assert "no-such-model" in result.stderr


def test_cli_check_names_every_problem_of_every_section_in_one_run(tmp_path: Path) -> None:
    """t200: a bad value elsewhere in a section (or a model, or a route) hid the problems its
    rules would find there until the next run: the shipped file with a bad `retry` and
    semantic cache said only `retry.max_attempts`, then the cutoffs."""
    shipped = (PROJECT_ROOT / "policies.yaml").read_text()
    edits = {
        "max_attempts: 2 ": "max_attempts: 50 ",
        "verify_threshold: 0.993 ": "verify_threshold: 1.993 ",
        "close_similarity: 0.92 ": "close_similarity: -3 ",
        "max_temperature: 0.5 ": "max_temperature: -1 ",
        "threshold: 0.78\n": "threshold: 7.8\n",
        "fallbacks: [large]\n    # p_large": "fallbacks: [larg]\n    # p_large",
        "price: {input: 2.50,": "price: {input: -2.50,",
        "encoding: cl100k_base\n    context_window: ${LARGE": "encoding: cl200k\n    context_window: ${LARGE",
    }
    text = shipped
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    result = _check(path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    named = [
        f"retry.max_attempts (line {_line_of(text, 'max_attempts: 50')}): must be >= 1 and <= 10, got 50",
        f"cache.semantic.verify_threshold (line {_line_of(text, 'verify_threshold: 1.993')}): must be a number "
        "from 0 to 1, got 1.993",
        f"cache.semantic.close_similarity (line {_line_of(text, 'close_similarity: -3')}): must be a number from "
        "0 to 1, got -3",
        f"cache.semantic.max_temperature (line {_line_of(text, 'max_temperature: -1')}): must be >= 0, got -1",
        f"routes.auto.threshold (line {_line_of(text, 'threshold: 7.8')}): must be a number from 0 to 1, got 7.8",
        f"routes.auto.fallbacks[0] (line {_line_of(text, 'fallbacks: [larg]')}): unknown model 'larg'",
        f"models.large.price.input (line {_line_of(text, 'input: -2.50')}): must be a price",
        f"models.large.encoding (line {_line_of(text, 'encoding: cl200k')}): unknown encoding 'cl200k'",
    ]
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert [any(line.startswith(f"  - {said}") for line in problems) for said in named] == [True] * len(named), (
        result.stderr
    )
    assert len(problems) == len(named), result.stderr  # and nothing said of the stand-ins' defaults


def test_cli_check_notes_a_broken_reference_and_refuses_a_yaml_11_number(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t63: ``${NAME:-x`` without its ``}`` passed check with no word and was sent upstream as the
    model's name; ``rpm: 010`` was read as 8 (YAML 1.1's octal)."""
    text = policy_text(small_upstream, large_upstream).replace(
        "upstream_model: claude-sim", "upstream_model: ${CLAUDE_MODEL:-claude-sim"
    )
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    result = _check(path, {"TEST_LARGE_KEY": "x", "TEST_ANTHROPIC_KEY": "y"})
    assert result.returncode == 0, (result.stdout, result.stderr)
    line = _line_of(text, "${CLAUDE_MODEL")
    assert (
        f"note: models.claude.upstream_model (line {line}): `${{CLAUDE_MODEL:-` has no closing `}}`; "
        "the value is used as written"
    ) in result.stdout, result.stdout
    path.write_text(text + "tenants:\n  no: {limits: {rpm: 010}}\n")
    result = _check(path, {"TEST_LARGE_KEY": "x", "TEST_ANTHROPIC_KEY": "y"})
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "tenants.no.limits.rpm" in result.stderr and "without the leading 0" in result.stderr, result.stderr


def test_cli_check_refuses_references_nested_past_the_bound_without_a_traceback(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t164: 500 levels of ``${A:-${A:-...}}`` crashed check with a RecursionError's traceback."""
    nested = "${GATEWAY_TEST_UNSET_VARIABLE:-" * 500 + small_upstream.url + "}" * 500
    text = policy_text(small_upstream, large_upstream).replace(
        f"base_url: {small_upstream.url}", f"base_url: {nested}", 1
    )
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    result = _check(path, {"TEST_LARGE_KEY": "x", "TEST_ANTHROPIC_KEY": "y"})
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = _line_of(text, "${GATEWAY_TEST_UNSET_VARIABLE:-${")
    assert (
        f"  - models.small.base_url (line {line}): `${{...}}` nested more than 16 deep in defaults\n" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_cli_check_notes_an_unset_variable_by_name_and_line(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    text = policy_text(small_upstream, large_upstream).replace(
        f"base_url: {small_upstream.url}", "base_url: ${GATEWAY_TEST_UNSET_VARIABLE}", 1
    )  # the small model's line only (the embedding model shares its server)
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    result = _check(path)
    # A file that is fine is not failed for the environment it was checked in: a note names what serving needs.
    assert result.returncode == 0, (result.stdout, result.stderr)
    line = _line_of(text, "${GATEWAY_TEST_UNSET_VARIABLE}")
    assert f"note: GATEWAY_TEST_UNSET_VARIABLE is not set: models.small.base_url (line {line})" in result.stdout

    # With a default, or with the variable set, the same file is fine.
    with_default = "${GATEWAY_TEST_UNSET_VARIABLE:-http://127.0.0.1:9/v1}"
    path.write_text(text.replace("${GATEWAY_TEST_UNSET_VARIABLE}", with_default))
    assert _check(path).returncode == 0
    path.write_text(text)
    assert _check(path, {"GATEWAY_TEST_UNSET_VARIABLE": small_upstream.url}).returncode == 0


KEYED = "auth:\n  mode: keys\n  key_file: keys.yaml"
TENANTS = "tenants:\n  team-a:\n    limits: {rpm: 600, usd_per_day: 10}\n"


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        pytest.param(
            lambda text: text.replace(TENANTS, ""),
            "`tenants` is missing while the policy in force has tenants (write `tenants: {}` to remove them all)",
            id="tenants-dropped",
        ),
        pytest.param(
            lambda text: text.replace("key_file: keys.yaml", "key_file: key.yaml"),
            "auth.key_file `key.yaml` is missing, empty or has no `keys` list while the policy in force has 2 keys "
            "from `keys.yaml` (write `keys: []` there to remove them all)",
            id="key-file-misspelt",
        ),
        pytest.param(
            lambda text: text.replace("limits: {max_body_bytes: 65536, redis_timeout_ms: 2000}\n", ""),
            "`limits` is missing while the policy in force sets it (write `limits: {}` for the defaults)",
            id="limits-dropped",
        ),
        pytest.param(
            lambda text: text.replace(", redis_timeout_ms: 2000}", "}"),
            "`limits.redis_timeout_ms` is missing while the policy in force sets it to `2000.0`, and left out it "
            "would be `100.0`: write `redis_timeout_ms: 100.0` under `limits` for the default (or `limits: {}` for "
            "all of `limits`'s defaults), or `redis_timeout_ms: 2000.0` to keep it",
            id="limits-setting-left-out",
        ),
        pytest.param(
            lambda text: text.replace(", usd_per_day: 10}", "}"),
            "`tenants.team-a.limits.usd_per_day` is missing while the policy in force sets it to `10.0`, and left out "
            "it would be `null` (no limit): write `usd_per_day: null` under `tenants.team-a.limits` for the default "
            "(or `limits: {}` for all of `tenants.team-a.limits`'s defaults), or `usd_per_day: 10.0` to keep it",
            id="tenant-setting-left-out",
        ),
        pytest.param(
            lambda text: text.replace(TENANTS, "tenants:\n  team-z: {}\n"),
            "`tenants.team-a` is missing while the policy in force sets it, and keys a, b still name it: left out, "
            "no tenant limits apply; write `team-a: {}` under `tenants` to mean that (a tenant no key names may be "
            "left out)",
            id="tenant-left-out-with-its-keys",
        ),
    ],
)
def test_cli_check_refuses_what_a_running_gateway_refuses_by_its_policy_in_force(
    tmp_path: Path,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    edit: Callable[[str], str],
    refusal: str,
) -> None:
    """t94: check said ok to edits the gateway then refused on reload (the tenants section dropped,
    ``auth.key_file`` misspelt while the policy in force has keys, limits left out): it now compares
    the file with the policy in force, as ``keys`` finds it (``--data-dir``), by the gateway's own rules."""
    in_force = policy_text(small_upstream, large_upstream, auth=KEYED) + TENANTS
    keys = [f"  - {{id: {name}, tenant: team-a, hash: '{hash_key(name)}'}}\n" for name in ("a", "b")]
    (tmp_path / "keys.yaml").write_text("keys:\n" + "".join(keys))
    data = _in_force(tmp_path, in_force)
    path = tmp_path / "policies.yaml"
    path.write_text(in_force)
    result = _check(path, data_dir=data)
    assert result.returncode == 0, result.stderr
    kept = data / "policy.last-accepted.yaml"
    assert f"compared with the policy in force at {kept} (version " in result.stdout

    path.write_text(edit(in_force))
    result = _check(path, data_dir=data)
    assert result.returncode == 1, result.stdout
    assert "ok" not in result.stdout
    assert result.stderr.startswith(f"{path}: a running gateway refuses it (the policy it keeps in force: {kept}, ")
    assert result.stderr.splitlines()[1:] == [f"  - {refusal}"]

    # the same file without a policy in force to compare with: ok, and said not compared
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert refusal not in result.stdout + result.stderr


def test_cli_check_reads_the_key_file_in_force_beside_the_policy_file_not_beside_the_candidate(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t134: a candidate staged in another folder (a release folder) was compared with the policy in
    force read with the key file beside the candidate: it found no keys in force, so it passed
    edits the gateway refuses (a tenant its keys name left out, an emptied key file), and gave the
    version in force wrong. The data dir says which policy file is in force; its key file is beside it."""
    in_force = policy_text(small_upstream, large_upstream, auth=KEYED) + TENANTS
    keys = "keys:\n" + "".join(f"  - {{id: {n}, tenant: team-a, hash: '{hash_key(n)}'}}\n" for n in ("a", "b"))
    (tmp_path / "keys.yaml").write_text(keys)
    path = tmp_path / "policies.yaml"
    path.write_text(in_force)
    data = tmp_path / "data"
    data.mkdir()
    keep_policy(data, in_force, path, keys)
    version = re.search(r"ok \(version (\w+)\)", _check(path).stdout)
    assert version is not None
    kept = data / "policy.last-accepted.yaml"

    staged = tmp_path / "release"
    staged.mkdir()
    candidate = staged / "policies.yaml"
    candidate.write_text(in_force.replace("key_file: keys.yaml", f"key_file: {tmp_path / 'keys.yaml'}"))
    result = _check(candidate, data_dir=data)
    assert result.returncode == 0, result.stderr
    assert f"compared with the policy in force at {kept} (version {version[1]})" in result.stdout

    # the candidate's own relative key_file is beside it: here none, so its keys are gone
    candidate.write_text(in_force.replace(TENANTS, "tenants:\n  team-z: {}\n"))
    result = _check(candidate, data_dir=data)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(
        f"{candidate}: a running gateway refuses it (the policy it keeps in force: {kept}, "
    )
    refusal = "auth.key_file `keys.yaml` is missing, empty or has no `keys` list while the policy in force has 2 keys"
    assert refusal in result.stderr

    (staged / "keys.yaml").write_text("")
    candidate.write_text(in_force)
    result = _check(candidate, data_dir=data)
    assert result.returncode == 1, result.stdout
    assert refusal in result.stderr


def test_cli_check_says_in_one_line_that_no_policy_in_force_was_found(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(policy_text(small_upstream, large_upstream))
    result = _check(path, data_dir=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    [said] = [line for line in result.stdout.splitlines() if "not compared" in line]
    kept = tmp_path / "elsewhere" / "policy.last-accepted.yaml"
    assert said.startswith(f"  note: no policy in force at {kept}: not compared with the policy a running gateway")
    assert "give serve's --data-dir" in said and "compared with the policy in force at" not in result.stdout

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "policy.last-accepted.yaml").write_text("version: 1\nmodels: [\n")  # not a policy
    result = _check(path, data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr
    [said] = [line for line in result.stdout.splitlines() if "not compared" in line]
    assert said.startswith(
        f"  note: the policy in force at {tmp_path / 'data' / 'policy.last-accepted.yaml'} cannot be read ("
    )
