"""``python -m gateway serve``: the embedded Redis and simulated upstreams it may start, then the ASGI server."""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.cli._parsers import Subcommands
from gateway.config.kept import keep_policy
from gateway.config.loader import LoadedPolicy, load_policy, request_log_problem
from gateway.drain import DEFAULT_DRAIN_S
from gateway.errors import ConfigError
from gateway.inference import MAX_INTRA_OP_THREADS, intra_op_threads_for
from gateway.services.redis_server import DEFAULT_MAXMEMORY, RedisServerNotFound
from gateway.settings import HEAD_TIMEOUT_VARIABLE, head_timeout_s

if TYPE_CHECKING:
    from gateway.config.schema import Policy
    from gateway.simulated import SimulatedUpstream

__all__ = ["register", "run"]


def register(commands: Subcommands) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--policies", default="policies.yaml", help="policy file (default: ./policies.yaml)")
    serve.add_argument("--host", type=_host, default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--workers", type=_at_least_one, default=1)
    serve.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default="uvicorn",
        help="ASGI server (default uvicorn: on uvloop and httptools, the lower overhead; see README)",
    )
    serve.add_argument(
        "--simulate-missing",
        action="store_true",
        help="start simulated upstreams for SMALL_MODEL_URL / LARGE_MODEL_URL when they are unset "
        "(a source checkout only: the built package leaves the simulator out)",
    )
    serve.add_argument(
        "--drain-s",
        type=_seconds,
        default=DEFAULT_DRAIN_S,
        help=f"after SIGTERM or Ctrl-C, end streams still open after this many seconds with an in-band error (default {DEFAULT_DRAIN_S:g})",
    )
    serve.add_argument(
        "--allow-no-auth",
        action="store_true",
        help="serve a policy with auth off on an address other than loopback (default: refused; "
        "also GATEWAY_ALLOW_NO_AUTH=1)",
    )
    serve.add_argument(
        "--onnx-threads",
        type=_at_least_one,
        default=None,
        help="onnxruntime threads for each of a worker's models (the router, the cache's verifier); "
        f"default: the cores over the workers, at most {MAX_INTRA_OP_THREADS}",
    )
    serve.add_argument(
        "--data-dir",
        default=".gateway",
        help="the gateway's own state: the embedded Redis's data, per-worker metrics, the last accepted policy",
    )
    serve.add_argument(
        "--redis-maxmemory",
        type=_memory_size,
        default=DEFAULT_MAXMEMORY,
        help=f"memory bound of the embedded Redis; cache entries are evicted first (default {DEFAULT_MAXMEMORY})",
    )
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for stop in _STOP_SIGNALS:  # first thing: see _StartStops
        signal.signal(stop, _START_STOPS.take)
    try:
        return _start_and_serve(args)
    except _Stopped as stopped:
        _say(
            f"{signal.Signals(stopped.signum).name} before serving: stopped (what the gateway had started is stopped too)"
        )
        return 0
    finally:
        # Python's finalization puts back the default action of every signal a Python function
        # handles: a second SIGTERM or Ctrl-C as serve exited ended it by that signal (t195: exit
        # -15 in 8 of 10 runs where the first stop had said 0). Whatever it stopped is stopped.
        for stop in _STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)


