"""A local Redis Cluster of three masters from the same Redis 8 binary, for tests."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from gateway.services.redis_server import find_redis_server

_SLOTS = 16384


@dataclass
class LocalCluster:
    processes: list[subprocess.Popen[bytes]]
    ports: list[int]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free and valid too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 45000)
        if port not in ports and _is_free(port) and _is_free(port + 10000):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_local_cluster(folder: Path, masters: int = 3, timeout_s: float = 20.0) -> LocalCluster:
    """Three cluster-enabled servers on loopback, slots split evenly, introduced with CLUSTER MEET."""
    ports = _cluster_ports(masters)
    processes = []
    for port in ports:
        node_dir = folder / str(port)
        node_dir.mkdir(parents=True)
        processes.append(subprocess.Popen(
            [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--dir", str(node_dir), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    cluster = LocalCluster(processes, ports)
    clients = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
    deadline = time.monotonic() + timeout_s
    for client, process in zip(clients, processes, strict=True):
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    cluster.stop()
                    raise RuntimeError(f"a cluster node did not start (exit code {process.poll()})") from None
                time.sleep(0.05)
    share = _SLOTS // masters
    # redis-py leaves execute_command unannotated, hence the no-untyped-call ignores below; the typed
    # client.cluster(...) would parse CLUSTER INFO into a dict, and the raw reply is what is read here.
    for index, client in enumerate(clients):
        last = _SLOTS - 1 if index == masters - 1 else (index + 1) * share - 1
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", index * share, last)  # type: ignore[no-untyped-call]
    for port in ports[1:]:
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)  # type: ignore[no-untyped-call]
    while any(c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0 for c in clients):  # type: ignore[no-untyped-call]
        if time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError("the local cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    return cluster
