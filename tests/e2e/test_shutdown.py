"""SIGTERM: stop accepting, finish in-flight streams, flush the log, stop the embedded Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.services.redis_server import EmbeddedRedis, start_embedded_redis
from gateway.simulated import SimulatedUpstream, start_simulated_upstream
from gateway.store.redis import RedisLimitCounters, SharedRedis, connect
from tests.conftest import upstream_stats
from tests.gateway_process import GatewayProcess, free_port, policy_text, start_gateway


def test_sigterm_lets_a_stream_finish_then_exits_cleanly(tmp_path: Path, large_upstream: SimulatedUpstream) -> None:
    with start_simulated_upstream("small", chunk_delay_ms=120) as slow_small:
        # REDIS_URL unset: the gateway starts (and must stop) its own Redis.
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        gateway = start_gateway(tmp_path, policy_text(slow_small, large_upstream), env=env)
        redis_pid = _embedded_redis_pid(tmp_path)
        assert redis_pid is not None
        reader, lines = _stream_in_background(gateway, words=12)
        _until(lambda: bool(lines))  # the stream is under way
        gateway.process.send_signal(signal.SIGTERM)
        reader.join(30)
        assert lines[-1] == "data: [DONE]" and len(lines) > 10
        assert gateway.process.wait(30) == 0
        records = gateway.log_records()
        assert len(records) == 1 and records[0]["status"] == 200 and records[0]["stream"] is True  # flushed
        deadline = time.monotonic() + 30
        while Path(f"/proc/{redis_pid}").exists() and not _is_zombie(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{redis_pid}").exists() or _is_zombie(redis_pid)
        assert "stopped" in gateway.stderr_text()


def _stream_in_background(
    gateway: GatewayProcess, words: int, model: str = "fast"
) -> tuple[threading.Thread, list[str]]:
    """A streamed chat request read on a thread (started); its non-empty lines land in the list."""
    lines: list[str] = []

    def stream() -> None:
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": " ".join(["word"] * words)}]}
        with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=30) as response:
            lines.extend(line for line in response.iter_lines() if line)

    reader = threading.Thread(target=stream)
    reader.start()
    return reader, lines


def _until(done: Callable[[], bool], timeout_s: float = 30, *, strict: bool = True) -> None:
    """Until ``done``: a guessed sleep before a signal sent it, on a busy machine, before the
    request it was to find in flight had reached the gateway. Not ``strict``: at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            assert not strict, "timed out"
            return
        time.sleep(0.02)