def _start_and_serve(args: argparse.Namespace) -> int:
    from gateway.services.parent_death import SUPERVISOR_PID
    from gateway.services.redis_server import start_embedded_redis

    # SIGHUP's and SIGUSR1's default action ends a process: until the server (several workers)
    # or the worker (one process) puts its handler in place, a reload or a request log reopen
    # asked during start-up is ignored rather than fatal. The runtime checks the file once more
    # when its handler is in; the request log is opened fresh at the start anyway.
    for early in _WORKER_SIGNALS:
        signal.signal(early, signal.SIG_IGN)
    try:  # the workers read it: refused here, before anything starts, they never see a value they cannot use
        head_timeout_s(os.environ.get(HEAD_TIMEOUT_VARIABLE))
    except ValueError as exc:
        _say(str(exc))
        return 2
    with ExitStack() as cleanup:
        holder = _claim_data_dir(args.data_dir, cleanup)
        if holder is not None:
            _say(
                f"another `gateway serve` (pid {holder}) uses --data-dir {args.data_dir}: its private Redis, "
                "metrics and kept policy are there, and a second one would break them; give this one its own "
                "--data-dir (make run DATA_DIR=...)"
            )
            return 2
        if args.simulate_missing and not _simulator_installed():
            _say(
                "--simulate-missing needs the simulator, which the installed package leaves out: "
                "run from a source checkout (pip install -e '.[simulator]'), or set SMALL_MODEL_URL and LARGE_MODEL_URL"
            )
            return 2
        taken = _listen_problem(args.host, args.port)
        if taken is not None:
            _say(f"--port {args.port}: {taken}")
            return 2
        if args.workers > 1:
            # Before anything here imports prometheus_client (gateway.runtime does): it picks its
            # multiprocess mode at import, and granian's workers are forked from this process (t122).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = _fresh_metrics_dir(args.data_dir)
        simulated: list[SimulatedUpstream] = []
        if args.simulate_missing:
            for role in ("small", "large"):
                variable = f"{role.upper()}_MODEL_URL"
                if not os.environ.get(variable):
                    from gateway.simulated import start_simulated_upstream

                    _START_STOPS.check()
                    upstream = start_simulated_upstream(role, waiting=_START_STOPS.waiting)
                    cleanup.callback(upstream.stop)
                    simulated.append(upstream)
                    os.environ[variable] = upstream.url
                    os.environ[f"{role.upper()}_MODEL_SIMULATED"] = "true"
                    _say(f"{variable} is unset: started a SIMULATED '{role}' upstream at {upstream.url}")
        kept: Path | None = None  # the policy last accepted, started on in place of the invalid file
        on_kept = False  # the file is still invalid: that policy is what is served
        from gateway.runtime import still_written

        # Read as a reload reads: once their writers are done. Never a half-written file kept as last accepted (t122).
        written = still_written(Path(args.policies))
        fallback = _policy_last_accepted(args.policies, args.data_dir, written) if written else None
        if fallback is not None:
            loaded, kept, on_kept = fallback
        else:
            if written:
                _say(f"{args.policies}: {'; '.join(written)}; nothing kept to start on meanwhile: waiting")
            while written:
                _START_STOPS.check()
                written = still_written(Path(args.policies))
            try:
                loaded = load_policy(args.policies)
            except ConfigError as exc:
                _say_problems(f"{exc.source} is invalid:", exc.problems, args.policies)
                fallback = _policy_last_accepted(args.policies, args.data_dir)
                if fallback is None:
                    if _only_unset_model_urls(exc.problems) and _simulator_installed():
                        _say(
                            "hint: --simulate-missing (what `make run` passes) starts simulated upstreams for "
                            "SMALL_MODEL_URL and LARGE_MODEL_URL when they are unset"
                        )
                    return 2
                loaded, kept, on_kept = fallback
        log = loaded.policy.request_log
        log_path = Path(args.policies).parent / log.path if log.enabled and log.path else None
        unwritable = request_log_problem(log_path) if log_path is not None else None
        if unwritable is not None:  # t41: said it was serving, then a 30-line traceback and exit 3
            _say(f"request_log.path {log_path}: {unwritable}")
            return 2
        if loaded.policy.auth.mode == "none" and not _loopback(args.host) and not _open_allowed(args):
            _say(
                f"auth is off and --host {args.host} would let anyone who reaches this machine spend the "
                "upstreams' keys: turn auth on (auth: {mode: keys}; `gateway keys new`), listen on 127.0.0.1, "
                "or pass --allow-no-auth (GATEWAY_ALLOW_NO_AUTH=1) when a proxy in front authenticates"
            )
            return 2
        if not os.environ.get("REDIS_URL"):
            try:
                _START_STOPS.check()
                redis = start_embedded_redis(
                    os.path.join(args.data_dir, "redis"), maxmemory=args.redis_maxmemory, waiting=_START_STOPS.waiting
                )
                cleanup.callback(redis.stop)
            except RedisServerNotFound:
                # As with a Redis that is down: requests are served, without the cache and limits.
                _say(
                    "no Redis available: REDIS_URL is unset and the embedded Redis is not installed "
                    "(pip install 'llm-gateway[embedded-redis]', or set REDIS_URL); serving without the cache and limits"
                )
            except RuntimeError as exc:  # it would not start (an invalid --redis-maxmemory, a folder it cannot use)
                _say(f"the private Redis did not start: {exc}")
                return 2
            else:
                redis.supervise(_say)
                os.environ["REDIS_URL"] = redis.url
                _say(
                    f"REDIS_URL is unset: started a private Redis 8 on {redis.display_url}, at most "
                    f"{args.redis_maxmemory} (data in {redis.data_dir}; restarted if it dies)"
                )
        else:
            _say("using Redis at REDIS_URL")
        if on_kept:  # said once the checks above have passed: it would not serve otherwise (t121)
            _say(
                f"{args.policies} {'is still open for writing' if written else 'is invalid'}: serving the policy "
                f"last accepted, version {loaded.version}, from {kept}, until the file's next valid edit "
                "(/readyz and a policy_rejected log line show the rejection)"
            )
        policy = loaded.policy
        for upstream in simulated:  # each refuses a prompt its model's window cannot hold, as the model's server would
            try:
                upstream.set_windows(_windows_at(policy, upstream.url))
            except (OSError, RuntimeError) as exc:
                _say(
                    f"warning: the simulated '{upstream.name}' upstream took no context windows ({exc}): it answers any prompt"
                )
        auth = (
            "ON (API keys required)" if policy.auth.mode == "keys" else "OFF (any client may call; for local use only)"
        )
        _say(f"policy {loaded.source} version {loaded.version}; auth {auth}")
        for warning in loaded.warnings:
            _say(f"warning: {warning}")
        os.environ["GATEWAY_POLICIES"] = os.path.abspath(args.policies)
        os.environ["GATEWAY_POLICY_LAST_GOOD"] = (
            str(kept)  # as it is: each worker starts on it, and says the file was rejected
            if kept is not None
            else _keep_policy_in_force(loaded.text, loaded.key_file_text, args.policies, args.data_dir)
        )
        os.environ["GATEWAY_DRAIN_S"] = str(args.drain_s)
        # what every worker writes the request log with until a restart, a dead one's replacement too (t149)
        os.environ["GATEWAY_REQUEST_LOG_AT_START"] = msgspec.json.encode(log).decode()
        os.environ["GATEWAY_ONNX_THREADS"] = str(args.onnx_threads or intra_op_threads_for(args.workers))
        if not _loopback(args.host) and not _open_allowed(args):  # a reload to auth off is refused too
            os.environ["GATEWAY_AUTH_REQUIRED"] = "1"
        if args.server == "granian" or args.workers > 1:  # the workers are this process's children
            os.environ[SUPERVISOR_PID] = str(os.getpid())
        if args.server == "granian" or args.workers == 1:
            _keep_stdout_for_the_request_log()
        else:  # uvicorn spawns its workers, which inherit no other descriptor: each one splits its own
            os.environ["GATEWAY_REQUEST_LOG_FD"] = "split"

        def banner(port: int) -> None:  # the port bound: --port 0 lets the OS choose (t71)
            _say(
                f"serving the OpenAI and Anthropic APIs at http://{_url_host(args.host)}:{port}/v1 "
                f"with {args.workers} worker(s) on {args.server}"
            )

        _START_STOPS.check()
        _run_server(args.server, args.host, args.port, args.workers, kill_after_s=args.drain_s + 5, listening=banner)
        # Served, logged and billed: one more Ctrl-C (or SIGTERM) would only cut short the stops below
        # with a traceback; the embedded Redis ends with this process in any case (end_with_parent).
        for stop in _STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        _say(
            f"stopped: requests finished, or were ended in-band at the {args.drain_s:g}s drain deadline "
            "(the log says which); stopping what the gateway started"
        )
    return 0


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""A stop, with a drain once serving: Ctrl-C is taken as SIGTERM is."""


class _Stopped(SystemExit):
    """A stop signal that came before the server took the signals: a normal stop, exit 0."""

    def __init__(self, signum: int) -> None:
        super().__init__(0)
        self.signum = signum


class _StartStops:
    """SIGTERM and SIGINT until the server puts its handlers in place (uvicorn's one server puts
    this one back once stopped, and raises the signal again: taken quietly).

    As PID 1 of its PID namespace (a pod without an init, `docker run`) the process never gets a
    signal it has no handler for: a SIGTERM while serve started was dropped, and the gateway served
    on until SIGKILL (t192). Taken here, it is noted, and the start stops at its next step, or at
    once in a wait for something it started to answer, whose code stops that on any exception. An
    exception raised anywhere else could land in a C extension's call back into Python (msgspec's
    decoders, built as modules are imported, crashed on one), or between starting something and
    handing it to the clean-up, or within ``subprocess.Popen`` once it has forked (f212: a child that
    serve never learnt of outlived it): the wait starts once the child is spawned.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._waiting = False

    def take(self, signum: int, frame: object) -> None:
        self.signum = signum
        if self._waiting:
            self._waiting = False
            raise _Stopped(signum)

    def check(self) -> None:
        """Stop here if a stop signal came."""
        if self.signum is not None:
            raise _Stopped(self.signum)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A wait that a stop signal breaks off at once: never a spawn (see above)."""
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


_START_STOPS = _StartStops()


_WORKER_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
"""What ``serve`` passes on to every worker: SIGHUP reloads the policy, SIGUSR1 opens the request
log file again at its path (after logrotate's rename; USR1, as nginx and gunicorn reopen their logs)."""


_HELD_IN_A_GRANIAN_WORKER = (signal.SIGINT, signal.SIGTERM)
"""Blocked in a worker granian forks, from the fork. SIGINT for good (see ``GatewayServer``). SIGTERM
until granian's handler for it is in place, just before the application's lifespan, which unblocks
it once the drain's is in too (``gateway.api.app._take_sigterm``): until then the worker has serve's handler, inherited with the
fork, which notes a stop in serve's copy of granian's state, and a stop passed on to a worker still
importing the application was lost (t199: that worker started and served, and the stop waited out
granian's kill timeout). Held, it comes once the worker has started, which then stops."""


@contextlib.contextmanager
def _worker_signals_held(*also: signal.Signals) -> Iterator[None]:
    """Workers started in here start with SIGHUP and SIGUSR1 blocked (a process inherits the signal mask),
    and ``also`` (granian's: ``_HELD_IN_A_GRANIAN_WORKER``).

    Their default action ends a process: a worker still loading its models when ops
    reload (or a replacement, when a reload comes right after a worker died) would die of
    it, and its replacement would start on whatever the file then holds. The worker
    unblocks each once its handler is in place (``RuntimeHolder.reload_on_sighup``,
    ``gateway.api.app._reopen_on_sigusr1``); one sent meanwhile waits until then. In the
    main process, one waits until the start returns.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {*_WORKER_SIGNALS, *also})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _run_server(
    server: str, host: str, port: int, workers: int, *, kill_after_s: float, listening: Callable[[int], None]
) -> None:
    """Serve until stopped; ``listening`` is called with the port once it is ours and listening
    (t63: the banner said "serving" before the bind, and a port in use then failed the start)."""
    if server == "uvicorn":
        _run_uvicorn(host, port, workers, kill_after_s=kill_after_s, listening=listening)
        return
    from granian.constants import Interfaces

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _bound(family, host, port, reuse_port=False) as free:  # a port in use: said in a line, not a traceback
        # granian takes a port, not a socket: port 0 is the one the OS chose here (t71: the
        # banner said port 0); were it taken before granian binds it, granian says so and exits
        port = free.getsockname()[1]
    granian = _granian_server()(
        "gateway.api.app:create_app",
        factory=True,
        address=host,
        port=port,
        workers=workers,
        interface=Interfaces.ASGI,
        log_access=False,
        log_level="warning",
        respawn_failed_workers=True,
        workers_kill_timeout=int(kill_after_s),
    )
    # its start-up hook comes once the socket is bound, but the workers listen on it: said once one accepts
    granian.on_startup(lambda: _when_accepting(host, port, listening))
    granian.serve()


def _run_uvicorn(host: str, port: int, workers: int, *, kill_after_s: float, listening: Callable[[int], None]) -> None:
    import uvicorn

    from gateway.services.http_head import BoundedHeadProtocol
    from gateway.services.server_log import uvicorn_log_config

    config = uvicorn.Config(
        "gateway.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop" if sys.platform != "win32" else "auto",
        http=BoundedHeadProtocol,  # httptools, with a bound on a request head's size and time
        server_header=False,  # no "server: uvicorn" advertised on every answer
        proxy_headers=False,  # nothing reads the client's address: no X-Forwarded-For rewriting per request
        access_log=False,
        log_level="warning",
        log_config=uvicorn_log_config(),  # JSON lines, as the rest of stderr; a client's malformed ones counted (t153)
        lifespan="on",
        timeout_graceful_shutdown=int(kill_after_s),
    )
    server = _announcing_server()(config, listening)
    sockets: list[socket.socket] = []
    if workers > 1:  # bound here, so that a port in use exits non-zero (below, SystemExit means stopped)
        reuse_port = hasattr(socket, "SO_REUSEPORT")
        sockets = _listening_sockets(host, port, workers) if reuse_port else [config.bind_socket()]
        for sock in sockets:  # the workers listen on them again, with the configured backlog
            sock.listen(config.backlog)
    supervisor = _uvicorn_supervisor()(config, sockets=sockets) if sockets else None
    _START_STOPS.check()  # one that came until the supervisor took the signals (as it was made)
    if supervisor is not None:
        listening(sockets[0].getsockname()[1])
    try:
        if supervisor is not None:
            supervisor.run()
        else:
            server.run()
    except (KeyboardInterrupt, SystemExit):  # uvicorn's exit when it could not start (it said why)
        pass
    if (workers == 1 and not server.started) or (supervisor is not None and supervisor.startup_failed):
        # as uvicorn.run: the server did not start (it said why); a supervisor that restarts on
        # failure must see one (t44: a worker's replacement could not start, and serve exited 0)
        raise SystemExit(3)


def _when_accepting(host: str, port: int, then: Callable[[int], None]) -> None:
    """Call ``then`` from a thread once ``host:port`` accepts a connection (given up after a minute:
    a worker that cannot start ends the server, which says why)."""
    import threading
    import time

    address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)

    def probe() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address, port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            then(port)
            return

    threading.Thread(target=probe, name="gateway-listening", daemon=True).start()


def _announcing_server() -> type:
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        """One worker: the server binds after its lifespan's start-up, and says so then."""

        def __init__(self, config: uvicorn.Config, listening: Callable[[int], None]) -> None:
            super().__init__(config)
            self._listening = listening

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # else it said why, and exits
                bound = [s.getsockname()[1] for server in self.servers for s in server.sockets or ()]
                self._listening(bound[0] if bound else self.config.port)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                if _START_STOPS.signum is not None:  # it came as uvicorn took the signals: uvicorn's to act on
                    self.handle_exit(_START_STOPS.signum, None)
                yield

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            """Served, logged and billed once this returns: a Ctrl-C from then on is ignored. Left to
            asyncio's handler, one that came while the event loop closed broke off the close, and a
            thread of the loop's printed a traceback on the way out (the CI of 31e849b)."""
            try:
                await super().serve(sockets)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return AnnouncingServer


def _listening_sockets(host: str, port: int, workers: int) -> list[socket.socket]:
    """One listening socket per worker, all on ``host:port`` with SO_REUSEPORT, so the kernel
    spreads connections over the workers (where there is no SO_REUSEPORT, one shared socket). With one shared socket the first worker to wake
    accepted them all: 8 keep-alive connections opened at once all went to one of two
    workers (measured), the other idle."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEPORT would also join the group of another gateway (or orphaned workers) already
    # on the port, and split the traffic with it silently: a plain bind first says the port is taken.
    with _bound(family, host, port, reuse_port=False):
        pass
    first = _bound(family, host, port, reuse_port=True)
    port = first.getsockname()[1]  # port 0: the others join the port the OS chose for the first (t71)
    sockets = [first, *(_bound(family, host, port, reuse_port=True) for _ in range(workers - 1))]
    for sock in sockets:
        sock.set_inheritable(True)
    return sockets


def _bound(family: socket.AddressFamily, host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A socket bound to ``host:port``; a port that is taken exits 3, saying so."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535 (t69)
        sock.close()
        _say(f"cannot listen on {host}:{port}: {exc}")
        raise SystemExit(3) from None
    return sock


def _windows_at(policy: Policy, url: str) -> dict[str, int]:
    """The ``context_window`` of each chat model the policy sends to ``url``, by the name it sends."""
    return {
        model.upstream_model or name: model.context_window
        for name, model in policy.models.items()
        if model.kind == "chat" and model.provider == "openai" and model.base_url.rstrip("/") == url
    }


def _simulator_installed() -> bool:
    """Whether ``--simulate-missing`` can run: a built wheel leaves ``gateway.simulated`` out. Asked
    before anything starts, so a missing simulator is the one line said, not a port or a Redis."""
    if os.environ.get("SMALL_MODEL_URL") and os.environ.get("LARGE_MODEL_URL"):
        return True
    try:
        import gateway.simulated  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.simulated":
            raise
        return False
    return True


_UNSET_MODEL_URL = re.compile(r".*: environment variable (SMALL|LARGE)_MODEL_URL is not set and has no default .*")
"""A problem ``--simulate-missing`` solves, as the loader words it."""


def _only_unset_model_urls(problems: list[str]) -> bool:
    """Whether every problem is a model URL ``--simulate-missing`` would start a simulator for (t166)."""
    return bool(problems) and all(_UNSET_MODEL_URL.fullmatch(problem) for problem in problems)


def _listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, tried as the servers bind it (with SO_REUSEADDR): a port
    another process listens on was found out only once the private Redis and the simulated upstreams
    had started, exit 3 (t146). The servers still say so, exit 3, if it is taken meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        hint = "; stop what listens there, or give another --port" if exc.errno == errno.EADDRINUSE else ""
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
    return None


def _rebound(sock: socket.socket) -> socket.socket:
    """A new socket bound where ``sock`` is, with SO_REUSEPORT, not listening."""
    fresh = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        fresh.bind(sock.getsockname())
    except OSError:
        fresh.close()
        raise
    fresh.set_inheritable(True)
    return fresh


def _uvicorn_supervisor() -> type:
    import time

    from uvicorn.config import STARTUP_FAILURE, Config
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import Process

    class GatewaySupervisor(Multiprocess):
        """uvicorn's supervisor, with four changes. Worker *i* serves socket *i* only (see
        :func:`_listening_sockets`); when it dies, its replacement gets a fresh socket *i*
        (:meth:`_socket_for_replacement`). SIGHUP to the main process reloads the policy in
        every worker, in place (as under granian, below), rather than uvicorn's rolling
        restart of the workers, and SIGUSR1 reaches every worker (uvicorn ignores it).
        SIGTERM and SIGINT close this process's copies of the listening sockets first. A worker
        that dies before it started is a failed start whatever its exit code (t117: one that
        could not import the app was replaced at once, for ever): see :meth:`_failed_start`."""

        startup_failed = False

        def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
            super().__init__(config, sockets)
            self._started: set[int] = set()  # the pids of the live workers seen started
            self._served = False  # some worker has started
            self._failed_in_a_row = 0  # workers that died before they started, since one last started
            self._deaths: list[float] = []  # when workers died, over the last minute
            self._replace_at: dict[int, float] = {}  # dead worker *i*: when its replacement starts
            self._spawned: dict[int, float] = {}  # a worker not yet seen started: when it was spawned

        def init_processes(self) -> None:
            for index in range(self.processes_num):
                process = Process(self.config, [self.sockets[index % len(self.sockets)]])
                with _worker_signals_held():
                    process.start()
                self._note_spawned(process)
                self.processes.append(process)

        def keep_subprocess_alive(self) -> None:
            """uvicorn's, except that a worker's replacement serves a fresh socket in that worker's
            place, one that dies before it started counts as a failed start, and a worker that
            dies soon after another is replaced after a backoff."""
            for index, process in enumerate(self.processes):
                if self.should_exit.is_set():
                    return
                if index in self._replace_at:
                    if time.monotonic() >= self._replace_at[index]:
                        del self._replace_at[index]
                        self._replace(index)
                    continue
                if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                    self._note_started(process)
                    continue
                if self._still_starting(process):
                    continue
                process.kill()  # hung or dead
                process.join()
                started = process.pid in self._started
                self._started.discard(process.pid)
                self._spawned.pop(process.pid or 0, None)
                how = _how_it_ended(process.exitcode)
                if not started and self._failed_start(process, how):
                    self._stop_listening()  # nobody will accept what would be queued meanwhile
                    self.startup_failed = True
                    self.should_exit.set()
                    return
                delay = self._backoff()
                after = f" in {delay:g}s ({len(self._deaths)} deaths within a minute)" if delay else ""
                died = "died" if started else "died before it started"
                _say(f"worker {process.pid} {died} ({how}); starting another{after}")
                if delay:
                    self._replace_at[index] = time.monotonic() + delay
                else:
                    self._replace(index)

        def _note_started(self, process: Process) -> None:
            pid = process.pid
            if pid is None or pid in self._started or not _has_started(process):
                return
            self._started.add(pid)
            self._spawned.pop(pid, None)
            self._served = True
            self._failed_in_a_row = 0

        def _note_spawned(self, process: Process) -> None:
            if process.pid is not None:
                self._spawned[process.pid] = time.monotonic()

        def _still_starting(self, process: Process) -> bool:
            """Whether a live worker that has not yet started, and left a health check unanswered, is
            within :data:`_START_GRACE_S` of its spawn: slow to import and load, not hung."""
            spawned = self._spawned.get(process.pid or 0)
            alive = process.process.is_alive()
            return alive and spawned is not None and time.monotonic() - spawned < _START_GRACE_S

        def _failed_start(self, process: Process, how: str) -> bool:
            """Whether the death of ``process``, which was never seen started, stops the gateway
            (it says why): a start-up failure uvicorn reports (the app, or its socket, is broken),
            any death before the gateway has served, or the third in a row after."""
            for sibling in self.processes:  # one may have started since the last look
                if sibling is not process and sibling.exitcode is None:
                    self._note_started(sibling)
            self._failed_in_a_row += 1
            if process.exitcode == STARTUP_FAILURE or not self._served:
                _say(f"worker {process.pid} failed to start ({how}); stopping")
                return True
            if self._failed_in_a_row >= _FAILED_STARTS_IN_A_ROW:
                _say(f"worker {process.pid} failed to start ({how}), {self._failed_in_a_row} in a row; stopping")
                return True
            return False

        def _backoff(self) -> float:
            """Seconds to wait before replacing a worker that died just now: none for the first
            death in a minute, then 0.5 s doubling to 10 s (a worker that crashes as it serves)."""
            now = time.monotonic()
            self._deaths = [*(t for t in self._deaths if now - t < 60), now]
            return 0.0 if len(self._deaths) == 1 else min(0.5 * 2 ** (len(self._deaths) - 2), 10.0)

        def _replace(self, index: int) -> None:
            replacement = Process(self.config, [self._socket_for_replacement(index)])
            with _worker_signals_held():
                replacement.start()
            self._note_spawned(replacement)
            self.processes[index] = replacement

        def _socket_for_replacement(self, index: int) -> socket.socket:
            """A fresh socket in place of dead worker *index*'s, which is closed here at once.

            While this process held the dead worker's socket open, the kernel kept hashing a
            share of new connections to it, and they waited in its queue until the replacement
            had loaded its models and listened (seconds; probes with a short timeout failed
            while another worker was idle). Closed, new connections go to the live workers,
            and those already queued on it are reset (the client can retry; they went
            unanswered anyway). The fresh socket is bound the same way (SO_REUSEPORT, the
            same port, the one the OS chose for --port 0 too) before the old one is closed,
            so the port stays ours, but not listening: the kernel sends it connections only
            once the replacement, started, listens on it. One socket shared by all workers
            (no SO_REUSEPORT), or a worker beyond those that own one, keeps the socket as is.
            """
            old = self.sockets[index % len(self.sockets)]
            if len(self.sockets) == 1 or index >= len(self.sockets):
                return old
            try:
                fresh = _rebound(old)
            except OSError as exc:  # as before: the replacement serves the old one
                _say(f"no fresh socket for the replacement ({exc}); new connections may wait for it")
                return old
            old.close()
            self.sockets[index] = fresh
            return fresh

        def handle_term(self) -> None:
            self._stop_listening()
            super().handle_term()

        def handle_int(self) -> None:
            self._stop_listening()
            super().handle_int()

        def _stop_listening(self) -> None:
            """The workers close their listeners as they start draining, but this process holds the
            same sockets (to hand a replacement worker its own): while it does, the kernel still
            queues new connections that no one will accept, and each hangs until the end, then
            is reset. Closed here, a new connection is refused at once, as with one worker."""
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.close()

        def handle_hup(self) -> None:
            _pass_on(signal.SIGHUP, self._live_pids())

        def handle_usr1(self) -> None:
            _pass_on(signal.SIGUSR1, self._live_pids())

        def _live_pids(self) -> list[int | None]:
            """Not a dead worker's, whose replacement waits out a backoff: its pid may be reused."""
            return [process.pid for process in self.processes if process.exitcode is None]

    return GatewaySupervisor


