"""The request log file of a running gateway: rotated by logrotate, on a disk that is full."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.reporting.aggregate import aggregate_path
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, _worker_pids, policy_text, start_gateway


def _chat(gateway: GatewayProcess, request_id: str) -> bool:
    body = {"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": f"hi {request_id}"}]}
    try:
        # not httpx's default 5 s: one that ran out on a loaded machine was logged by the gateway and not counted here
        answer = httpx.post(
            f"{gateway.base_url}/chat/completions", json=body, headers={"x-request-id": request_id}, timeout=30
        )
    except httpx.HTTPError:  # a gateway the signal ended (its default action, without a handler)
        return False
    return answer.status_code == 200


def _request_ids(path: Path) -> list[str]:
    """Every line must be a whole JSON line: a reopen neither cuts nor splices one."""
    return [msgspec.json.decode(line)["request_id"] for line in path.read_bytes().splitlines()]


def _wait_for(done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.05)
        time.sleep(0.05)


@pytest.mark.parametrize(("server", "workers"), [("uvicorn", 1), ("uvicorn", 2), ("granian", 1)])
def test_sigusr1_after_a_rename_moves_every_worker_to_the_new_file_without_losing_a_line(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
    workers: int,
) -> None:
    """t109: logrotate's create + compress (no delaycompress) gzipped the renamed file while the
    workers still wrote into it (they look at the path once a second), and had no signal to be told.
    Its postrotate sends SIGUSR1 to serve's pid (in --data-dir's serve.lock), which passes it on."""
    policy = policy_text(small_upstream, large_upstream) + "\nrequest_log: {path: requests.jsonl, stdout: false}\n"
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=workers, server=server)
    log, rotated = tmp_path / "requests.jsonl", tmp_path / "requests.jsonl.1"
    answered: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # lines being written all through the rotation
        n = 0
        while not stop.is_set():
            request_id = f"during-{n}"
            if _chat(gateway, request_id):
                answered.append(request_id)
            n += 1

    sender = threading.Thread(target=traffic)
    try:
        sender.start()
        _wait_for(lambda: len(answered) >= 20)
        log.rename(rotated)
        log.touch()  # logrotate's create
        serve_pid = int((tmp_path / "data" / "serve.lock").read_text())
        assert serve_pid == gateway.process.pid
        os.kill(serve_pid, signal.SIGUSR1)
        _wait_for(lambda: len(gateway.ops_records("request_log_reopened")) == workers)
        stop.set()
        sender.join()
        after = [f"after-{n}" for n in range(20)]
        assert all(_chat(gateway, request_id) for request_id in after)
        assert gateway.process.poll() is None
    finally:
        stop.set()
        sender.join()
        gateway.stop()
    assert gateway.process.returncode == 0, gateway.stderr_text()[-3000:]
    reopened = gateway.ops_records("request_log_reopened")
    assert {record["path"] for record in reopened} == {str(log)}
    old, new = _request_ids(rotated), _request_ids(log)
    assert sorted(old + new) == sorted(answered + after)  # each line once, in one file or the other
    assert set(after) <= set(new)  # once every worker said it reopened, lines go to the new file


def _lines_lost(gateway: GatewayProcess) -> float:
    found = re.search(r"^gateway_request_log_lines_lost_total (\S+)$", httpx.get(f"{gateway.url}/metrics").text, re.M)
    assert found is not None
    return float(found.group(1))


@pytest.mark.parametrize("workers", [1, 2])
def test_lines_a_full_disk_refuses_are_counted_in_the_metrics(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    workers: int,
) -> None:
    """t109: lost lines were said only on stderr, once a minute per worker, where no alert looks;
    /metrics counts them, summed across the workers like the other counters."""
    policy = policy_text(small_upstream, large_upstream) + "\nrequest_log: {path: /dev/full, stdout: false}\n"
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=workers)
    try:
        assert _lines_lost(gateway) == 0
        assert all(_chat(gateway, f"lost-{n}") for n in range(12))  # a new connection each: both workers take some
        _wait_for(lambda: _lines_lost(gateway) == 12)
        assert {_lines_lost(gateway) for _ in range(6)} == {12}  # whichever worker answers
    finally:
        gateway.stop()


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_a_dead_workers_replacement_keeps_the_request_log_serve_started_with(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
) -> None:
    """t149: a replacement built its request log from the policy file as it was when it started,
    so after an edit of ``request_log.path`` it wrote to the new file and its sibling to the
    old one: half the lines went missing from the file `gateway report` and log shippers read.
    Until a restart every worker keeps what serve started with, and the replacement says so."""
    policy = policy_text(small_upstream, large_upstream)
    gateway = start_gateway(
        tmp_path,
        # the variable the shipped policies.yaml reads: serve hands the workers its settings by another
        policy + "\nrequest_log: {path: '${GATEWAY_REQUEST_LOG}', stdout: false}\n",
        env={"REDIS_URL": redis_server.url, "GATEWAY_REQUEST_LOG": "requests.jsonl"},
        workers=2,
        server=server,
    )
    try:
        first, second = sorted(_worker_pids(gateway.process.pid))
        edited = tmp_path / "policies.yaml.new"
        edited.write_text(policy + "\nrequest_log: {path: moved.jsonl, stdout: true}\n")
        os.replace(edited, gateway.policy_path)
        _wait_for(lambda: len(gateway.ops_records("policy_needs_restart")) == 2)  # each worker read the edit
        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: len(gateway.ops_records("policy_loaded")) == 3, timeout_s=60)
        [replacement] = set(_worker_pids(gateway.process.pid)) - {second}
        sent: list[str] = []

        def replacement_answered() -> bool:  # a new connection each: both workers take some
            sent.append(f"after-{len(sent)}")
            assert _chat(gateway, sent[-1])
            # its histograms' file: written at its first answer (its counters' at its start)
            return (tmp_path / "data" / "metrics" / f"histogram_{replacement}.db").exists()

        _wait_for(replacement_answered, timeout_s=60)
        sent += [f"more-{n}" for n in range(8)]
        assert all(_chat(gateway, request_id) for request_id in sent[-8:])
        _wait_for(lambda: len((tmp_path / "requests.jsonl").read_bytes().splitlines()) >= len(sent))
        assert len(gateway.ops_records("policy_needs_restart")) == 3  # the replacement too, at its start
    finally:
        gateway.stop()
    assert set(sent) <= set(_request_ids(tmp_path / "requests.jsonl"))
    assert not (tmp_path / "moved.jsonl").exists()
    assert '"request_id"' not in gateway.log_path.read_text()  # stdout: false, as serve started


@pytest.mark.parametrize("workers", [1, 2])
def test_a_gateway_started_on_a_log_that_ends_mid_line_writes_its_first_request_on_a_line_of_its_own(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    workers: int,
) -> None:
    """t175: a log left ending mid-line (a host crash, a worker killed in a write) glued the next
    request's line onto the fragment, and `gateway report` dropped that request as malformed."""
    log = tmp_path / "requests.jsonl"
    log.write_bytes(b'{"request_id":"whole"}\n{"request_id":"PARTIAL","key_id":"k1","decision":"fi')
    policy = policy_text(small_upstream, large_upstream) + "\nrequest_log: {path: requests.jsonl, stdout: false}\n"
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=workers)
    try:
        assert _chat(gateway, "after-torn")
        _wait_for(lambda: log.read_bytes().endswith(b"\n"))
    finally:
        gateway.stop()
    *_, fragment, line = log.read_bytes().splitlines()
    assert fragment.endswith(b'"decision":"fi')
    assert msgspec.json.decode(line)["request_id"] == "after-torn"
    counted = aggregate_path(str(log))
    assert (counted.requests, counted.malformed) == (1, 1)  # the fragment alone is malformed
