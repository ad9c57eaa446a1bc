"""Gateway benchmark: latency overhead, throughput and memory against a fast local upstream.

Run: ``python tests/bench/gateway_bench.py`` (``--help`` for the options; the default
run takes about 3 minutes on 2 cores). ``--compare-servers`` adds granian next to
uvicorn (the default), ``--compare-transports`` adds aiohttp's and httpx's transports next to the
gateway's own (both flags: every pair), ``--compare-cache`` adds the main pair with the Redis cache on.

Method
------
* One simulated OpenAI-compatible upstream (``gateway.simulated``) answers every
  request at once, so what is measured is HTTP plus the gateway's own work.
* The same short, non-streamed chat request is sent straight to the upstream (the
  *direct* baseline) and through the gateway's ``fast`` route (``--workers`` workers,
  default 1; request log on, the gateway's stdout redirected to a file whose lines are
  counted afterwards). The gateway runs with ``cache: {enabled: false}`` so that every
  request takes the proxy path to the upstream; this is checked against the upstream's
  own request counter. Per server/transport configuration the direct baseline is
  measured right before the gateway, so each pair of figures shares the same noise.
* Latency: 1 keep-alive connection, sequential, ``--sequential-requests`` after
  ``--sequential-warmup`` unrecorded ones. **Overhead = gateway latency - direct
  latency**, at p50 and at p99 (and the mean). The gateway's ``x-gateway-overhead-ms``
  header (its own time minus the time waiting on the upstream) is reported next to it.
* Throughput: ``--connections`` closed-loop connections for ``--duration`` seconds
  after ``--warmup-seconds``; requests/s = completed / elapsed.
* Memory: RSS (``VmRSS``) of the gateway's worker process (granian forks one; uvicorn
  with 1 worker serves in the main process) every ``--memory-every`` requests while
  ``--memory-requests`` go through ``--connections`` connections; drift = (last sample -
  sample after the first ``--memory-every``) / that first sample.
* ``--compare-cache``: the same phases with the cache on: *hits* (the same request
  again and again: exact-cache hits after the first) and *misses* (every request's
  prompt is unique: the miss path, i.e. cache lookups and writes plus the upstream).
* Medians, p99s and ratios come from one run each: the machine is shared and noisy,
  so a figure is only compared with the one measured next to it. Per phase the CPU
  used by the load generator, the gateway worker, its Redis, the upstream, the rest of
  the machine (``other_processes``: noise from outside the benchmark) and the whole
  machine is reported in % of one core, to show which process was the bottleneck and
  how noisy the phase was; and CPU ms per request per process, which other load
  disturbs less than latency (contention still inflates it somewhat).
* Every response's status is counted; non-200s, connection errors and timeouts are
  reported for every phase. The request log is counted too (one line per request,
  warm-ups included).

Results: a table on stdout and ``bench-results/gateway-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script: make `gateway` and `tests` importable
    sys.path.insert(0, str(_ROOT))

from gateway.simulated import SimulatedUpstream, start_simulated_upstream  # noqa: E402
from tests.bench.litellm_side import measure_litellm, side_by_side  # noqa: E402
from tests.bench.loadgen import (  # noqa: E402
    HttpTarget,
    RunResult,
    build_post,
    event_loop_factory,
    percentile,
    run_closed_loop,
    run_sequential,
)

__all__ = ["main"]

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
OVERHEAD_HEADER = b"x-gateway-overhead-ms"
CACHE_HEADER = b"x-gateway-cache"
PROMPT = "Say hello in one short sentence."
UPSTREAM_MODEL = "small"
ROUTE = "fast"
TARGETS = {"overhead_p50_ms": 1.0, "overhead_p99_ms": 5.0, "requests_per_s": 1000.0, "rss_drift_pct": 10.0}
UNIQUE_PROMPTS_PER_S = 5000
"""Distinct prompts prepared per second of a miss run: more than the gateway can answer."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STDERR_TAIL_CHARS = 4000
_LOG_FLUSH_S = 0.3
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class BenchSettings:
    sequential_requests: int
    sequential_warmup: int
    connections: int
    duration_s: float
    warmup_s: float
    memory_requests: int
    memory_every: int
    workers: int
    results_dir: Path
    keep_logs: bool
    temperature: float | None = None
    """Sent with every request when set: at ≤ 0.5 the cache-on runs take the semantic path."""


@dataclass(frozen=True, slots=True)
class Config:
    server: str
    transport: str
    cache: bool = False
    measure_memory: bool = False

    @property
    def label(self) -> str:
        return f"{self.server}+{self.transport}" + ("+cache" if self.cache else "")

    @property
    def variants(self) -> tuple[str, ...]:
        """The gateway phases: the proxy path, or with the cache on its misses and hits."""
        return ("cache_miss", "cache_hit") if self.cache else ("proxy",)