_FAILED_STARTS_IN_A_ROW = 3
"""Once the gateway has served: workers in a row that die before they start stop it."""

_START_GRACE_S = 60.0
"""How long a worker that has not yet started may leave uvicorn's health check (5 s) unanswered
before it is taken for hung: importing the app and loading the models on a host busy elsewhere
outlasted 5 s on a CI box at load 15, the worker was killed as hung, and the gateway stopped as
one that could not start (t188)."""


def _has_started(process: object) -> bool:
    """Whether a live uvicorn worker says its server has started; one that cannot say (uvicorn
    without ``Process.is_ready``) counts as started once alive, as uvicorn took it."""
    is_ready = getattr(process, "is_ready", None)
    return True if is_ready is None else bool(is_ready(timeout=1))


def _how_it_ended(exitcode: int | None) -> str:
    """``exit code N`` or ``killed by SIGNAME``, from a process's ``exitcode``."""
    if exitcode is None or exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        return f"killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"killed by signal {-exitcode}"


def _pass_on(sig: int, workers: list[int | None]) -> None:
    for pid in workers:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _keep_stdout_for_the_request_log() -> None:
    """The workers (forked, or this process itself) write the request log to the original stdout."""
    from gateway.accounting.request_log import take_stdout

    request_log = take_stdout()
    os.set_inheritable(request_log, True)
    os.environ["GATEWAY_REQUEST_LOG_FD"] = str(request_log)