def _embedded_redis_pid(workdir: Path) -> int | None:
    """Redis rewrites its process title, but it runs in its --dir: find it by working directory."""
    data = str((workdir / "data" / "redis").resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"redis-server" in (proc / "cmdline").read_bytes() and os.readlink(proc / "cwd") == data:
                return int(proc.name)
        except OSError:
            continue
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


def test_sigterm_under_uvicorn_also_stops_the_embedded_redis(tmp_path: Path, large_upstream: SimulatedUpstream) -> None:
    with start_simulated_upstream("small") as small:
        policy = tmp_path / "policies.yaml"
        policy.write_text(policy_text(small, large_upstream))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--server", "uvicorn", "--policies", str(policy), "--port", str(port),
             "--data-dir", str(tmp_path / "data")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        redis_pid = _embedded_redis_pid(tmp_path)
        assert redis_pid is not None
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)  # reads and closes the pipe
        assert process.returncode == 0, stderr.decode()[-2000:]
        deadline = time.monotonic() + 30
        while Path(f"/proc/{redis_pid}").exists() and not _is_zombie(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{redis_pid}").exists() or _is_zombie(redis_pid)


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
@pytest.mark.parametrize("again", [False, True], ids=["once", "again-and-again"])
def test_ctrl_c_to_one_worker_drains_as_sigterm_does(
    tmp_path: Path, redis_server: EmbeddedRedis, small_upstream: SimulatedUpstream,
    large_upstream: SimulatedUpstream, again: bool, server: str,
) -> None:  # fmt: skip
    """t96: with one worker (``make run``) uvicorn took SIGINT alone: the drain never began, so a
    stream open then was cut at the kill timeout with no error event and no log line, and a request
    still waiting went on past the deadline. A second Ctrl-C is uvicorn's "force quit", which skips
    the application's shutdown (the log lines and usage not yet written); one after the server
    stopped broke off serve's own stops with a traceback. t132: under granian a second Ctrl-C,
    which reaches the worker too, blocked its event loop until granian killed it."""
    with (
        start_simulated_upstream("trickle", chunk_delay_ms=500) as trickling,
        start_simulated_upstream("silent", latency_ms=8_000) as silent,
    ):
        patient = (
            "price: {input: 1, output: 1}\n    tier: small\n    timeouts: {connect: 1, first_byte: 60, total: 120}"
        )
        models = f"  trickle:\n    base_url: {trickling.url}\n    {patient}\n  silent:\n    base_url: {silent.url}\n    {patient}\n"
        routes = "  r-trickle: {model: trickle}\n  r-silent: {model: silent}\n"
        policy = policy_text(small_upstream, large_upstream, extra_models=models, routes=routes)
        env = {"REDIS_URL": redis_server.url}
        gateway = start_gateway(tmp_path, policy, env=env, server=server, serve_args=("--drain-s", "2"), own_group=True)
        try:
            reader, lines = _stream_in_background(gateway, words=40, model="r-trickle")  # 20 s at its pace
            answers: list[httpx.Response] = []
            body = {"model": "r-silent", "messages": [{"role": "user", "content": "slow"}]}
            asker = threading.Thread(
                target=lambda: answers.append(httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=60))
            )
            asker.start()
            # the stream is under way, the other request waits on its upstream
            _until(lambda: bool(lines) and upstream_stats(silent)["chat_requests"] >= 1)
            os.killpg(gateway.process.pid, signal.SIGINT)  # Ctrl-C in the terminal signals the group
            while again and gateway.process.poll() is None:
                time.sleep(0.05)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gateway.process.pid, signal.SIGINT)
            reader.join(30)
            asker.join(30)
            assert gateway.process.wait(30) == 0
        finally:
            gateway.stop()
    errors = [msgspec.json.decode(line[6:]) for line in lines if line.startswith("data: {") and '"error"' in line]
    assert errors and errors[-1]["error"]["code"] == "shutting_down", lines[-3:]
    [answer] = answers
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
    records = sorted(gateway.log_records(), key=lambda record: bool(record["stream"]))
    assert [(r["stream"], r["status"], r["error_type"]) for r in records] == [
        (False, 503, "shutting_down"),
        (True, 503, "shutting_down"),
    ]
    assert records[1]["completion_tokens"] > 0  # what the stream had written is billed
    assert gateway.ops_records("drain_started")
    assert "Traceback" not in gateway.stderr_text()


def test_ctrl_c_in_the_terminal_leaves_the_embedded_redis_to_the_gateway(
    tmp_path: Path, large_upstream: SimulatedUpstream
) -> None:
    """t96: the embedded Redis was in the gateway's process group, so a Ctrl-C stopped it too, and
    the gateway restarted it in the middle of its drain. It is the gateway's to stop, last."""
    with start_simulated_upstream("small", chunk_delay_ms=150) as slow_small:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        gateway = start_gateway(tmp_path, policy_text(slow_small, large_upstream), env=env, own_group=True)
        try:
            redis_pid = _embedded_redis_pid(tmp_path)
            assert redis_pid is not None
            reader, lines = _stream_in_background(gateway, words=12)
            _until(lambda: bool(lines))  # the stream is under way: the gateway drains for a while yet
            os.killpg(gateway.process.pid, signal.SIGINT)
            reader.join(30)
            assert gateway.process.wait(30) == 0
        finally:
            gateway.stop()
    assert lines[-1] == "data: [DONE]"
    [record] = gateway.log_records()
    assert record["status"] == 200
    assert "embedded Redis exited" not in gateway.stderr_text()
    assert "Received SIGINT" not in (tmp_path / "data" / "redis" / "redis.log").read_text()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{redis_pid}").exists() and not _is_zombie(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{redis_pid}").exists() or _is_zombie(redis_pid)
    assert _embedded_redis_pid(tmp_path) is None  # nor a restarted one


