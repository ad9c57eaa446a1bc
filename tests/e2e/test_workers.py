"""Several worker processes on one host behave as one gateway: metrics add up across workers."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.auth import hash_key
from gateway.services.redis_server import EmbeddedRedis
from gateway.simulated import SimulatedUpstream
from tests.gateway_process import GatewayProcess, _worker_pids, free_port, policy_text, start_gateway


def _requests_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^gateway_requests_total\{[^}]*route="fast"[^}]*\} (\S+)$', text, re.M))


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_metrics_are_whole_across_two_workers(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
) -> None:
    """t122: granian forks its workers from serve, which had imported prometheus_client before it
    set the metrics folder: no worker wrote its file, and each answered /metrics with its own."""
    gateway = start_gateway(
        tmp_path,
        policy_text(small_upstream, large_upstream),
        env={"REDIS_URL": redis_server.url},
        workers=2,
        server=server,
    )
    try:
        assert len(_worker_pids(gateway.process.pid)) == 2
        for i in range(30):  # a new connection each time, so both workers take requests
            body = {"model": "fast", "messages": [{"role": "user", "content": f"m{i}"}]}
            httpx.post(f"{gateway.base_url}/chat/completions", json=body).raise_for_status()
        # both workers took requests: each keeps its own counter file
        assert len(list((tmp_path / "data" / "metrics").glob("counter_*.db"))) == 2
        # every scrape, whichever worker answers it, sees all 30 requests
        totals = {_requests_total(httpx.get(f"{gateway.url}/metrics").text) for _ in range(6)}
        assert totals == {30.0}
        assert "gateway_redis_up 1.0" in httpx.get(f"{gateway.url}/metrics").text
    finally:
        gateway.stop()


def _families(text: str) -> tuple[list[str], set[str]]:
    """A scrape's HELP and TYPE lines in order, and its label-less samples by name."""
    described = [line for line in text.splitlines() if line.startswith(("# HELP ", "# TYPE "))]
    return described, set(re.findall(r"^(gateway_\w+) \S+$", text, re.M))