_TRANSPORTS = ("http11", "aiohttp", "httpx")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--sequential-requests", type=int, default=3000, help="recorded requests on 1 connection (default 3000)")
    add("--sequential-warmup", type=int, default=300, help="unrecorded requests before them (default 300)")
    add("--connections", type=int, default=8, help="connections for the throughput and memory runs (default 8)")
    add("--duration", type=float, default=8.0, help="seconds of the throughput run (default 8)")
    add("--warmup-seconds", type=float, default=1.0, help="unrecorded seconds before it (default 1)")
    add("--memory-requests", type=int, default=100_000, help="requests of the memory run; 0 skips it (default 100000)")
    add("--memory-every", type=int, default=10_000, help="RSS sample interval in requests (default 10000)")
    add("--workers", type=int, default=1, help="gateway workers (default 1)")
    add("--server", choices=("uvicorn", "granian"), default="uvicorn", help="main configuration's ASGI server")
    add("--transport", choices=_TRANSPORTS, default="http11", help="main configuration's upstream transport")
    add("--compare-servers", action="store_true", help="also run the other ASGI server (latency and throughput)")
    add("--compare-transports", action="store_true", help="also run the other upstream transports")
    add("--compare-cache", action="store_true", help="also run the main pair with the cache on (misses and hits)")
    add("--temperature", type=float, help="send this temperature (<= 0.5: the cache-on runs look up semantically)")
    add("--results-dir", type=Path, default=_ROOT / "bench-results", help="JSON destination (default bench-results/)")
    add("--keep-logs", action="store_true", help="copy the gateway's request log and stderr into the results folder")
    add("--strict", action="store_true", help="exit 1 when a target fails or any response is not a 200")
    add("--litellm", default=os.environ.get("LITELLM_BIN"), help="a litellm executable: measure its proxy side by side")
    return parser.parse_args(argv)


def configs_from(args: argparse.Namespace) -> list[Config]:
    """The main configuration first (it alone gets the memory run), then the comparisons."""
    servers = [args.server] + ([_other(args.server, ("uvicorn", "granian"))] if args.compare_servers else [])
    transports = [args.transport] + ([t for t in _TRANSPORTS if t != args.transport] if args.compare_transports else [])
    configs = [Config(server, transport) for server in servers for transport in transports]
    configs[0] = Config(args.server, args.transport, measure_memory=args.memory_requests > 0)
    if args.compare_cache:
        configs.append(Config(args.server, args.transport, cache=True))
    return configs


def _other(value: str, pair: tuple[str, str]) -> str:
    return pair[1] if value == pair[0] else pair[0]


# --------------------------------------------------------------------- /proc reading


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        for child in children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: fields[0] is the state (field 3)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, all its threads, in seconds."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine (all cores) spent busy since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK_TCK  # guest time is already counted in user


@dataclass
class CpuUse:
    """CPU seconds used during a phase: per named process, and by the whole machine."""

    seconds: dict[str, float | None]
    machine_s: float
    elapsed_s: float

    def percent_of_one_core(self) -> dict[str, float | None]:
        """Per process; ``other_processes`` is the rest of the machine (the noise)."""
        pct = {name: None if s is None else round(s / self.elapsed_s * 100, 1) for name, s in self.seconds.items()}
        ours = sum(sec for sec in self.seconds.values() if sec is not None)
        pct["other_processes"] = round(max(0.0, self.machine_s - ours) / self.elapsed_s * 100, 1)
        workers = self._all_workers()
        if workers is not None:
            pct["gateway_workers_all"] = round(workers / self.elapsed_s * 100, 1)
        pct["machine"] = round(self.machine_s / self.elapsed_s * 100, 1)
        return pct

    def ms_per_request(self, requests: int) -> dict[str, float | None]:
        """CPU time per request (warm-up included): other load disturbs it less than latency."""
        if requests <= 0:
            return {}
        per_request = {name: None if s is None else round(s / requests * 1000, 3) for name, s in self.seconds.items()}
        workers = self._all_workers()
        if workers is not None:
            per_request["gateway_workers_all"] = round(workers / requests * 1000, 3)
        return per_request

    def _all_workers(self) -> float | None:
        """The workers' CPU together, when there are several."""
        workers = [s for name, s in self.seconds.items() if name.startswith("gateway_worker_") and s is not None]
        first = self.seconds.get("gateway_worker")
        return None if not workers or first is None else first + sum(workers)


@dataclass
class CpuWatch:
    """Measures :class:`CpuUse` between start() and stop()."""

    pids: dict[str, int]
    _start: dict[str, float | None] = field(default_factory=dict)
    _machine0: float = 0.0
    _t0: float = 0.0

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine0 = machine_busy_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> CpuUse:
        elapsed = time.perf_counter() - self._t0
        machine = machine_busy_seconds() - self._machine0
        seconds: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), cpu_seconds(pid)
            seconds[name] = None if before is None or after is None else after - before
        return CpuUse(seconds, machine, elapsed)