def test_with_several_workers_a_new_connection_during_the_drain_is_refused_at_once(
    tmp_path: Path, large_upstream: SimulatedUpstream
) -> None:
    # The supervisor held copies of the workers' listening sockets: during the drain the
    # kernel queued new connections no one accepted, and each hung, then was reset.
    with start_simulated_upstream("small", chunk_delay_ms=150) as slow_small:
        gateway = start_gateway(tmp_path, policy_text(slow_small, large_upstream), workers=2, server="uvicorn")
        reader, finished = _stream_in_background(gateway, words=60)  # 9 s at its pace
        _until(lambda: bool(finished))  # the stream is under way
        gateway.process.send_signal(signal.SIGTERM)
        # the supervisor handles its signals every 0.5 s (a loaded machine's worker later still): until then
        # a new request is answered; once the workers stop listening it is refused, and never left queued
        late = {"model": "fast", "messages": [{"role": "user", "content": "too late"}]}
        outcome = "answered"
        while outcome == "answered" and reader.is_alive():
            try:
                httpx.post(f"{gateway.base_url}/chat/completions", json=late, timeout=5)
                time.sleep(0.1)
            except httpx.ConnectError:
                outcome = "refused"
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__  # ReadError/ReadTimeout: accepted by no one
        draining = reader.is_alive()
        reader.join(30)
        assert outcome == "refused" and draining  # refused while the stream still drained
        assert finished[-1] == "data: [DONE]"  # the stream in flight still finished
        assert gateway.process.wait(30) == 0