def test_two_workers_export_the_families_one_worker_does(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t175: prometheus_client's multiprocess scrape leaves out a family none of its files has a
    sample of (no feedback or shadow judgement yet): absent() alerts and dashboards then went by
    the worker count."""
    policy = policy_text(small_upstream, large_upstream)
    scraped: dict[int, tuple[list[str], set[str]]] = {}
    for workers in (1, 2):
        gateway = start_gateway(tmp_path / str(workers), policy, env={"REDIS_URL": redis_server.url}, workers=workers)
        try:
            scraped[workers] = _families(httpx.get(f"{gateway.url}/metrics").text)
        finally:
            gateway.stop()
    assert "# TYPE gateway_router_feedback_total counter" in scraped[1][0]
    assert "gateway_redis_timeouts_total" in scraped[1][1]
    assert scraped[2] == scraped[1]


def _policy_info(text: str) -> set[str]:
    return set(re.findall(r"^gateway_policy_info\{.*\} \S+$", text, re.M))


@pytest.mark.parametrize("workers", [1, 2])
def test_policy_info_shows_only_the_versions_in_force(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    workers: int,
) -> None:
    """t63: gateway_policy_info kept a series (at 0) for every version ever in force, and every
    edit or `keys new` makes one; with several workers (prometheus_client's multiprocess files)
    as with one, a scrape shows the versions live workers have in force, and no other."""
    policy = policy_text(small_upstream, large_upstream)
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=workers)
    try:
        for edit in range(3):
            text = f"{policy}\n# edit {edit}\n"
            gateway.policy_path.write_text(text)
            version = hashlib.sha256(text.encode()).hexdigest()[:12]
            wanted = {f'gateway_policy_info{{version="{version}"}} 1.0'}
            deadline = time.monotonic() + 30  # each worker reloads on its own time
            seen = _policy_info(httpx.get(f"{gateway.url}/metrics").text)
            while seen != wanted and time.monotonic() < deadline:
                time.sleep(0.1)
                seen = _policy_info(httpx.get(f"{gateway.url}/metrics").text)
            assert seen == wanted
    finally:
        gateway.stop()


def test_sighup_to_the_main_process_reloads_every_worker_in_place(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    import os
    import signal
    import time

    policy = policy_text(small_upstream, large_upstream)
    gateway = start_gateway(
        tmp_path, policy, env={"REDIS_URL": redis_server.url, "GATEWAY_WATCH_POLICIES": "0"}, workers=2
    )
    try:
        workers = sorted(_worker_pids(gateway.process.pid))
        old = httpx.get(f"{gateway.url}/readyz").json()["policy"]["version"]
        os.kill(gateway.process.pid, signal.SIGHUP)  # t166: on the file as it is, each worker says the signal came
        unchanged: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sorted(unchanged) != workers:
            unchanged = [record["pid"] for record in gateway.ops_records("policy_unchanged")]
            time.sleep(0.05)
        assert sorted(unchanged) == workers
        gateway.policy_path.write_text(
            policy.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}")
        )
        os.kill(gateway.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while time.monotonic() < deadline and seen != {"large"}:
            seen = {httpx.post(f"{gateway.base_url}/chat/completions",
                               json={"model": "fast", "messages": [{"role": "user", "content": f"x{i}"}]}
                               ).headers["x-gateway-model"] for i in range(8)}  # fmt: skip
            time.sleep(0.2)
        assert seen == {"large"}  # every worker answers with the new policy
        assert sorted(_worker_pids(gateway.process.pid)) == workers  # reloaded in place, not restarted
        assert httpx.get(f"{gateway.url}/readyz").json()["policy"]["version"] != old
        said: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sorted(said) != workers:  # t113: each line says whose it is
            said = [record["pid"] for record in gateway.ops_records("policy_reloaded")]
            time.sleep(0.05)
        assert sorted(said) == workers
        # an invalid policy on SIGHUP is rejected by each worker; nobody crashes
        gateway.policy_path.write_text("pair: [")
        os.kill(gateway.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        errors: list[object] = [None]
        while time.monotonic() < deadline and not all(errors):  # each worker reloads on its own time
            errors = [httpx.get(f"{gateway.url}/readyz").json()["policy"]["last_reload_error"] for _ in range(8)]
            time.sleep(0.2)
        assert all(errors)  # whichever worker answers, it kept the old policy and says why
        assert gateway.process.poll() is None and sorted(_worker_pids(gateway.process.pid)) == workers
    finally:
        gateway.stop()


def test_a_policy_edit_is_picked_up_by_two_gateway_processes(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """Two gateways (as behind a load balancer) serve one policies.yaml, as from one ConfigMap volume."""
    import time

    policy = policy_text(small_upstream, large_upstream)
    first = start_gateway(tmp_path / "a", policy, env={"REDIS_URL": redis_server.url})
    second = start_gateway(tmp_path / "b", "", env={"REDIS_URL": redis_server.url}, policy_path=first.policy_path)
    try:
        first.policy_path.write_text(policy.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}"))
        deadline = time.monotonic() + 30
        models: set[str] = set()
        while time.monotonic() < deadline and models != {"large"}:
            time.sleep(0.2)
            models = {httpx.post(f"{g.base_url}/chat/completions",
                                 json={"model": "fast", "messages": [{"role": "user", "content": "edit"}]}
                                 ).headers["x-gateway-model"] for g in (first, second)}  # fmt: skip
        assert models == {"large"}
        versions = {httpx.get(f"{g.url}/readyz").json()["policy"]["version"] for g in (first, second)}
        assert len(versions) == 1
    finally:
        first.stop()
        second.stop()


def test_workers_run_on_uvloop_and_say_so(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream), env={"REDIS_URL": redis_server.url})
    try:
        (started,) = gateway.wait_for_ops("event_loop")  # written by the worker's log thread, maybe after /readyz
        assert started["implementation"] == "uvloop.Loop"  # a hard dependency, not an accident of extras
    finally:
        gateway.stop()


def test_each_worker_listens_on_its_own_socket_and_a_dead_one_is_replaced_on_it(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """uvicorn's workers each listen on their own SO_REUSEPORT socket (with one shared socket,
    the benchmark's 8 keep-alive connections all went to one worker: make bench --workers 2
    shows the spread). Both take connections, and a killed worker's replacement listens on
    the same port again: every request is answered."""
    gateway = start_gateway(
        tmp_path, policy_text(small_upstream, large_upstream), env={"REDIS_URL": redis_server.url}, workers=2
    )
    body = {"model": "fast", "messages": [{"role": "user", "content": "spread"}]}

    def one_connection_each(count: int) -> None:
        clients = [httpx.Client(base_url=gateway.base_url, timeout=10) for _ in range(count)]
        try:
            with ThreadPoolExecutor(count) as pool:  # all connected at once
                for answer in pool.map(lambda c: c.post("/chat/completions", json=body), clients):
                    answer.raise_for_status()
        finally:
            for client in clients:
                client.close()

    try:
        one_connection_each(16)
        assert len(list((tmp_path / "data" / "metrics").glob("counter_*.db"))) == 2  # both workers answered
        first, _ = sorted(_worker_pids(gateway.process.pid))
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = _worker_pids(gateway.process.pid)
            if len(workers) == 2 and first not in workers:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the killed worker was not replaced")
        one_connection_each(16)  # the replacement may still be starting: the live worker answers meanwhile
    finally:
        gateway.stop()


def test_new_connections_go_to_the_live_worker_while_a_dead_ones_replacement_starts(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t97: the main process kept a killed worker's listening socket open for its replacement,
    so the kernel went on hashing about half the new connections to a socket nobody accepted
    on; they waited until the replacement had loaded its models (1.6-9.3 s), and probes with
    a short timeout failed while the other worker was idle. The replacement is held in its
    start here for as long as the test needs, not raced: the policy file is a FIFO, which it
    reads before it listens, and it gets the policy only once the connections are answered.
    Done twice: the second time the first replacement is the one live worker, on the same port."""
    policy = policy_text(small_upstream, large_upstream)
    env = {"REDIS_URL": redis_server.url, "GATEWAY_WATCH_POLICIES": "0"}  # only a starting worker reads the file
    gateway = start_gateway(tmp_path, policy, env=env, workers=2)

    def healthz(timeout_s: float) -> int | str:
        try:
            return httpx.get(f"{gateway.url}/healthz", timeout=timeout_s).status_code  # a new connection each
        except httpx.HTTPError as exc:
            return type(exc).__name__

    try:
        with ThreadPoolExecutor(16) as pool:  # both workers started: each accepts its share
            assert set(pool.map(healthz, [60] * 16)) == {200}
        for victim in sorted(_worker_pids(gateway.process.pid)):  # the second: the first one's sibling
            fifo = tmp_path / "policies.fifo"
            os.mkfifo(fifo)
            os.replace(fifo, gateway.policy_path)
            os.kill(victim, signal.SIGKILL)
            writer = _opened_by_a_reader(gateway.policy_path)  # the replacement has started, and waits on it
            try:
                with ThreadPoolExecutor(20) as pool:  # all at once
                    # none waits for the replacement, held until they are answered: 10 s, not 2 s, which
                    # 20 new connections to one worker of a loaded machine could take
                    answers = list(pool.map(healthz, [10] * 20))
                assert answers == [200] * 20, gateway.stderr_text()[-2000:]
            finally:
                kept = tmp_path / "policies.yaml.new"
                kept.write_text(policy)
                os.replace(kept, gateway.policy_path)
                os.set_blocking(writer, True)
                os.write(writer, policy.encode())
                os.close(writer)
            _until(lambda: _listeners(gateway.port) == 2)  # the replacement listens
            assert victim not in _worker_pids(gateway.process.pid)
        assert {healthz(10) for _ in range(8)} == {200}
    finally:
        gateway.stop()


def _opened_by_a_reader(fifo: Path) -> int:
    """A descriptor writing to ``fifo``, once a process has it open to read (a generous bound)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port``; a worker's listens once it has started."""
    local = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1] == local and line.split()[3] == "0A")


