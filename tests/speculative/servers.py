"""Start toy LM servers as real loopback processes (for the tests and the benchmark)."""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.config.schema import ModelConfig, Price, Timeouts
from gateway.upstreams.base import Provider
from gateway.upstreams.registry import build_provider

_SCRIPT = Path(__file__).with_name("toy_lm_server.py")

__all__ = ["ToyServer", "start_toy_server", "toy_provider", "toy_tokenizer_file", "write_bench_results"]


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


def toy_provider(name: str, server: ToyServer, tier: str, *, first_byte: float = 60, total: float = 600) -> Provider:
    """The gateway's provider for a toy server (``tier`` ``small`` or ``large``)."""
    config = ModelConfig(
        base_url=server.base_url, price=Price(input_per_mtok=1, output_per_mtok=1), tier=tier,  # type: ignore[arg-type]
        timeouts=Timeouts(connect=5, first_byte=first_byte, total=total), max_connections=512,
    )  # fmt: skip
    return build_provider(name, config)


def write_bench_results(stem: str, args: argparse.Namespace, results: dict[str, Any], started: float) -> None:
    """``bench-results/<stem>-<timestamp>.json`` with the run's arguments and machine."""
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"args": vars(args), "python": sys.version.split()[0], "machine": platform.machine(),
            "wall_s": time.time() - started}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, **results}, indent=2, default=str))
    print(f"wrote {path} ({meta['wall_s']:.0f} s)")