def test_a_serve_killed_outright_leaves_no_worker_or_redis_behind(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    # SIGKILL runs no clean-up: the workers kept serving on the port and the private Redis
    # kept running, beside the next gateway's on the same folder.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    gateway = start_gateway(tmp_path, policy_text(small_upstream, large_upstream), env=env, workers=2, server="uvicorn")
    redis_pid = _embedded_redis_pid(tmp_path)
    assert redis_pid is not None
    workers = [
        int(p) for p in Path(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children").read_text().split()
    ]
    assert len(workers) >= 3  # two workers (and uvicorn's resource tracker) beside Redis
    gateway.process.kill()
    gateway.process.wait(10)
    deadline = time.monotonic() + 30
    alive = [pid for pid in (*workers, redis_pid) if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
    assert not alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gateway.url}/healthz", timeout=2)


def test_usage_held_while_redis_is_down_reaches_a_redis_back_during_the_shutdown(
    tmp_path: Path, small_upstream: SimulatedUpstream, large_upstream: SimulatedUpstream
) -> None:
    """t74: at SIGTERM the usage held through an outage was sent once, refused at once (Redis still
    marked down), and dropped 0.17 s later, though the README promises it 10 s more."""
    port = free_port()
    server = start_embedded_redis(tmp_path / "redis", port=port, password="pw-74")
    url = f"redis://:pw-74@127.0.0.1:{port}/0"
    gateway = start_gateway(tmp_path / "gw", policy_text(small_upstream, large_upstream), env={"REDIS_URL": url})
    back: EmbeddedRedis | None = None
    try:
        server.stop()  # Redis goes away
        for n in range(3):
            body = {"model": "fast", "messages": [{"role": "user", "content": f"held {n}"}]}
            assert httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10).status_code == 200
        gateway.process.send_signal(signal.SIGTERM)
        while gateway.process.poll() is None and not gateway.ops_records("usage_held_at_shutdown"):
            time.sleep(0.05)  # until it has tried once at shutdown (or, unfixed, exited)
        back = start_embedded_redis(tmp_path / "redis-back", port=port, password="pw-74")  # empty, same address
        assert gateway.process.wait(30) == 0
        assert not gateway.ops_records("usage_unrecorded")
        assert asyncio.run(_requests_counted(url, "anonymous", "default")) == 3
    finally:
        gateway.stop()
        if back is not None:
            back.stop()


async def _requests_counted(url: str, key_id: str, tenant: str) -> int:
    """The requests today in the key's usage sums in that Redis."""
    from datetime import UTC, datetime

    shared = SharedRedis(connect(url, timeout_s=2), Metrics())
    try:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        totals = await UsageLedger(RedisLimitCounters(shared)).read([(key_id, tenant)], today, today)
    finally:
        await shared.aclose()
    assert totals is not None
    return totals[key_id, tenant].requests


def test_under_granian_a_stream_whose_bookkeeping_outlasts_its_last_byte_is_logged_and_billed(
    tmp_path: Path, redis_server: EmbeddedRedis, large_upstream: SimulatedUpstream
) -> None:
    """t132: granian runs the app's shutdown once the last connection is closed, which an OpenAI
    SDK does as soon as it reads ``[DONE]``; what the stream does after its last byte (its answer
    stored in the cache, here held up by a Redis that pauses its writes; then its log line and
    usage) came after the request log was closed: the client had its whole answer, and the
    request was neither logged nor billed."""
    import openai
    import redis

    with start_simulated_upstream("small", chunk_delay_ms=150) as slow_small:
        policy = policy_text(slow_small, large_upstream, cache="{enabled: true, redis_timeout_ms: 5000}")
        gateway = start_gateway(
            tmp_path, policy, env={"REDIS_URL": redis_server.url}, server="granian", serve_args=("--drain-s", "20")
        )
        billed = asyncio.run(_requests_counted(redis_server.url, "anonymous", "default"))
        client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
        chunks = client.chat.completions.create(
            model="fast", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"bookkeeping {time.time()} " + "word " * 12}],
        )  # fmt: skip
        seen = 0
        usage = None
        with redis.Redis.from_url(redis_server.url) as paused:
            for chunk in chunks:
                seen += 1
                if seen == 2:
                    gateway.process.send_signal(signal.SIGTERM)
                if seen == 20:  # the stream ends (chunk 29) while Redis holds writes back
                    paused.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
                usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens > 0  # the client has its whole answer
        assert gateway.process.wait(30) == 0
    [record] = gateway.log_records()
    assert record["status"] == 200 and record["completion_tokens"] == usage.completion_tokens
    assert not [r for r in gateway.ops_records("drain_finished") if r["still_open"]]
    assert asyncio.run(_requests_counted(redis_server.url, "anonymous", "default")) == billed + 1


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_with_several_workers_requests_in_flight_at_sigterm_all_finish_and_are_logged(
    tmp_path: Path, large_upstream: SimulatedUpstream, server: str
) -> None:
    """t145: requests the gateway is serving at SIGTERM, on kept-alive connections and on new
    ones, all finish and are logged, under either server."""
    import openai

    with start_simulated_upstream("small", latency_ms=3000) as slow_small:  # 3 s for all twenty to reach it
        # small's test timeouts (a 1 s first byte) would end each attempt before its answer: the
        # twenty would be retried, then fall back to large, in flight at SIGTERM only by chance
        policy = policy_text(slow_small, large_upstream).replace(
            "first_byte: 1, total: 5", "first_byte: 60, total: 60", 1
        )
        gateway = start_gateway(tmp_path, policy, workers=2, server=server)

        async def in_flight() -> list[object]:
            clients = [openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0) for _ in range(11)]
            shared, own = clients[0], clients[1:]

            async def one(client: openai.AsyncOpenAI, text: str) -> int:
                response = await client.chat.completions.with_raw_response.create(
                    model="fast", messages=[{"role": "user", "content": text}]
                )
                return response.status_code

            try:
                await asyncio.gather(*(one(shared, f"warm {i}") for i in range(10)))  # ten kept alive
                tasks = [asyncio.create_task(one(shared, f"kept alive {i}")) for i in range(10)]
                tasks += [asyncio.create_task(one(client, f"new connection {i}")) for i, client in enumerate(own)]
                deadline = time.monotonic() + 60
                while (await asyncio.to_thread(upstream_stats, slow_small))["in_flight"] < 20:
                    assert time.monotonic() < deadline, "the twenty requests were never at the upstream together"
                    await asyncio.sleep(0.02)  # all at the upstream: the gateway is serving each
                gateway.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                for client in clients:
                    await client.close()

        statuses = asyncio.run(in_flight())
        assert statuses == [200] * 20, [repr(s.__cause__ or s) if isinstance(s, Exception) else s for s in statuses]
        assert gateway.process.wait(30) == 0
    records = gateway.log_records()
    assert len(records) == 30 and {(r["status"], r["model"], r["retries"]) for r in records} == {(200, "small", 0)}