def _until(done: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s  # a generous bound, not a measure
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_port_in_use_is_a_failed_start_with_several_workers_too(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    policy = tmp_path / "policies.yaml"
    policy.write_text(policy_text(small_upstream, large_upstream))
    for reuse_port in (False, True):  # True: as another gateway's workers hold it (SO_REUSEPORT)
        with socket.socket() as taken:
            if reuse_port:
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = subprocess.run(
                [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--port", str(port),
                 "--workers", "2", "--data-dir", str(tmp_path / "data")],
                env={**os.environ, "REDIS_URL": redis_server.url}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        assert done.returncode != 0, done.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
        assert "serving" not in done.stderr  # t63: said before the bind


def _shadowing(folder: Path) -> Path:
    """``folder``, made to hold a ``litestar`` package that raises on import (a broken dependency,
    which only the workers import); put first on PYTHONPATH."""
    (folder / "litestar").mkdir(parents=True)
    (folder / "litestar" / "__init__.py").write_text("raise RuntimeError('a broken dependency')\n")
    return folder


def _pythonpath_with(folder: Path) -> str:
    return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)


def test_workers_that_cannot_import_the_app_stop_the_gateway(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t117: a worker that died before it started, with another exit code than uvicorn's start-up
    failure (3), was replaced at once and endlessly: 15 tracebacks in 20 s, never an exit, and a
    Kubernetes pod burning its CPU until its probe gave up. Before the gateway has served, a
    worker's death ends it (exit 3), saying which worker and how it ended."""
    policy = tmp_path / "policies.yaml"
    policy.write_text(policy_text(small_upstream, large_upstream))
    env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONPATH": _pythonpath_with(_shadowing(tmp_path / "lib"))}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--port", str(free_port()),
         "--workers", "2", "--data-dir", str(tmp_path / "data")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    assert time.monotonic() - started < 30  # a generous bound: the workers fail within seconds
    assert re.search(r"worker \d+ failed to start \(exit code 1\); stopping", done.stderr), done.stderr[-3000:]
    assert 1 <= done.stderr.count("RuntimeError: a broken dependency") <= 2  # each worker once at most


_SLOW_IMPORT = """\
import os, sys, time

# Hold the GIL for 8 s, as importing and loading models on a busy host can, so that the worker's
# health-check thread cannot answer uvicorn's 5 s ping; then load the real package.
sys.setswitchinterval(60)
_until = time.monotonic() + 8
while time.monotonic() < _until:
    pass
sys.setswitchinterval(0.005)
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
del sys.modules["litestar"]
import litestar as _real  # noqa: E402

sys.modules["litestar"] = _real
"""


def test_workers_slow_to_start_are_waited_for_not_killed_as_hung(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t188: uvicorn's supervisor takes a worker that leaves its 5 s health check unanswered for
    hung and kills it; a worker still importing the app on a loaded CI box was killed so, and the
    gateway stopped (exit 3) as one that could not start. A worker not yet started has a minute."""
    lib = tmp_path / "lib"
    (lib / "litestar").mkdir(parents=True)
    (lib / "litestar" / "__init__.py").write_text(_SLOW_IMPORT)
    env = {"REDIS_URL": redis_server.url, "PYTHONPATH": _pythonpath_with(lib)}
    # its 8 s, then two workers' imports on a loaded machine: more than start_gateway's usual minute
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream), env=env, workers=2, timeout_s=120)
    try:
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
        assert "failed to start" not in gateway.stderr_text() and "died" not in gateway.stderr_text()
    finally:
        gateway.stop()


def test_replacements_that_cannot_start_stop_the_gateway_after_three_in_a_row(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t117: a killed worker's replacements that all die before they start (a dependency broken
    on disk since the gateway started) stop the gateway after three in a row (exit 3), rather
    than being replaced for ever; the killed one's line says the signal."""
    lib = tmp_path / "lib"
    lib.mkdir()
    env = {"REDIS_URL": redis_server.url, "PYTHONPATH": _pythonpath_with(lib)}
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream), env=env, workers=2)
    try:

        def healthz(_: int) -> int:
            return httpx.get(f"{gateway.url}/healthz", timeout=60).status_code  # a new connection each

        with ThreadPoolExecutor(16) as pool:  # all at once: both workers have started
            assert set(pool.map(healthz, range(16))) == {200}
        # and the main process, which looks twice a second, has seen them started (it says nothing to
        # wait for: 1 s was short on a loaded machine, and the killed one then counted as a failed start)
        time.sleep(3.0)
        first, _ = sorted(_worker_pids(gateway.process.pid))
        _shadowing(lib)
        os.kill(first, signal.SIGKILL)
        gateway.process.wait(60)  # a generous bound: three starts that fail within seconds each
        err = gateway.stderr_text()
        assert gateway.process.returncode == 3, err[-3000:]
        assert f"worker {first} died (killed by SIGKILL); starting another\n" in err, err[-3000:]
        assert re.search(r"worker \d+ failed to start \(exit code 1\), 3 in a row; stopping", err), err[-3000:]
        assert err.count("RuntimeError: a broken dependency") == 3
        assert re.search(r"died before it started \(exit code 1\); starting another in [\d.]+s", err)  # a backoff
    finally:
        gateway.stop()


@pytest.mark.parametrize("port", ["70000", "-5"])
def test_a_port_out_of_range_is_refused_before_anything_starts(tmp_path: Path, port: str) -> None:
    """t69: --port 70000 served on 4464 (getaddrinfo keeps the low 16 bits), or, with two
    workers, ended in bind's OverflowError traceback; -5 gave a getaddrinfo error."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--port", port, "--workers", "2",
         "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": ""}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--port: must be a port from 0 to 65535, got {port}" in done.stderr
    assert "SIMULATED" not in done.stderr and "Traceback" not in done.stderr  # refused before the simulators


@pytest.mark.parametrize("host", ["999.1.1.1", "192.0.2.1"])
def test_a_host_it_cannot_listen_on_is_refused_before_anything_starts(tmp_path: Path, host: str) -> None:
    """t134: a host that does not resolve, or is no address of this machine, was found out once
    everything was loaded: `ERROR: [Errno -2] Name or service not known`, exit 3."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--host", host, "--allow-no-auth",
         "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": ""}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"argument --host: cannot listen on '{host}'" in done.stderr, done.stderr[-2000:]
    assert "SIMULATED" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path, workers: str) -> None:
    """t146: the private Redis and the simulated upstreams were started, then the server's bind
    failed (uvicorn's `[Errno 98] address already in use`), exit 3; a --host it cannot listen on
    was refused at once, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--port", str(port),
             "--workers", workers, "--data-dir", str(tmp_path / "data")],
            env={**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": "", "REDIS_URL": ""},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr, done.stderr
    assert "SIMULATED" not in done.stderr and "Redis" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0", "-1", "1e9", "1e-9", "0.5", " 5 ", "1_0", "1e1"])
def test_a_head_timeout_it_cannot_use_is_refused_before_anything_starts(tmp_path: Path, value: str) -> None:
    """t146: GATEWAY_HEAD_TIMEOUT_S=abc ended in a traceback; nan started a gateway whose every
    connection failed; 0 or less closed connections before they were read. t159: so did 1e-9,
    taken as above 0; and `` 5 `` or ``1_0``, which float() reads, were taken as numbers."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": "", "REDIS_URL": "",
             "GATEWAY_HEAD_TIMEOUT_S": value},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    said = f"GATEWAY_HEAD_TIMEOUT_S: must be a plain number of seconds from 1 to 3600 (15, 2.5), got {value!r}"
    assert said in done.stderr, done.stderr[-2000:]
    assert "SIMULATED" not in done.stderr and "Redis" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "size", ["0", "0mb", "-1", "1.5gb", "99999999999999999999gb", "17179869184gb", "9223372036854775808"]
)
def test_a_redis_maxmemory_that_bounds_nothing_is_refused_before_anything_starts(tmp_path: Path, size: str) -> None:
    """t146: `--redis-maxmemory 0` was written as `maxmemory 0`, which Redis reads as no bound.
    t159: a size past 2^63 bytes passed, and Redis refused to start or, at 2^64 (``17179869184gb``),
    wrapped it round to 0: no bound."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--redis-maxmemory", size,
         "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": "", "REDIS_URL": ""},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    said = (
        "argument --redis-maxmemory: must be a size above 0 and below 8 EiB (2^63 bytes, Redis's bound) "
        f"such as 256mb or 2gb, got {size!r}"
    )
    assert said in done.stderr, done.stderr[-2000:]
    assert "SIMULATED" not in done.stderr and "Traceback" not in done.stderr


def test_unset_model_urls_point_to_simulate_missing_and_other_problems_do_not(tmp_path: Path) -> None:
    """t166: the shipped policy without SMALL_MODEL_URL and LARGE_MODEL_URL listed them unset, exit 2,
    with no word of --simulate-missing, which `make run` passes."""
    shipped = (Path(__file__).resolve().parents[2] / "policies.yaml").read_text()
    hint = "--simulate-missing (what `make run` passes) starts simulated upstreams"
    env = {name: value for name, value in os.environ.items() if name not in ("SMALL_MODEL_URL", "LARGE_MODEL_URL")}
    env["REDIS_URL"] = "redis://127.0.0.1:1"
    for name, text, hinted in (
        ("shipped.yaml", shipped, True),
        ("typo.yaml", shipped.replace("pair:", "pairs:", 1), False),  # --simulate-missing would not start it
    ):
        policy = tmp_path / name
        policy.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--port", "0",
             "--data-dir", str(tmp_path / "data")],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        assert "environment variable SMALL_MODEL_URL is not set" in done.stderr, done.stderr
        assert (hint in done.stderr) is hinted, done.stderr


def test_a_data_dir_the_private_redis_cannot_use_is_a_clear_line_and_exit_2(tmp_path: Path) -> None:
    """t134: a --data-dir that is a regular file (or in /proc) ended in mkdir's traceback, exit 1."""
    (tmp_path / "a-file").write_text("")
    for data_dir, said in ((tmp_path / "a-file", "Not a directory"), (Path("/proc/gateway-t134"), "No such file")):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--data-dir", str(data_dir)],
            env={**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": "", "REDIS_URL": ""},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        assert "the private Redis did not start: its folder" in done.stderr and said in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "serving" not in done.stderr


def test_a_bind_overflow_is_a_cannot_listen_line(capsys: pytest.CaptureFixture[str]) -> None:
    """t69: bind raises OverflowError, not OSError, for a port past 65535: a traceback escaped."""
    from gateway.cli.serve import _bound

    with pytest.raises(SystemExit) as stopped:
        _bound(socket.AF_INET, "127.0.0.1", 70000, reuse_port=False)
    assert stopped.value.code == 3
    assert "cannot listen on 127.0.0.1:70000" in capsys.readouterr().err


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_serve_says_it_serves_only_once_listening(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
) -> None:
    """t63: "serving ... at http://127.0.0.1:PORT" came before the bind, so a port in use showed
    the banner, then the bind's error and exit 3. Said now once the port accepts connections."""
    policy = tmp_path / "policies.yaml"
    policy.write_text(policy_text(small_upstream, large_upstream))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--port", str(port),
             "--server", server, "--data-dir", str(tmp_path / "taken")],
            env={**os.environ, "REDIS_URL": redis_server.url}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]  # t146: refused before anything starts, not exit 3
    assert "serving" not in done.stderr and "Traceback" not in done.stderr
    assert "address already in use" in done.stderr.lower()
    gateway = start_gateway(tmp_path / "free", policy.read_text(), env={"REDIS_URL": redis_server.url}, server=server)
    try:
        banner = f"serving the OpenAI and Anthropic APIs at http://127.0.0.1:{gateway.port}/v1"
        deadline = time.monotonic() + 30  # the banner's thread may write it after the first answer
        while banner not in gateway.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert banner in gateway.stderr_text()
    finally:
        gateway.stop()