def _granian_stops_taken_once() -> None:
    """A granian worker's loop takes the first stop (SIGTERM, SIGINT) alone: granian's handler there
    sends its stop to a channel that holds one until the server takes it, blocking, the event loop
    and all, on a second, and before serving nothing takes it. A SIGTERM to the process group
    (``kill -TERM -PGID``, systemd's stop) reaches each worker, and serve passes one more on: two
    that came while a worker's loop ran its application's start (or landed on another thread before
    the drain's handler saw the first, which no Python-level handler can hold back: the loop acts on
    each it reads from its wakeup fd) ran it twice, and the worker was killed at the kill timeout
    (f232, t201; a SIGINT: t132). The workers forked from here take this in place of granian's."""
    import granian._signals

    granians: Callable[[Any], Any] = granian._signals.set_loop_signals
    if getattr(granians, "taken_once", False):
        return

    def set_loop_signals(loop: Any) -> Any:
        stop = granians(loop)
        taken = False

        def take(signum: int, frame: object) -> None:
            nonlocal taken
            if not taken:
                taken = True
                stop.set()

        with contextlib.suppress(NotImplementedError):  # no such loop: granian's are Python-level handlers
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, take, sig, None)
        return stop

    set_loop_signals.taken_once = True  # type: ignore[attr-defined]
    granian._signals.set_loop_signals = set_loop_signals