# ----------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    seen_descendants: set[int] = field(default_factory=set)
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def worker_pids(self) -> list[int]:
        """The Python processes serving requests: the server's worker children (granian forks
        one even for 1 worker), else the main process (uvicorn with 1 worker)."""
        self.seen_descendants.update(descendants(self.process.pid))
        workers = [
            pid for pid in children(self.process.pid)
            if not any(name in command_line(pid) for name in ("redis-server", "resource_tracker"))
        ]  # fmt: skip
        return sorted(workers) or [self.process.pid]

    def redis_pid(self) -> int | None:
        redis = [pid for pid in children(self.process.pid) if "redis-server" in command_line(pid)]
        return redis[0] if redis else None

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-_STDERR_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> dict[str, Any]:
        """SIGTERM and 20 s to shut down, then SIGKILL to its process group. Idempotent.

        Returns the exit code and the processes of its group that outlived it (which are
        then killed): the gateway should stop its worker and its Redis itself."""
        if self.stopped:
            return {"exit_code": self.process.returncode, "left_behind": []}
        self.stopped = True
        self.seen_descendants.update(descendants(self.process.pid))
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                _kill_group(self.process.pid)
                self.process.wait()
        left = self._left_behind(grace_s=1.0)
        left_behind = [f"{pid} {command_line(pid)}" for pid in left]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return {"exit_code": self.process.returncode, "left_behind": left_behind}

    def _left_behind(self, grace_s: float) -> list[int]:
        """Its descendants still running in its process group once ``grace_s`` has passed."""
        deadline = time.monotonic() + grace_s
        while True:
            left = [pid for pid in sorted(self.seen_descendants) if _running_in_group(pid, self.process.pid)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


def _running_in_group(pid: int, pgid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid and bool(command_line(pid))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_policy(path: Path, upstream: SimulatedUpstream, cache: bool) -> None:
    """Route ``fast`` → the simulated model; auth off; request log on, to stdout."""
    path.write_text(
        f"""version: 1
pair: {{small: small, large: large}}
models:
  small:
    provider: openai
    base_url: {upstream.url}
    upstream_model: {UPSTREAM_MODEL}
    price: {{input: 0.20, output: 0.20}}
    tier: small
    simulated: true
  large:
    provider: openai
    base_url: {upstream.url}
    upstream_model: large
    price: {{input: 2.50, output: 10.00}}
    tier: large
    simulated: true
routes:
  {ROUTE}: {{model: small}}
auth: {{mode: none}}
request_log: {{enabled: true, stdout: true}}
cache: {{enabled: {"true" if cache else "false"}}}
"""
    )


def start_gateway(config: Config, workdir: Path, policy: Path, workers: int, timeout_s: float = 60.0) -> GatewayProcess:
    port = free_port()
    stdout_path, stderr_path = workdir / f"{config.label}.stdout.jsonl", workdir / f"{config.label}.stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # the gateway starts its own Redis
    env.update(GATEWAY_UPSTREAM_TRANSPORT=config.transport, PYTHONPATH=_pythonpath(env))
    command = [
        sys.executable, "-m", "gateway", "serve", "--policies", str(policy), "--host", HOST, "--port", str(port),
        "--workers", str(workers), "--server", config.server, "--data-dir", str(workdir / f"data-{config.label}"),
    ]  # fmt: skip
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=_ROOT, start_new_session=True
        )
    gateway = GatewayProcess(process, port, stdout_path, stderr_path)
    try:
        _wait_ready(gateway, time.monotonic() + timeout_s)
    except BaseException:
        gateway.stop()
        raise
    return gateway


def _pythonpath(env: dict[str, str]) -> str:
    current = env.get("PYTHONPATH")
    return str(_ROOT) if not current else f"{_ROOT}{os.pathsep}{current}"


def _wait_ready(gateway: GatewayProcess, deadline: float) -> None:
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n{gateway.stderr_tail()}")
        try:
            with _OPENER.open(f"{gateway.url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway did not become ready in time:\n{gateway.stderr_tail()}")


def upstream_chat_requests(upstream: SimulatedUpstream) -> int | None:
    """The simulated upstream's own count of chat requests (``/_control/stats``)."""
    try:
        with _OPENER.open(f"{upstream.root_url}/_control/stats", timeout=5) as response:
            return int(msgspec.json.decode(response.read())["chat_requests"])
    except (urllib.error.URLError, OSError, KeyError, ValueError, msgspec.DecodeError):
        return None


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the ExitStack cleans up either way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------- requests


def chat_body(model: str, prompt: str = PROMPT, temperature: float | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        "stream": False,
    }
    if temperature is not None:
        body["temperature"] = temperature
    return msgspec.json.encode(body)


def make_target(
    port: int, model: str, *, gateway: bool, unique: int = 0, temperature: float | None = None
) -> HttpTarget:
    """The request, pre-encoded; ``unique`` > 0: that many requests with distinct prompts."""
    if unique:
        salt = secrets.token_hex(4)
        bodies = tuple(chat_body(model, f"{PROMPT} [{salt}-{i}]", temperature) for i in range(unique))
    else:
        bodies = (chat_body(model, temperature=temperature),)
    payloads = tuple(build_post(HOST, port, CHAT_PATH, body) for body in bodies)
    if not gateway:
        return HttpTarget(HOST, port, payloads)
    return HttpTarget(HOST, port, payloads, number_header=OVERHEAD_HEADER, count_header=CACHE_HEADER)


# ---------------------------------------------------------------------- measuring


def summarize(result: RunResult, cpu: CpuUse, upstream_calls: int | None = None) -> dict[str, Any]:
    latencies = sorted(result.latencies_ns)
    numbers = sorted(result.header_numbers)
    summary: dict[str, Any] = {
        "completed": result.completed,
        "warmup_completed": result.warmup_completed,
        "non_200": result.non_200,
        "statuses": {str(status): count for status, count in sorted(result.statuses.items())},
        "errors": dict(result.errors),
        "aborted": result.aborted,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "mean_ms": _ms(sum(latencies) / len(latencies)) if latencies else None,
        "max_ms": _ms(latencies[-1]) if latencies else None,
        "elapsed_s": round(result.elapsed_s, 3),
        "requests_per_s": round(result.requests_per_s, 1),
        "cpu_pct_of_one_core": cpu.percent_of_one_core(),
        "cpu_ms_per_request": cpu.ms_per_request(result.completed + result.warmup_completed),
    }
    if numbers:
        summary["overhead_header_p50_ms"] = round(percentile(numbers, 50), 3)
        summary["overhead_header_p99_ms"] = round(percentile(numbers, 99), 3)
    if result.header_counts:
        summary["cache_header"] = dict(result.header_counts)
    if upstream_calls is not None:
        summary["upstream_calls_incl_warmup"] = upstream_calls
    return summary


def _ms(ns: float) -> float | None:
    return None if ns != ns else round(ns / 1e6, 3)  # nan → None


@dataclass
class Bench:
    """Runs the phases of one configuration on one event loop."""

    runner: asyncio.Runner
    settings: BenchSettings
    upstream: SimulatedUpstream

    def _phase(
        self, coro_factory: Callable[[], Any], cpu_pids: dict[str, int], request_log: Path | None = None
    ) -> dict[str, Any]:
        """One measured run; with ``request_log``, the timings its lines give for this phase."""
        watch = CpuWatch(cpu_pids)
        calls0 = upstream_chat_requests(self.upstream)
        log0 = _size(request_log)
        watch.start()
        result: RunResult = self.runner.run(coro_factory())
        cpu = watch.stop()
        calls1 = upstream_chat_requests(self.upstream)
        calls = None if calls0 is None or calls1 is None else calls1 - calls0
        summary = summarize(result, cpu, calls)
        if request_log is not None:
            time.sleep(_LOG_FLUSH_S)  # the gateway writes its log from a background thread
            summary["request_log_timings"] = log_timings(request_log, log0, _size(request_log))
        return summary

    def latency_and_throughput(
        self, target: Callable[[int], HttpTarget], cpu_pids: dict[str, int], request_log: Path | None = None
    ) -> dict[str, Any]:
        """``target(n)`` gives the target for a phase of about n requests (for unique prompts)."""
        s = self.settings
        sequential = target(s.sequential_warmup + s.sequential_requests)
        concurrent = target(int(UNIQUE_PROMPTS_PER_S * (s.duration_s + s.warmup_s)))
        return {
            "sequential": self._phase(
                lambda: run_sequential(sequential, s.sequential_requests, s.sequential_warmup), cpu_pids, request_log
            ),
            "concurrent": self._phase(
                lambda: run_closed_loop(concurrent, s.connections, duration_s=s.duration_s, warmup_s=s.warmup_s),
                cpu_pids,
            ),
        }

    def memory(self, gateway: GatewayProcess, workers: list[int], cpu_pids: dict[str, int]) -> dict[str, Any]:
        """RSS of the worker (the sum over the workers when there are several)."""
        s = self.settings
        samples: list[dict[str, Any]] = [{"requests": 0, "rss_mib": _total_rss(workers)}]

        def sample(done: int) -> None:
            samples.append({"requests": done, "rss_mib": _total_rss(workers)})

        target = make_target(gateway.port, ROUTE, gateway=True, temperature=s.temperature)
        run = self._phase(
            lambda: run_closed_loop(
                target, s.connections, total=s.memory_requests, progress_every=s.memory_every, on_progress=sample
            ),
            cpu_pids,
        )
        if samples[-1]["requests"] != run["completed"]:
            sample(run["completed"])
        return {"worker_pids": workers, "samples": samples, **_drift(samples), "run": run}


def _total_rss(pids: list[int]) -> float | None:
    values = [rss_mib(pid) for pid in pids]
    return None if any(v is None for v in values) else round(sum(v for v in values if v is not None), 1)


def _drift(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    first = samples[1]["rss_mib"] if len(samples) > 2 else None
    last = samples[-1]["rss_mib"]
    if first is None or last is None:
        return {"rss_after_first_mib": None, "rss_end_mib": None, "drift_pct": None}
    return {"rss_after_first_mib": first, "rss_end_mib": last, "drift_pct": round((last - first) / first * 100, 2)}


# ------------------------------------------------------------------- request log


def _size(path: Path | None) -> int:
    try:
        return 0 if path is None else path.stat().st_size
    except OSError:
        return 0


class _TimingLine(msgspec.Struct):
    event: str | None = None
    latency_ms: float | None = None
    overhead_ms: float | None = None


def log_timings(path: Path, start: int, end: int) -> dict[str, Any]:
    """Medians of the gateway's own timings in the request-log lines between two offsets.

    ``latency_ms`` is the gateway's time from the request's start in the handler to its
    end; ``overhead_ms`` the part not spent waiting on the upstream; their difference
    the upstream call as the gateway saw it (its HTTP client included). Warm-up included.
    """
    with path.open("rb") as log:
        log.seek(start)
        chunk = log.read(max(0, end - start))
    decoder = msgspec.json.Decoder(_TimingLine)
    latency: list[float] = []
    overhead: list[float] = []
    for raw in chunk.splitlines():
        try:
            line = decoder.decode(raw)
        except msgspec.DecodeError:
            continue
        if line.event == "request" and line.latency_ms is not None and line.overhead_ms is not None:
            latency.append(line.latency_ms)
            overhead.append(line.overhead_ms)
    upstream = sorted(a - b for a, b in zip(latency, overhead, strict=True))
    latency.sort()
    overhead.sort()
    return {
        "lines": len(latency),
        "latency_p50_ms": _round3(percentile(latency, 50)),
        "overhead_p50_ms": _round3(percentile(overhead, 50)),
        "upstream_wait_p50_ms": _round3(percentile(upstream, 50)),
    }


def _round3(value: float) -> float | None:
    return None if value != value else round(value, 3)


class _LogLine(msgspec.Struct):
    event: str | None = None
    status: int | None = None
    cache: str | None = None
    retries: int | None = 0
    fallback_used: bool | None = False


def request_log_summary(path: Path) -> dict[str, Any]:
    """Counts the gateway's request-log lines: one per request, warm-ups included."""
    decoder = msgspec.json.Decoder(_LogLine)
    statuses: Counter[int] = Counter()
    cache: Counter[str] = Counter()
    lines = other = retried = fallbacks = unparsable = 0
    with path.open("rb") as log:
        for raw in log:
            lines += 1
            try:
                line = decoder.decode(raw)
            except msgspec.DecodeError:
                unparsable += 1
                continue
            if line.event != "request":
                other += 1
                continue
            statuses[line.status or 0] += 1
            cache[line.cache or "?"] += 1
            retried += bool(line.retries)
            fallbacks += bool(line.fallback_used)
    return {
        "destination": f"file ({path.name}: the gateway's stdout)",
        "file_bytes": path.stat().st_size,
        "lines": lines,
        "request_lines": sum(statuses.values()),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "cache": dict(cache),
        "retried": retried,
        "fallback_used": fallbacks,
        "other_events": other,
        "unparsable_lines": unparsable,
    }


# -------------------------------------------------------------------------- a run


def run_config(bench: Bench, config: Config, workdir: Path, cleanup: ExitStack) -> dict[str, Any]:
    upstream, settings = bench.upstream, bench.settings
    loadgen, upstream_pid = os.getpid(), upstream.process.pid
    _say(f"[{config.label}] direct baseline")
    direct_pids = {"loadgen": loadgen, "upstream": upstream_pid}
    direct_target = make_target(upstream.port, UPSTREAM_MODEL, gateway=False, temperature=settings.temperature)
    direct = bench.latency_and_throughput(lambda n: direct_target, direct_pids)
    policy = workdir / f"policy-{config.label}.yaml"
    write_policy(policy, upstream, config.cache)
    _say(f"[{config.label}] starting the gateway ({settings.workers} worker(s))")
    gateway = start_gateway(config, workdir, policy, settings.workers)
    cleanup.callback(gateway.stop)
    workers = gateway.worker_pids()
    worker = workers[0]
    pids = {**direct_pids, "gateway_worker": worker, "gateway_redis": gateway.redis_pid() or -1}
    pids.update({f"gateway_worker_{i}": pid for i, pid in enumerate(workers[1:], start=2)})
    if worker != gateway.process.pid:
        pids["gateway_main"] = gateway.process.pid
    _say(f"[{config.label}] gateway main pid {gateway.process.pid}, worker pid {worker}; measuring")
    through = {variant: _gateway_variant(bench, gateway, variant, pids) for variant in config.variants}
    memory = None
    if config.measure_memory:
        _say(f"[{config.label}] memory: {settings.memory_requests} requests over {settings.connections} connections")
        memory = bench.memory(gateway, workers, pids)
    workers_after = gateway.worker_pids()
    stopped = gateway.stop()
    return {
        "label": config.label,
        "server": config.server,
        "transport": config.transport,
        "cache": config.cache,
        "workers": settings.workers,
        "gateway_main_pid": gateway.process.pid,
        "gateway_worker_pids": workers,
        "gateway_worker_pids_at_end": workers_after,
        "worker_replaced": workers_after != workers,
        "gateway_exit_code": stopped["exit_code"],
        "left_behind_after_sigterm": stopped["left_behind"],
        "direct": direct,
        "gateway": through,
        "overhead": {variant: _overhead(direct, phases) for variant, phases in through.items()},
        "memory": memory,
        "request_log": request_log_summary(gateway.stdout_path),
        "gateway_stderr_tail": gateway.stderr_tail(),
    }


def _gateway_variant(bench: Bench, gateway: GatewayProcess, variant: str, pids: dict[str, int]) -> dict[str, Any]:
    unique, temperature = variant == "cache_miss", bench.settings.temperature
    return bench.latency_and_throughput(
        lambda n: make_target(gateway.port, ROUTE, gateway=True, unique=n if unique else 0, temperature=temperature),
        pids,
        gateway.stdout_path,
    )


def _overhead(direct: dict[str, Any], through: dict[str, Any]) -> dict[str, Any]:
    d, g = direct["sequential"], through["sequential"]
    direct_rps = direct["concurrent"]["requests_per_s"]
    return {
        "p50_ms": _diff(g["p50_ms"], d["p50_ms"]),
        "p99_ms": _diff(g["p99_ms"], d["p99_ms"]),
        "mean_ms": _diff(g["mean_ms"], d["mean_ms"]),
        "header_p50_ms": g.get("overhead_header_p50_ms"),
        "header_p99_ms": g.get("overhead_header_p99_ms"),
        "throughput_ratio": round(through["concurrent"]["requests_per_s"] / direct_rps, 3) if direct_rps else None,
        "breakdown_p50_ms": _breakdown(d, g),
    }


def _breakdown(direct: dict[str, Any], through: dict[str, Any]) -> dict[str, float | None] | None:
    """Where the 1-connection overhead goes, from medians (so the parts add up only roughly):
    ``server_and_framework``: client-observed gateway latency - the gateway's own latency
    (the ASGI server, the framework, the extra loopback hop); ``pipeline``: the gateway's
    ``overhead_ms``; ``upstream_client``: the upstream call as the gateway waited for it
    - the direct latency (its HTTP client stack)."""
    timings = through.get("request_log_timings")
    if not timings or timings["latency_p50_ms"] is None:
        return None
    return {
        "server_and_framework": _diff(through["p50_ms"], timings["latency_p50_ms"]),
        "pipeline": timings["overhead_p50_ms"],
        "upstream_client": _diff(timings["upstream_wait_p50_ms"], direct["p50_ms"]),
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def evaluate_targets(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    for variant, overhead in run["overhead"].items():
        prefix = "" if variant == "proxy" else f"{variant}: "
        rps = run["gateway"][variant]["concurrent"]["requests_per_s"]
        checks[f"{prefix}overhead_p50_ms"] = _check(overhead["p50_ms"], TARGETS["overhead_p50_ms"], "<=")
        checks[f"{prefix}overhead_p99_ms"] = _check(overhead["p99_ms"], TARGETS["overhead_p99_ms"], "<=")
        checks[f"{prefix}requests_per_s"] = _check(rps, TARGETS["requests_per_s"], ">=")
    if run["memory"] is not None:
        drift = run["memory"]["drift_pct"]
        checks["rss_drift_pct"] = _check(None if drift is None else abs(drift), TARGETS["rss_drift_pct"], "<=")
    return checks


def _check(value: float | None, limit: float, op: str) -> dict[str, Any]:
    ok = value is not None and (value <= limit if op == "<=" else value >= limit)
    return {"value": value, "target": f"{op} {limit:g}", "pass": ok}


def phases_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    phases = {"direct, 1 conn": run["direct"]["sequential"], "direct, N conn": run["direct"]["concurrent"]}
    for variant, both in run["gateway"].items():
        phases[f"gateway {variant}, 1 conn"] = both["sequential"]
        phases[f"gateway {variant}, N conn"] = both["concurrent"]
    if run["memory"] is not None:
        phases["memory run, N conn"] = run["memory"]["run"]
    return phases


def problems_of(run: dict[str, Any]) -> int:
    """Non-200 responses, connection errors and timeouts over every phase."""
    return sum(phase["non_200"] + sum(phase["errors"].values()) for phase in phases_of(run).values())


# ------------------------------------------------------------------------ output


def _f(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _phase_lines(name: str, phase: dict[str, Any]) -> list[str]:
    cpu = ", ".join(f"{k} {_f(v, '%', 0)}" for k, v in phase["cpu_pct_of_one_core"].items() if v is not None)
    per_request = ", ".join(
        f"{k} {_f(v)}" for k, v in phase["cpu_ms_per_request"].items() if v is not None and k != "gateway_main"
    )
    lines = [
        f"  {name:<26} n={phase['completed']:<7} p50 {_f(phase['p50_ms'])}  p99 {_f(phase['p99_ms'])}"
        f"  mean {_f(phase['mean_ms'])} ms  {_f(phase['requests_per_s'], ' req/s', 0)}"
        f"  non-200 {phase['non_200']}  errors {sum(phase['errors'].values())}",
        f"  {'':<26} cpu % of a core: {cpu}",
        f"  {'':<26} cpu ms per request (warm-up included): {per_request}",
    ]
    extra = []
    if "upstream_calls_incl_warmup" in phase:
        sent = phase["completed"] + phase["warmup_completed"]
        extra.append(f"upstream calls {phase['upstream_calls_incl_warmup']} for {sent} sent")
    if "cache_header" in phase:
        extra.append(f"x-gateway-cache {phase['cache_header']}")
    if extra:
        lines.append(f"  {'':<26} " + "; ".join(extra))
    if phase.get("aborted"):
        lines.append(f"    ABORTED: {phase['aborted']}")
    if phase["non_200"] or phase["errors"]:
        lines.append(f"    statuses {phase['statuses']} errors {phase['errors']}")
    return lines


def print_run(run: dict[str, Any]) -> None:
    cache = "on" if run["cache"] else "off"
    print(f"\n== {run['label']}: {run['server']}, {run['transport']} transport, cache {cache}, {run['workers']} "
          f"worker(s); worker pid(s) {run['gateway_worker_pids']} (main {run['gateway_main_pid']}) ==")  # fmt: skip
    for name, phase in phases_of(run).items():
        print("\n".join(_phase_lines(name, phase)))
    for variant, o in run["overhead"].items():
        print(f"  overhead {variant} (gateway - direct, 1 conn): p50 {_f(o['p50_ms'])}  p99 {_f(o['p99_ms'])}"
              f"  mean {_f(o['mean_ms'])} ms;  x-gateway-overhead-ms p50 {_f(o['header_p50_ms'])}"
              f" p99 {_f(o['header_p99_ms'])} ms;  N-conn throughput gateway/direct "
              f"{_f(o['throughput_ratio'], '', 2)}")  # fmt: skip
        parts = o["breakdown_p50_ms"]
        if parts:
            print(f"    p50 overhead, roughly: server+framework {_f(parts['server_and_framework'])}, gateway pipeline "
                  f"{_f(parts['pipeline'])}, upstream HTTP client {_f(parts['upstream_client'])} ms")  # fmt: skip
    _print_memory(run["memory"])
    log = run["request_log"]
    print(f"  request log: {log['destination']}, {log['request_lines']} request lines, statuses {log['statuses']}, "
          f"cache {log['cache']}, retried {log['retried']}, {log['file_bytes'] / 1e6:.1f} MB")  # fmt: skip
    if run["worker_replaced"]:
        print(f"  WARNING: a worker was replaced ({run['gateway_worker_pids']} -> {run['gateway_worker_pids_at_end']})")
    print(f"  gateway exit code after SIGTERM: {run['gateway_exit_code']}")
    for leftover in run["left_behind_after_sigterm"]:
        print(f"  WARNING: still running after the gateway exited (killed by the bench): {leftover}")
    for name, check in run["targets"].items():
        print(f"  target {name:<28} {_f(check['value']):>9} {check['target']:<9} {'PASS' if check['pass'] else 'FAIL'}")


def _print_memory(memory: dict[str, Any] | None) -> None:
    if memory is None:
        return
    trail = " ".join(_f(s["rss_mib"], "", 1) for s in memory["samples"])
    print(f"  worker RSS MiB (pids {memory['worker_pids']}) at 0, then every sample: {trail}")
    print(f"  RSS after the first sample {_f(memory['rss_after_first_mib'], ' MiB', 1)}, at the end "
          f"{_f(memory['rss_end_mib'], ' MiB', 1)}: drift {_f(memory['drift_pct'], ' %', 2)}")  # fmt: skip


def print_comparison(runs: list[dict[str, Any]]) -> None:
    if len(runs) < 2:
        return
    print(
        "\n== comparison (ms; each row's direct baseline measured right before it;"
        " cpu = gateway worker CPU ms per request) =="
    )
    print(f"{'config / variant':<34}{'dir p50':>8}{'gw p50':>8}{'ovh p50':>8}{'ovh p99':>8}{'hdr p50':>8}"
          f"{'dir rps':>8}{'gw rps':>8}{'cpu 1c':>8}{'cpu Nc':>8}{'bad':>5}")  # fmt: skip
    for run in runs:
        d = run["direct"]
        for variant, g in run["gateway"].items():
            o = run["overhead"][variant]
            print(
                f"{run['label'] + ' / ' + variant:<34}"
                f"{_f(d['sequential']['p50_ms']):>8}{_f(g['sequential']['p50_ms']):>8}"
                f"{_f(o['p50_ms']):>8}{_f(o['p99_ms']):>8}{_f(o['header_p50_ms']):>8}"
                f"{_f(d['concurrent']['requests_per_s'], '', 0):>8}{_f(g['concurrent']['requests_per_s'], '', 0):>8}"
                f"{_f(_worker_cpu(g['sequential'])):>8}{_f(_worker_cpu(g['concurrent'])):>8}{problems_of(run):>5}"
            )


def _worker_cpu(phase: dict[str, Any]) -> float | None:
    per_request = phase["cpu_ms_per_request"]
    value: float | None = per_request.get("gateway_workers_all", per_request.get("gateway_worker"))
    return value


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_files": None if status is None else status.splitlines()}


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": event_loop_factory().__module__,
    }


def write_json(results_dir: Path, stamp: str, report: dict[str, Any]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"gateway-{stamp}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    return path


def keep_logs(workdir: Path, results_dir: Path, stamp: str) -> None:
    target = results_dir / f"gateway-{stamp}-logs"
    target.mkdir(parents=True, exist_ok=True)
    for path in workdir.glob("*.std*"):
        shutil.copy2(path, target / path.name)


# -------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = BenchSettings(
        args.sequential_requests, args.sequential_warmup, args.connections, args.duration, args.warmup_seconds,
        args.memory_requests, args.memory_every, args.workers, args.results_dir, args.keep_logs, args.temperature,
    )  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {
        "timestamp": stamp, "machine": machine_info(), "git": git_state(), "settings": _settings_json(settings),
        "targets": TARGETS,
    }  # fmt: skip
    commit = (report["git"]["commit"] or "unknown")[:12]
    modified = len(report["git"]["modified_files"] or [])
    print(f"gateway benchmark {stamp}: {os.cpu_count()} cores, load average {os.getloadavg()}; "
          f"commit {commit}, {modified} modified tracked file(s)")  # fmt: skip
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with ExitStack() as cleanup, terminate_on_sigterm():
        workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        if settings.keep_logs:
            cleanup.callback(keep_logs, workdir, settings.results_dir, stamp)
        upstream = start_simulated_upstream(UPSTREAM_MODEL)
        cleanup.callback(upstream.stop)
        runner = cleanup.enter_context(asyncio.Runner(loop_factory=event_loop_factory()))
        bench = Bench(runner, settings, upstream)
        for config in configs_from(args):
            run = run_config(bench, config, workdir, cleanup)
            run["targets"] = evaluate_targets(run)
            runs.append(run)
            print_run(run)
        report["runs"] = runs
        if args.litellm:
            _say(f"LiteLLM side by side ({args.litellm})")
            direct_target = make_target(upstream.port, UPSTREAM_MODEL, gateway=False)
            litellm = measure_litellm(
                bench,
                args.litellm,
                chat_body(ROUTE),
                ROUTE,
                UPSTREAM_MODEL,
                direct_target,
                free_port(),
                workdir,
                cleanup,
            )
            report["litellm"] = litellm
            report["side_by_side"] = side_by_side(runs[0], litellm)
            print("side by side with LiteLLM:", msgspec.json.encode(report["side_by_side"]).decode())
        report["machine"]["loadavg_at_end"] = os.getloadavg()
        report["wall_s"] = round(time.monotonic() - started, 1)
        print_comparison(runs)
        path = write_json(settings.results_dir, stamp, report)
        print(f"\nload average at the end {os.getloadavg()}; took {report['wall_s']} s\nJSON: {path}")
    failed = any(not check["pass"] for run in runs for check in run["targets"].values())
    return 1 if args.strict and (failed or any(problems_of(run) for run in runs)) else 0


def _settings_json(settings: BenchSettings) -> dict[str, Any]:
    return {
        "sequential_requests": settings.sequential_requests,
        "sequential_warmup": settings.sequential_warmup,
        "connections": settings.connections,
        "duration_s": settings.duration_s,
        "warmup_s": settings.warmup_s,
        "memory_requests": settings.memory_requests,
        "memory_every": settings.memory_every,
        "workers": settings.workers,
        "temperature": settings.temperature,
    }


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\n[bench] interrupted; the processes it started were stopped", file=sys.stderr)
        sys.exit(130)
