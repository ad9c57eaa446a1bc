"""Start toy LM servers as real loopback processes (for the tests and the benchmark)."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

_SCRIPT = Path(__file__).with_name("toy_lm_server.py")

__all__ = ["ToyServer", "start_toy_server", "toy_tokenizer_file"]


@dataclass
class ToyServer:
    process: subprocess.Popen[str]
    port: int

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.root_url}/_control/stats").json()
        return stats

    def reset(self) -> None:
        httpx.post(f"{self.root_url}/_control/reset").raise_for_status()

    def fail_after(self, calls: int, kind: str = "500") -> None:
        """After ``calls`` more completion calls, every completion call fails (500, dropped connection, or "hang")."""
        httpx.post(f"{self.root_url}/_control/fail", json={"after_calls": calls, "kind": kind}).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_toy_server(**options: Any) -> ToyServer:
    """``options`` are the server's flags with underscores (``role="small", agreement=0.8, pass_ms=4``)."""
    argv = [sys.executable, str(_SCRIPT), "--port", "0"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    line = process.stdout.readline()
    if not line.startswith("PORT ") or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"toy server did not start: {line!r}")
    return ToyServer(process, int(line.split()[1]))


@functools.cache
def toy_tokenizer_file(variant: int = 0) -> str:
    """The toy servers' vocabulary as a ``tokenizer.json`` (for ``speculative.tokenizer``), written once per process."""
    from tests.speculative.toy_lm_server import write_tokenizer_json

    path = Path(tempfile.mkdtemp(prefix="toy-tokenizer-")) / "tokenizer.json"
    write_tokenizer_json(str(path), variant)
    return str(path)