def _granian_server() -> type:
    from granian import Granian

    _granian_stops_taken_once()

    class GatewayServer(Granian):  # type: ignore[misc, valid-type]
        """SIGHUP to the main process reloads the policy in every worker, in place.

        Granian's own SIGHUP restarts the workers: in-flight requests would be cut, and
        with an invalid policy on disk the new workers would fail to start. Each worker
        already reloads on SIGHUP and keeps the policy in force when the new one is bad.
        SIGUSR1, which granian leaves alone, is passed on to every worker too.

        The workers never take SIGINT (blocked from their start): Ctrl-C in a terminal signals
        the whole process group, and granian's handler in a worker, run a second time, blocked
        its event loop for good (t132: streams stalled, then were cut at the kill timeout with
        no error event and no log line). This process takes it, and stops each worker with
        SIGTERM, once: a second Ctrl-C cuts nothing short, as under uvicorn.
        """

        def startup(self, *args: object, **kwargs: object) -> None:
            signal.signal(signal.SIGUSR1, lambda *_: _pass_on(signal.SIGUSR1, [w._id() for w in self.wrks]))
            super().startup(*args, **kwargs)

        def _spawn_workers(self, *args: object, **kwargs: object) -> None:
            if _START_STOPS.signum is not None:  # it came as granian took the signals: stopped before any worker
                self.signal_handler_interrupt()
                return
            with _worker_signals_held(*_HELD_IN_A_GRANIAN_WORKER):
                super()._spawn_workers(*args, **kwargs)

        def _respawn_workers(self, *args: object, **kwargs: object) -> None:
            with _worker_signals_held(*_HELD_IN_A_GRANIAN_WORKER):
                super()._respawn_workers(*args, **kwargs)

        def signal_handler_reload(self, *args: object, **kwargs: object) -> None:
            _pass_on(signal.SIGHUP, [worker._id() for worker in self.wrks])

    return GatewayServer


