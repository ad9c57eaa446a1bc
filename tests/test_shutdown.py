"""SIGTERM: stop accepting, finish in-flight streams, flush the log, stop the embedded Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from gateway.simulated import SimulatedUpstream, start_simulated_upstream
from tests.gateway_process import policy_text, start_gateway


def test_sigterm_lets_a_stream_finish_then_exits_cleanly(tmp_path: Path, large_upstream: SimulatedUpstream) -> None:
    with start_simulated_upstream("small", chunk_delay_ms=120) as slow_small:
        # REDIS_URL unset: the gateway starts (and must stop) its own Redis.
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        gateway = start_gateway(tmp_path, policy_text(slow_small, large_upstream), env=env)
        redis_pid = _embedded_redis_pid(tmp_path)
        lines: list[str] = []

        def stream() -> None:
            body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": " ".join(["word"] * 12)}]}
            with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=30) as response:
                lines.extend(line for line in response.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.5)  # the stream is under way
        gateway.process.send_signal(signal.SIGTERM)
        reader.join(30)
        assert lines[-1] == "data: [DONE]" and len(lines) > 10
        assert gateway.process.wait(30) == 0
        records = gateway.log_records()
        assert len(records) == 1 and records[0]["status"] == 200 and records[0]["stream"] is True  # flushed
        deadline = time.monotonic() + 5
        while redis_pid is not None and Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert redis_pid is None or not Path(f"/proc/{redis_pid}").exists() or _is_zombie(redis_pid)
        assert "stopped" in gateway.stderr_text()


def _embedded_redis_pid(workdir: Path) -> int | None:
    data = str((workdir / "data" / "redis").resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"redis-server") and data.encode() in cmdline:
            return int(proc.name)
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