def _pid_namespace_available() -> bool:
    """Whether this user may start a process as PID 1 of a new PID namespace (``unshare``, as root)."""
    if shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("as_pid_1", [True, False], ids=["pid-1", "pid-n"])
@pytest.mark.parametrize("moment", ["importing", "starting-upstreams", "redis-started"])
def test_sigterm_while_starting_stops_it_and_what_it_started(tmp_path: Path, moment: str, as_pid_1: bool) -> None:
    """t192: as PID 1 of its PID namespace (a pod without an init, `docker run`), the kernel drops a
    signal the process has no handler for, and serve had none until its server started: a SIGTERM
    in its first second was ignored, and it served on until SIGKILL (a pod deleted as it started
    waited out its whole grace period). Anywhere else that SIGTERM killed it outright, exit -15,
    with none of its clean-up. Either way it is a stop: what it had started is stopped, exit 0."""
    said = {"starting-upstreams": "SMALL_MODEL_URL is unset: started a SIMULATED", "redis-started": "private Redis"}
    # The test sees the line only after the gateway wrote it, and on a busy CI box the gateway has
    # served by then now and again (once in ~2,400 tests): a stop once serving is the other test's
    # case, so try again. Every try must stop cleanly; one of them must land before serving.
    for attempt in range(_TRIES_TO_LAND_BEFORE_SERVING):
        workdir = tmp_path / f"try-{attempt}"
        workdir.mkdir()
        status, err, gateway = _sigterm_while_starting(workdir, as_pid_1=as_pid_1, once_said=said.get(moment))
        assert status == 0, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        assert _embedded_redis_pid(workdir) is None  # stopped by the gateway itself, before it exited
        if not as_pid_1:  # in its namespace, whatever its PID 1 leaves is killed with it
            # nor an upstream: the gateway stopped each, one spawned as the signal came too (f212)
            assert _no_live_child_of(gateway)
        if "serving the OpenAI" not in err:
            return
    raise AssertionError(f"every one of {_TRIES_TO_LAND_BEFORE_SERVING} SIGTERMs came after serving: {err[-2000:]}")


_TRIES_TO_LAND_BEFORE_SERVING = 5


def _no_live_child_of(parent: int) -> bool:
    return not [p for p in _processes_with(f"--parent-pid {parent} ") if not _is_zombie(p)]


@pytest.mark.parametrize(("server", "workers"), [("uvicorn", "1"), ("uvicorn", "2"), ("granian", "2")])
def test_sigterm_as_the_server_takes_over_stops_it(tmp_path: Path, server: str, workers: str) -> None:
    """t192: a SIGTERM that serve took just before its server put its own handlers in place is the
    server's to act on, as PID 1 too: stopped before serving, or drained once started."""
    status, err, _ = _sigterm_while_starting(
        tmp_path, as_pid_1=True, once_said="; auth ", serve_args=("--server", server, "--workers", workers)
    )
    assert status == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert _embedded_redis_pid(tmp_path) is None


def test_under_granian_a_sigterm_to_a_worker_as_it_starts_stops_it(tmp_path: Path) -> None:
    """t199: a worker forked by granian kept serve's handler for SIGTERM (granian's, which notes a stop
    in serve's copy of its state) until its own went in, after the application was imported: a stop
    passed on to a worker meanwhile was lost, and the worker started, served, and was killed at
    granian's kill timeout (a 30 s stop, or SIGKILL first, and "serving" said after the SIGTERM). Here
    the first worker itself, once forked, sends serve the SIGTERM and goes on only once serve has
    passed it on: it lands there every time."""
    _assert_a_worker_signalled_granian_stops_cleanly(tmp_path, _SIGTERM_FROM_A_STARTING_WORKER, "--workers", "2")