@pytest.mark.parametrize(("server", "workers"), [("uvicorn", 1), ("uvicorn", 2), ("granian", 1)])
def test_port_zero_serves_on_the_port_the_os_chose_and_says_which(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
    workers: int,
) -> None:
    """t71: ``--port 0`` said it served at ``http://127.0.0.1:0/v1``, so the port the OS chose
    was shown nowhere. The banner names the port bound, and every worker serves on that one."""
    policy = tmp_path / "policies.yaml"
    policy.write_text(policy_text(small_upstream, large_upstream))
    err_path = tmp_path / "gateway.err"
    with err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--port", "0", "--server", server,
             "--workers", str(workers), "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, "REDIS_URL": redis_server.url},
        )  # fmt: skip
    try:
        found = _banner(process, err_path, r"serving the OpenAI and Anthropic APIs at http://127\.0\.0\.1:(\d+)/v1")
        port = int(found.group(1))
        assert port != 0
        body = {"model": "fast", "messages": [{"role": "user", "content": "which port?"}]}
        with ThreadPoolExecutor(8) as pool:  # connections spread over the workers' sockets
            answers = list(
                pool.map(
                    lambda _: httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30),
                    range(16),
                )
            )
        assert [answer.status_code for answer in answers] == [200] * 16
        if workers > 1:  # each worker answered on that port
            assert len(list((tmp_path / "data" / "metrics").glob("counter_*.db"))) == workers
    finally:
        _interrupt(process)


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_a_worker_replaced_while_the_file_is_broken_starts_on_the_policy_in_force(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
) -> None:
    """A worker dies while ops have a broken edit on disk, and reloads are asked while its
    replacement loads its models. The replacement must neither die of a SIGHUP that comes
    before its handler is in place nor fail to start on the broken file (the server would
    then stop the whole gateway): it starts on the policy its siblings keep in force."""
    policy = policy_text(small_upstream, large_upstream)
    env = {"REDIS_URL": redis_server.url, "GATEWAY_WATCH_POLICIES": "0"}
    gateway = start_gateway(tmp_path, policy, env=env, workers=2, server=server)
    body = {"model": "fast", "messages": [{"role": "user", "content": "which model?"}]}
    try:
        first, second = sorted(_worker_pids(gateway.process.pid))
        gateway.policy_path.write_text("pair: [")
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and b'"reason":"start-up"' not in gateway.err_path.read_bytes():
            os.kill(gateway.process.pid, signal.SIGHUP)  # to every worker, the one starting too
            time.sleep(0.1)
        time.sleep(1.0)  # the last SIGHUPs reach the replacement once its handler is in place
        workers = _worker_pids(gateway.process.pid)
        assert gateway.process.poll() is None, gateway.err_path.read_text()[-3000:]
        assert len(workers) == 2 and second in workers and first not in workers, gateway.err_path.read_text()[-3000:]
        assert gateway.err_path.read_text().count("died") <= 1  # the killed one; its replacement lives
        # every worker answers with the policy in force, and says that the file was rejected
        for _ in range(16):  # a new connection each time: both workers answer
            answer = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10)
            assert answer.status_code == 200 and answer.headers["x-gateway-model"] == "small"
            assert httpx.get(f"{gateway.url}/readyz").json()["policy"]["last_reload_error"]
        # the file fixed (with an edit): both move to it on the next reload
        gateway.policy_path.write_text(
            policy.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}")
        )
        os.kill(gateway.process.pid, signal.SIGHUP)
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and seen != {"large"}:
            seen = {httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10).headers["x-gateway-model"]
                    for _ in range(8)}  # fmt: skip
            time.sleep(0.2)
        assert seen == {"large"}
    finally:
        gateway.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_during_start_up_is_never_fatal(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    workers: int,
) -> None:
    """A reload asked while the gateway starts (a config tool that edits and signals at once)
    reaches processes that have no handler yet; SIGHUP's default action would end them. The
    edit made meanwhile is in force once the gateway is up."""
    policy = policy_text(small_upstream, large_upstream)
    path = tmp_path / "policies.yaml"
    path.write_text(policy)
    port = free_port()
    with (tmp_path / "gateway.err").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(path), "--port", str(port),
             "--data-dir", str(tmp_path / "data"), "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
            env={**os.environ, "REDIS_URL": redis_server.url, "GATEWAY_WATCH_POLICIES": "0"},
        )  # fmt: skip
    try:
        # from the moment serve runs (after Python's start and the CLI's imports, ~0.4 s)
        deadline = time.monotonic() + 30
        while not _ignores_sighup(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.err").read_text()[
                -3000:
            ]
            time.sleep(0.01)
        # written whole, as config tools do (a start that reads a file mid-write fails, as it should)
        edited = tmp_path / "policies.yaml.new"
        edited.write_text(policy.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}"))
        os.replace(edited, path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # an edit, and reloads asked while it starts
            os.kill(process.pid, signal.SIGHUP)
            assert process.poll() is None, (tmp_path / "gateway.err").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        body = {"model": "fast", "messages": [{"role": "user", "content": "after start-up"}]}
        models: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and models != {"large"}:  # a reload may still be settling
            models = {httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10).headers[
                "x-gateway-model"] for _ in range(8)}  # fmt: skip
            time.sleep(0.2)
        assert models == {"large"}
        assert process.poll() is None, (tmp_path / "gateway.err").read_text()[-3000:]
        assert b"died" not in (tmp_path / "gateway.err").read_bytes()
    finally:
        _interrupt(process)