def _claim_data_dir(data_dir: str, cleanup: ExitStack) -> str | None:
    """Hold the data folder for this run (an exclusive lock, released when the process ends);
    the pid of the run that holds it already, if one does. Two runs on one folder started two
    Redis servers on one socket and wiped each other's metrics (t29). A folder that cannot be
    written is nobody's to share: nothing is claimed."""
    import fcntl

    try:
        os.makedirs(data_dir, exist_ok=True)
        lock = open(os.path.join(data_dir, "serve.lock"), "a+")  # noqa: SIM115 - held for the whole run
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip()[:20] or "unknown"
        lock.close()
        return holder
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    cleanup.callback(lock.close)
    return None


def _fresh_metrics_dir(data_dir: str) -> str:
    """An empty folder for this run's per-worker metric files (stale ones would be added in).

    Under the data folder when it is writable, else a private temporary folder (read-only
    container file systems).
    """
    import shutil
    import tempfile

    path = os.path.abspath(os.path.join(data_dir, "metrics"))
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.makedirs(path)
    except OSError:
        path = tempfile.mkdtemp(prefix="gateway-metrics-")
    return path


def _policy_last_accepted(
    policies: str, data_dir: str, written: list[str] | None = None
) -> tuple[LoadedPolicy, Path, bool] | None:
    """The policy that ``data_dir`` keeps in force for ``policies`` (the file is invalid), loaded as
    a worker started now loads it (``gateway.runtime.load_at_start``: with the key file kept with
    it), where it is kept, and whether the file is still invalid (False: fixed meanwhile, loaded
    from the file); None, having said why where there was one, when there is none to
    start on: a fresh data folder, or one kept for another policy file (another gateway's state).

    A container restarted while its ConfigMap holds an edit the running gateway rejected (a
    liveness or OOM restart keeps the pod's emptyDir) exited 2 here, pod after pod (f113).
    ``written``: a writer holds the file or its key file open (``gateway.runtime.still_written``)."""
    from gateway.config.kept import KeptForAnother, read_kept_policy
    from gateway.runtime import load_at_start

    try:
        kept = read_kept_policy(data_dir, policies)[0].absolute()
    except FileNotFoundError:
        return None
    except KeptForAnother as exc:
        _say(f"not started on the policy last accepted: {exc}")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _say(f"the policy last accepted, in {data_dir}, cannot be read ({type(exc).__name__})")
        return None
    try:
        first = load_at_start(Path(policies), kept, written=written)
    except ConfigError as exc:
        _say_problems(f"the policy last accepted, {kept}, is invalid now too:", exc.problems, str(kept))
        return None
    return first.loaded, kept, bool(first.rejected)  # not rejected: fixed meanwhile, the workers keep the file