def _assert_a_worker_signalled_granian_stops_cleanly(
    tmp_path: Path, script: str, *serve_args: str, evidence: str = ""
) -> None:
    """Run serve (granian) under ``script``, whose worker sends serve a SIGTERM at the moment
    ``script`` picks, and assert a clean stop: the worker did send it (``PID_FILE``, or its sibling
    with the suffix ``evidence``), exit 0, no worker killed at granian's kill timeout, nothing left running."""
    pid_file = tmp_path / "signalled-from"
    returncode, said = _serve_signalled(tmp_path, script, [str(pid_file)], ["--server", "granian", *serve_args])
    assert (pid_file.with_suffix(evidence) if evidence else pid_file).exists(), said[-2000:]  # the worker did send it
    assert returncode == 0, said[-2000:]
    assert "refused to gracefully stop" not in said and "Traceback" not in said, said[-2000:]


def _serve_signalled(tmp_path: Path, script: str, script_args: list[str], serve_args: list[str]) -> tuple[int, str]:
    """Run ``python -c script *script_args serve ... *serve_args`` (the shipped policy, simulated
    upstreams, embedded Redis) to its exit: its exit code and what it wrote to stderr, once it
    left no child running and no embedded Redis behind."""
    shipped = Path(__file__).resolve().parents[2] / "policies.yaml"
    serve = [sys.executable, "-c", script, *script_args, "serve", "--simulate-missing", "--policies", str(shipped),
             "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), *serve_args]  # fmt: skip
    env = {**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": "", "REDIS_URL": ""}
    err_path = tmp_path / "gateway.err"  # a file: a pipe would be read to its end, once a child too had exited
    with err_path.open("wb") as stderr:
        process = subprocess.Popen(serve, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    said = err_path.read_text(errors="replace")
    assert _no_live_child_of(process.pid), said[-2000:]
    assert _embedded_redis_pid(tmp_path) is None, said[-2000:]
    return process.returncode, said


_SIGTERM_FROM_A_STARTING_WORKER = """
import multiprocessing.util, os, runpy, signal, sys, time

pid_file = sys.argv[1]


def as_a_worker_starts(_):  # in each worker granian forks, before granian's code in it runs
    try:
        out = os.open(pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # the first worker only
    os.write(out, str(os.getpid()).encode())
    os.close(out)
    came = []
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):  # taken at once: noted, then handled as it would have been
        signal.signal(signal.SIGTERM, lambda signum, frame: (came.append(signum), handler(signum, frame)))
    os.kill(os.getppid(), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not came and signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
        time.sleep(0.01)  # until serve has passed it on to this worker, taken or held
    signal.signal(signal.SIGTERM, handler)


class Hook:
    pass


hook = Hook()
multiprocessing.util.register_after_fork(hook, as_a_worker_starts)
sys.argv = ["gateway", *sys.argv[2:]]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
"""``python -m gateway`` whose first forked worker sends serve a SIGTERM as it starts, and waits until
serve has passed it on to that worker; that worker's pid is written to ``argv[1]``."""


def test_under_granian_a_sigterm_to_a_worker_between_its_start_and_serving_stops_it(tmp_path: Path) -> None:
    """f227 (t199's find): granian's worker runs the application's lifespan start, then its own set-up,
    then serves, each on its event loop, which is not running in between. uvloop listens for signals
    only while it runs: a SIGTERM in between was noted and acted on only once another signal came,
    and the worker served on until granian killed it at its kill timeout. Here the worker, as granian
    makes its server in that gap, sends serve the SIGTERM and goes on once serve has passed it on."""
    _assert_a_worker_signalled_granian_stops_cleanly(
        tmp_path, _SIGTERM_FROM_A_WORKER_ABOUT_TO_SERVE, "--workers", "1", "--drain-s", "2"
    )


_SIGTERM_FROM_A_WORKER_ABOUT_TO_SERVE = """
import os, runpy, signal, sys, time

import granian.server.mp

pid_file = sys.argv[1]
make_server = granian.server.mp.ASGIWorker


def about_to_serve(*args, **kwargs):  # in a worker, as granian makes its server: its event loop is not running
    try:
        out = os.open(pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return make_server(*args, **kwargs)  # the first worker only
    os.write(out, str(os.getpid()).encode())
    os.close(out)
    came = []
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):  # taken at once: noted, then handled as it would have been
        signal.signal(signal.SIGTERM, lambda signum, frame: (came.append(signum), handler(signum, frame)))
    os.kill(os.getppid(), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not came and time.monotonic() < deadline:
        time.sleep(0.01)  # until serve has passed it on to this worker
    signal.signal(signal.SIGTERM, handler)
    return make_server(*args, **kwargs)


granian.server.mp.ASGIWorker = about_to_serve
sys.argv = ["gateway", *sys.argv[2:]]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
"""``python -m gateway`` whose first granian worker, between its application's start and its serving,
sends serve a SIGTERM and waits until serve has passed it on; that worker's pid is written to ``argv[1]``."""


def test_under_granian_a_sigterm_to_the_group_in_a_workers_start_stops_it(tmp_path: Path) -> None:
    """f232 (t201's find): a SIGTERM to serve's process group (``kill -TERM -PGID``, systemd's stop)
    reaches each worker, and serve passes one more on. Granian's handler in a worker ran for each
    its loop read, and the second, in the application's start where nothing takes granian's stop
    yet, blocked the worker for good: it was killed at the kill timeout. Here the worker, in its start
    with the drain's handler in place, sends the group's SIGTERM to serve, takes its own and serve's
    on another of its threads (where a process's signal may land, and no Python-level handler sees it
    before the loop does), and goes on once serve has passed one on."""
    _assert_a_worker_signalled_granian_stops_cleanly(
        tmp_path, _SIGTERM_TO_THE_GROUP_IN_A_WORKERS_START, "--workers", "1", "--drain-s", "2", evidence=".passed"
    )  # serve did pass one on, in the worker's start


_SIGTERM_TO_THE_GROUP_IN_A_WORKERS_START = """
import os, runpy, signal, sys, threading, time

import granian.server.mp

from gateway.runtime import RuntimeHolder

marker = sys.argv[1]
passed = os.path.splitext(marker)[0] + ".passed"
terminate = granian.server.mp.WorkerProcess.terminate
reload_on_sighup = RuntimeHolder.reload_on_sighup


def passed_on(self):  # serve, stopping its worker
    terminate(self)
    open(passed, "w").close()


def on_another_thread():
    for _ in range(2):  # the group's and serve's
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def in_start(self):  # in the worker's application start, after the drain's handler: its loop runs
    reload_on_sighup(self)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # once
    os.kill(os.getppid(), signal.SIGTERM)  # the group's, to serve
    thread = threading.Thread(target=on_another_thread)
    thread.start()
    thread.join()
    deadline = time.monotonic() + 30
    while not os.path.exists(passed) and time.monotonic() < deadline:
        time.sleep(0.01)  # until serve has passed one on, the start going on


granian.server.mp.WorkerProcess.terminate = passed_on
RuntimeHolder.reload_on_sighup = in_start
sys.argv = ["gateway", *sys.argv[2:]]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
"""``python -m gateway`` whose granian worker, in its application's start, sends serve the SIGTERM a
process group's stop sends it, takes that stop's and serve's on a thread of its own, and goes on once
serve has passed one on (``argv[1]`` is made then, its ``.passed`` sibling once serve has)."""


@pytest.mark.parametrize("spawned", ["gateway.simulated", "redis-server"])
def test_sigterm_as_serve_spawns_a_child_stops_that_child_too(tmp_path: Path, spawned: str) -> None:
    """f212: a SIGTERM that came while ``subprocess.Popen`` waited for a child's exec broke off the
    Popen, after the fork: serve never learnt of that child, which lived on after serve had exited
    (an upstream until its own watch on its parent noticed). Here the child itself sends it, from
    Popen's preexec_fn, so it lands there every time; the moment the child is gone is serve's exit."""
    pid_file = tmp_path / "signalled-from"
    returncode, said = _serve_signalled(tmp_path, _SIGTERM_FROM_INSIDE_A_SPAWN, [spawned, str(pid_file)], [])
    assert returncode == 0, said[-2000:]
    assert "SIGTERM before serving: stopped" in said and "Traceback" not in said, said[-2000:]
    child = int(pid_file.read_text())
    assert not Path(f"/proc/{child}").exists() or _is_zombie(child), f"{spawned} (pid {child}) outlived serve"


_SIGTERM_FROM_INSIDE_A_SPAWN = """
import os, runpy, signal, subprocess, sys

spawned, pid_file = sys.argv[1:3]
serve = os.getpid()


class SignalledAsItSpawns(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        then = kwargs.get("preexec_fn")
        if spawned in " ".join(map(str, args)) and not os.path.exists(pid_file):

            def preexec():  # in the child, between the fork and the exec: serve waits in Popen
                if then is not None:
                    then()
                with open(pid_file, "w") as out:
                    out.write(str(os.getpid()))
                os.kill(serve, signal.SIGTERM)

            kwargs["preexec_fn"] = preexec
        super().__init__(args, *rest, **kwargs)


subprocess.Popen = SignalledAsItSpawns
sys.argv = ["gateway", *sys.argv[3:]]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
"""``python -m gateway`` with a SIGTERM sent to it from the first child whose command names ``argv[1]``,
as Popen spawns it; that child's pid is written to ``argv[2]``."""


def _sigterm_while_starting(
    tmp_path: Path, *, as_pid_1: bool, once_said: str | None, serve_args: tuple[str, ...] = ()
) -> tuple[int, str, int]:
    """Start the shipped policy on simulated upstreams and the embedded Redis, as PID 1 of a PID
    namespace or not, send SIGTERM once stderr says ``once_said`` (None: as soon as the process takes
    SIGTERM, or half a second into its start, which before t192 it did not), and wait at most 45 s
    for it to end: its exit status, stderr and pid (as seen from here). A SIGTERM the server took as
    its workers started may wait out their kill timeout, the drain's 25 s + 5: a stop, if a slow one
    (a fresh clone once saw granian's take longer than 15 s)."""
    if as_pid_1 and not _pid_namespace_available():
        pytest.skip("unshare --pid --fork --mount-proc is not available to this user")
    shipped = Path(__file__).resolve().parents[2] / "policies.yaml"
    err_path = tmp_path / "gateway.err"
    serve = [sys.executable, "-m", "gateway", "serve", "--simulate-missing", "--policies", str(shipped),
             "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), *serve_args]  # fmt: skip
    env = {**os.environ, "SMALL_MODEL_URL": "", "LARGE_MODEL_URL": "", "REDIS_URL": ""}
    with err_path.open("wb") as stderr:
        process = subprocess.Popen(
            [*(["unshare", "--pid", "--fork", "--mount-proc"] if as_pid_1 else []), *serve],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        gateway = _gateway_pid(process.pid) if as_pid_1 else process.pid  # unshare forks it, then waits for it
        if once_said is None:
            _until(lambda: _catches(gateway, signal.SIGTERM), timeout_s=0.5, strict=False)
        else:
            _until(lambda: once_said in err_path.read_text(errors="replace"))
        os.kill(gateway, signal.SIGTERM)
        try:
            status = process.wait(45)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 45 s after SIGTERM: {err_path.read_text()[-2000:]}") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return status, err_path.read_text(errors="replace"), gateway


def _gateway_pid(unshare: int) -> int:
    """The process ``unshare --fork`` started, seen from here, once it runs Python (not ``unshare`` itself)."""
    found: list[int] = []

    def started() -> bool:
        found[:] = [int(pid) for pid in Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()]
        return bool(found) and b"gateway" in Path(f"/proc/{found[0]}/cmdline").read_bytes()

    _until(started)
    return found[0]


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _processes_with(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes().replace(b"\0", b" "):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