def _interrupt(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C a gateway started by a test, killed if it has not stopped within 30 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _ignores_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_two_workers_sharing_one_stdout_pipe_never_splice_lines() -> None:
    """Only pipe writes of PIPE_BUF bytes or less are atomic: two workers writing batches to
    one stdout that is read slowly (a log shipper behind) must still leave whole lines."""
    read_end, write_end = os.pipe()
    writer = (
        "import sys; from gateway.accounting.request_log import RequestLogWriter;"
        "w = RequestLogWriter(stdout=True, flush_every_s=0.001);"
        '[w.write(\'{"worker": %s, "n": %d, "pad": "%s"}\' % (sys.argv[1], n, \'x\' * 900)) for n in range(600)];'
        "w.close()"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", writer, str(i)], stdout=write_end, cwd=Path(__file__).parents[2])
        for i in range(2)
    ]
    os.close(write_end)
    time.sleep(0.5)  # the reader is behind: the pipe fills, and writes block part-way
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().splitlines()
    assert all(worker.wait(timeout=30) == 0 for worker in workers)
    decoded = [msgspec.json.decode(line) for line in lines]
    assert sorted((d["worker"], d["n"]) for d in decoded) == [(w, n) for w in range(2) for n in range(600)]


def test_workers_agree_on_a_key_file_change_while_a_policy_edit_is_rejected(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t63: a key revoked while policies.yaml holds a rejected edit is refused by every worker, and
    by a worker started after it too (which starts on the policy kept, with the key file as it is)."""
    admin = f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    auth = f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys:\n{admin}"
    policy = policy_text(small_upstream, large_upstream, auth=auth)
    (tmp_path / "keys.yaml").write_text(f'keys:\n  - {{id: leaving, tenant: t, hash: "{hash_key("sk-leaving")}"}}\n')
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=2)
    body = {"model": "fast", "messages": [{"role": "user", "content": "still let in?"}]}

    def statuses(key: str) -> set[int]:
        return _statuses(gateway, body, key)

    def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)

    try:
        assert statuses("sk-leaving") == {200}
        gateway.policy_path.write_text(policy.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: x}"))
        until(lambda: bool(httpx.get(f"{gateway.url}/readyz", timeout=5).json()["policy"]["last_reload_error"]))
        revoked = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "revoke", "--id", "leaving", "--policies", str(gateway.policy_path),
             "--data-dir", str(gateway.policy_path.parent / "data")],  # where it reads the policy in force (t66)
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        until(lambda: statuses("sk-leaving") == {401})
        assert statuses("sk-leaving") == {401}, gateway.err_path.read_text()[-3000:]

        first, _ = sorted(_worker_pids(gateway.process.pid))
        os.kill(first, signal.SIGKILL)
        until(lambda: (workers := _worker_pids(gateway.process.pid)) is not None and len(workers) == 2
              and first not in workers and statuses("sk-ops") == {200})  # fmt: skip
        assert first not in _worker_pids(gateway.process.pid), gateway.err_path.read_text()[-3000:]
        assert statuses("sk-leaving") == {401} and statuses("sk-ops") == {200}
        said = {
            httpx.get(f"{gateway.url}/readyz", headers={"authorization": "Bearer sk-ops"}, timeout=5)
            .json()["policy"]["last_reload_error"]
            .split("; ")[-1]
            for _ in range(16)
        }
        assert said == {"keys.yaml as it is now is in force, on the policy kept: key changes apply, "
                        "only the edit of the policy file waits"}  # fmt: skip
    finally:
        gateway.stop()


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_a_worker_replaced_while_the_key_file_holds_a_bad_line_serves_the_keys_its_siblings_do(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    server: str,
) -> None:
    """f87: while the key file held a bad line, a worker's replacement fell back to the policy kept
    but read the same key file, and could not start: uvicorn's supervisor then stopped the whole
    gateway ("failed to start; stopping", exit 3), granian too ("Worker crash loop detected", exit
    1). It starts on the keys its siblings serve: those last accepted, less the keys the file no
    longer lists (t98), and says what they say."""
    admin = f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    policy = policy_text(
        small_upstream, large_upstream, auth=f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys:\n{admin}"
    )
    leaked = f'  - {{id: leaked, tenant: t, hash: "{hash_key("sk-leaked")}"}}\n'
    staying = f'  - {{id: staying, tenant: t, hash: "{hash_key("sk-staying")}"}}\n'
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n" + leaked + staying)
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=2, server=server)
    metrics = tmp_path / "data" / "metrics"
    body = {"model": "fast", "messages": [{"role": "user", "content": "which keys?"}]}

    def statuses(key: str) -> set[int]:
        return _statuses(gateway, body, key)

    def reload_errors() -> set[str]:
        return {
            httpx.get(f"{gateway.url}/readyz", headers={"authorization": "Bearer sk-ops"}, timeout=5).json()["policy"][
                "last_reload_error"
            ]
            for _ in range(16)
        }

    try:
        assert statuses("sk-leaked") == statuses("sk-staying") == {200}
        edited = tmp_path / "keys.yaml.new"  # a hand edit: the leaked key out, and one line a gateway refuses
        edited.write_text("keys:\n" + staying + '  - {id: oops, tenant: t, hash: "sha256:NOTHEX"}\n')
        os.replace(edited, keys)
        _until(lambda: statuses("sk-leaked") == {401})
        # each worker reloads on its own time: the one that answered all 16 may not be the only one
        _until(lambda: len(errors := reload_errors()) == 1 and None not in errors)
        [said] = reload_errors()
        assert (
            "keys.yaml: a key taken out of it is refused and models, admin or engine_fields taken back from a key apply; its other changes wait"
            in said
        )
        [version] = {_policy_version(metrics, pid) for pid in _worker_pids(gateway.process.pid)}

        first, second = sorted(_worker_pids(gateway.process.pid))
        os.kill(first, signal.SIGKILL)
        _until(lambda: first not in _worker_pids(gateway.process.pid))  # connections queued on it are reset
        # until the replacement has answered both a key kept (200) and the key taken out (401)
        deadline = time.monotonic() + 60  # a generous bound, not a measure
        while True:
            assert gateway.process.poll() is None, gateway.stderr_text()[-3000:]
            assert statuses("sk-staying") == {200} and statuses("sk-leaked") == {401}, gateway.stderr_text()[-3000:]
            replacements = set(_worker_pids(gateway.process.pid)) - {first, second}
            if any(_statuses_answered(metrics, pid) >= {"200", "401"} for pid in replacements):
                break
            assert time.monotonic() < deadline, gateway.stderr_text()[-3000:]
        [replacement] = replacements
        assert sorted(_worker_pids(gateway.process.pid)) == sorted([second, replacement])
        assert _policy_version(metrics, replacement) == version  # the siblings' keys, as a version
        assert reload_errors() == {said}  # whichever worker answers, the same words
        [started] = [r for r in gateway.ops_records("policy_rejected") if r["reason"] == "start-up"]
        assert started["key_file"] == "removals only" and started["key_file_problems"]
        assert re.search(r"failed to start|crash loop", gateway.stderr_text()) is None  # uvicorn's, granian's
    finally:
        gateway.stop()


def test_a_worker_replaced_while_the_key_file_is_emptied_serves_the_keys_its_siblings_do(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """f90: an emptied key file loads cleanly ("no keys made yet"), so a worker's replacement
    started on no keys (401 for every key) while its siblings refused the emptying, and kept the
    empty file in place of their keys: once both workers were replaced every key got 401. It
    is held to the reload rules against the policy kept, serves its siblings' keys and says what
    they say; the kept key file stays as it was."""
    admin = f'    - {{id: ops, tenant: ops, hash: "{hash_key("sk-ops")}", admin: true}}'
    policy = policy_text(
        small_upstream, large_upstream, auth=f"auth:\n  mode: keys\n  key_file: keys.yaml\n  keys:\n{admin}"
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text(f'keys:\n  - {{id: staying, tenant: t, hash: "{hash_key("sk-staying")}"}}\n')
    gateway = start_gateway(tmp_path, policy, env={"REDIS_URL": redis_server.url}, workers=2, server="uvicorn")
    metrics, kept = tmp_path / "data" / "metrics", tmp_path / "data" / "policy.last-accepted.keys.yaml"
    body = {"model": "fast", "messages": [{"role": "user", "content": "which keys?"}]}

    def reload_errors() -> set[str | None]:
        return {
            httpx.get(f"{gateway.url}/readyz", headers={"authorization": "Bearer sk-ops"}, timeout=5).json()["policy"][
                "last_reload_error"
            ]
            for _ in range(16)
        }

    try:
        assert _statuses(gateway, body, "sk-staying") == {200}
        [version] = {_policy_version(metrics, pid) for pid in _worker_pids(gateway.process.pid)}
        kept_before = kept.read_bytes()
        keys.write_text("")
        _until(lambda: all(said and "its changes wait too" in said for said in reload_errors()))
        [said] = reload_errors()
        assert _statuses(gateway, body, "sk-staying") == {200}  # both siblings refuse the emptying

        first, second = sorted(_worker_pids(gateway.process.pid))
        os.kill(first, signal.SIGKILL)
        _until(lambda: first not in _worker_pids(gateway.process.pid))
        deadline = time.monotonic() + 60  # a generous bound, not a measure
        while True:  # until the replacement has answered the key with 200
            assert gateway.process.poll() is None, gateway.stderr_text()[-3000:]
            assert _statuses(gateway, body, "sk-staying") == {200}, gateway.stderr_text()[-3000:]
            replacements = set(_worker_pids(gateway.process.pid)) - {first, second}
            if any("200" in _statuses_answered(metrics, pid) for pid in replacements):
                break
            assert time.monotonic() < deadline, gateway.stderr_text()[-3000:]
        [replacement] = replacements
        assert _policy_version(metrics, replacement) == version
        assert reload_errors() == {said}  # whichever worker answers, the same words
        [started] = [r for r in gateway.ops_records("policy_rejected") if r["reason"] == "start-up"]
        assert started["key_file"] == "pending"
        assert kept.read_bytes() == kept_before  # a later replacement falls back to the same keys
    finally:
        gateway.stop()


def _statuses(gateway: GatewayProcess, body: Mapping[str, object], key: str) -> set[int]:
    """The statuses of 16 requests with ``key``, each on a new connection: every worker answers."""
    return {
        httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10,
                   headers={"authorization": f"Bearer {key}"}).status_code
        for _ in range(16)
    }  # fmt: skip


def _policy_version(metrics: Path, pid: int) -> str:
    """The policy version worker ``pid`` has in force, as it writes it for ``gateway_policy_info``."""
    return (metrics / f"policy_version_{pid}").read_text()


def _statuses_answered(metrics: Path, pid: int) -> set[str]:
    """The statuses worker ``pid`` has answered with, from its own metrics file."""
    from prometheus_client.mmap_dict import MmapedDict

    path = metrics / f"counter_{pid}.db"
    if not path.exists():
        return set()
    found = set()
    for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
        _, sample, labels, _ = msgspec.json.decode(key)
        if sample == "gateway_requests_total" and value > 0:
            found.add(labels["status"])
    return found


@pytest.mark.parametrize(("workers", "serve_args"), [(2, ()), (1, ("--onnx-threads", "3"))])
def test_each_worker_runs_its_models_on_its_share_of_the_cores(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    workers: int,
    serve_args: tuple[str, ...],
) -> None:
    """Every worker giving each model all the cores oversubscribes the machine (a pass took
    15.9 ms on 16 threads and 6.1 ms on 8, on 16 cores): each worker gets its share."""
    gateway = start_gateway(
        tmp_path,
        policy_text(small_upstream, large_upstream),
        env={"REDIS_URL": redis_server.url},
        workers=workers,
        serve_args=serve_args,
    )
    try:
        share = 3 if serve_args else max(1, min(8, len(os.sched_getaffinity(0)) // workers))
        deadline = time.monotonic() + 30
        while True:
            loaded = gateway.ops_records("classifier_loaded") + gateway.ops_records("cache_verifier_loaded")
            if len(loaded) >= 2 * workers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(loaded) == 2 * workers, gateway.stderr_text()[-2000:]
        assert {record["threads"] for record in loaded} == {share}
    finally:
        gateway.stop()


def _banner(process: subprocess.Popen[bytes], err_path: Path, pattern: str) -> re.Match[str]:
    """The banner line matching ``pattern`` once serve has written it."""
    banner = re.compile(pattern)
    deadline = time.monotonic() + 60  # a generous start-up bound, not a measure
    while not (found := banner.search(err_path.read_text(errors="replace"))) and time.monotonic() < deadline:
        assert process.poll() is None, err_path.read_text(errors="replace")[-2000:]
        time.sleep(0.1)
    assert found is not None, err_path.read_text(errors="replace")[-2000:]
    return found


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_banner_writes_an_ipv6_host_in_brackets_and_its_url_serves(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t122: ``--host ::1`` said it served at ``http://::1:PORT/v1``, a URL no client can use."""
    policy = tmp_path / "policies.yaml"
    policy.write_text(policy_text(small_upstream, large_upstream))
    err_path = tmp_path / "gateway.err"
    with err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--host", "::1", "--port", "0",
             "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, "REDIS_URL": redis_server.url},
        )  # fmt: skip
    try:
        found = _banner(process, err_path, r"serving the OpenAI and Anthropic APIs at (http://\[::1\]:\d+/v1)")
        body = {"model": "fast", "messages": [{"role": "user", "content": "over IPv6"}]}
        assert httpx.post(f"{found.group(1)}/chat/completions", json=body, timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("first_edit", "agreed"),
    [("usd_per_day: null", "second edit"), ("usd_per_day: 3", "first edit")],
    ids=["second-edit-allowed", "second-edit-refused"],
)
def test_workers_agree_on_an_edit_whatever_earlier_edit_each_saw(
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream,
    first_edit: str,
    agreed: str,
) -> None:
    """t164: each worker judged an edit against the version it had in force itself, so one that
    missed an edit (each looks at the files on its own time) refused the next one that its sibling
    accepted, and the two served different policies until the file changed again. Only the first
    worker is told of the first edit here; whatever it took, both end on one version: the second
    edit, which leaves out the budget the first one wrote as no limit, or, when the first edit
    tightened the budget, the first edit, which the policy kept holds the second one to."""
    base = policy_text(small_upstream, large_upstream) + "tenants:\n  team-a: {limits: {rpm: 1000, usd_per_day: 5}}\n"
    env = {"REDIS_URL": redis_server.url, "GATEWAY_WATCH_POLICIES": "0"}  # reloads only when told
    gateway = start_gateway(tmp_path, base, env=env, workers=2)
    metrics = tmp_path / "data" / "metrics"
    edits = {
        "first edit": base.replace("usd_per_day: 5", first_edit),
        "second edit": base.replace(", usd_per_day: 5", ""),
    }
    versions = {name: hashlib.sha256(text.encode()).hexdigest()[:12] for name, text in edits.items()}

    def outcomes(pid: int) -> int:
        said = [*gateway.ops_records("policy_reloaded"), *gateway.ops_records("policy_rejected")]
        return sum(1 for record in said if record["pid"] == pid and record["reason"] == "SIGHUP")

    try:
        first, second = sorted(_worker_pids(gateway.process.pid))
        # each worker says it refused this, after its look at the file at start-up: none reads it again unasked
        gateway.policy_path.write_text("pair: [")
        os.kill(gateway.process.pid, signal.SIGHUP)  # to both
        _until(lambda: outcomes(first) == outcomes(second) == 1)
        gateway.policy_path.write_text(edits["first edit"])
        os.kill(first, signal.SIGHUP)  # the second worker misses the first edit
        _until(lambda: outcomes(first) == 2)
        assert _policy_version(metrics, first) == versions["first edit"]
        gateway.policy_path.write_text(edits["second edit"])
        os.kill(gateway.process.pid, signal.SIGHUP)
        _until(lambda: outcomes(first) >= 3 and outcomes(second) >= 2)
        in_force = {pid: _policy_version(metrics, pid) for pid in (first, second)}
        assert in_force == {first: versions[agreed], second: versions[agreed]}, gateway.stderr_text()[-3000:]
    finally:
        gateway.stop()