def _keep_policy_in_force(text: str, key_file_text: str | None, policies: str, data_dir: str) -> str:
    """Write the checked policy, and its key file as read, where a worker started later falls back
    to them when either file is invalid by then (``gateway.runtime.load_at_start``); the workers
    rewrite them on every reload.
    It is kept with the policy file's path: the key tools take it for that file's alone (t96).

    Under the data folder when it is writable, else a private temporary folder."""
    import tempfile

    try:
        os.makedirs(data_dir, exist_ok=True)
        folder = data_dir if os.access(data_dir, os.W_OK) else tempfile.mkdtemp(prefix="gateway-policy-")
    except OSError:
        folder = tempfile.mkdtemp(prefix="gateway-policy-")
    return str(keep_policy(folder, text, policies, key_file_text))


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _port(value: str) -> int:
    """A TCP port: uvicorn's getaddrinfo kept the low 16 bits of 70000 and served on 4464 (t69)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {number}")
    return number


def _host(value: str) -> str:
    """An address this machine can listen on: one that did not resolve, or is not this machine's,
    failed once the policy, the Redis and the models were loaded, with exit 3 (t134)."""
    family = socket.AF_INET6 if ":" in value else socket.AF_INET  # as the servers pick it
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((value, 0))
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot listen on {value!r}: {exc.strerror or exc}") from None
    return value


_REDIS_SIZE = re.compile(r"([0-9]+)(b|k|kb|m|mb|g|gb)?", re.IGNORECASE)
"""A size as Redis reads ``maxmemory``: whole, with an optional unit."""
_REDIS_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
_REDIS_MAX_BYTES = 2**63 - 1
"""Redis 8 refuses more, but for 2^64 bytes (``17179869184gb``), which it wraps round to 0: no bound."""


def _memory_size(value: str) -> str:
    """A Redis size above 0: ``maxmemory 0`` is no bound at all (t146), and what Redis cannot read
    stopped the start only once the simulated upstreams were up (t159: a size past its bound)."""
    size = _REDIS_SIZE.fullmatch(value)
    if size is None or not 0 < int(size[1]) * _REDIS_UNITS[(size[2] or "").lower()] <= _REDIS_MAX_BYTES:
        raise argparse.ArgumentTypeError(
            f"must be a size above 0 and below 8 EiB (2^63 bytes, Redis's bound) such as 256mb or 2gb, got {value!r}"
        )
    return value


def _seconds(value: str) -> float:
    """A finite, non-negative number of seconds (``nan`` or ``inf`` crashed the drain, t29)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {value}")
    return number


def _say(message: str) -> None:
    print(f"[gateway] {message}", file=sys.stderr, flush=True)


def _say_problems(heading: str, problems: list[str], path: str) -> None:
    """A refused policy's problems, one a line, without the values they quote, as a rejected reload
    logs them: stderr is the operational log, and a value may be a secret pasted into the wrong
    field (t134). ``gateway check`` shows ops the whole text."""
    from gateway.runtime import loggable_problems

    logged = loggable_problems(problems)
    _say(heading)
    for problem in logged:
        _say(f"  - {problem}")
    if logged != problems:
        _say(
            f"  (the values quoted are hidden here, as a secret may be one: `python -m gateway check {path}` shows them)"
        )


def _url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (t122: ``http://::1:8000`` could not be used)."""
    return f"[{host}]" if ":" in host else host


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _open_allowed(args: argparse.Namespace) -> bool:
    return bool(args.allow_no_auth) or os.environ.get("GATEWAY_ALLOW_NO_AUTH", "") in ("1", "true", "yes")
