"""Run a simulated upstream in a child process (``python -m gateway.simulated``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["SimulatedUpstream", "start_simulated_upstream"]

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_POLL_S = 0.02
_STOP_TIMEOUT_S = 5.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""No proxies: an HTTP(S)_PROXY in the environment must not capture loopback."""


@dataclass
class SimulatedUpstream:
    """A running simulated upstream; ``url`` is the OpenAI-style ``/v1`` base URL."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    url: str = field(init=False)
    root_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root_url}/v1"

    def set_windows(self, windows: Mapping[str, int], timeout_s: float = 5.0) -> None:
        """The context window of each model name it stands in for: a chat prompt that does not fit
        is refused with vLLM's 400, as the model's server would (``serve --simulate-missing`` sets
        the policy's ``context_window``)."""
        request = urllib.request.Request(
            f"{self.root_url}/_control/windows",
            data=json.dumps(dict(windows)).encode(),
            headers={"Content-Type": "application/json"},
        )
        with _OPENER.open(request, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise RuntimeError(f"simulated upstream {self.name!r} refused its windows: HTTP {resp.status}")

    def stop(self) -> int | None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Idempotent; returns the exit code."""
        _terminate(self.process)
        return self.process.returncode

    def __enter__(self) -> SimulatedUpstream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _child_env() -> dict[str, str]:
    """Make ``gateway`` importable in the child even without an editable install."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(_PROJECT_ROOT) if not path else f"{_PROJECT_ROOT}{os.pathsep}{path}"
    return env


def _wait_for_port(process: subprocess.Popen[bytes], ready_file: Path, deadline: float) -> int:
    while True:
        if ready_file.exists():
            return int(ready_file.read_text())
        code = process.poll()
        if code is not None:
            raise RuntimeError(f"simulated upstream exited with code {code} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError("simulated upstream did not become ready in time")
        time.sleep(_POLL_S)


def _check_health(root_url: str, deadline: float) -> None:
    timeout = max(0.5, deadline - time.monotonic())
    with _OPENER.open(f"{root_url}/healthz", timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError(f"simulated upstream /healthz answered HTTP {resp.status}")


def start_simulated_upstream(
    name: str,
    *,
    port: int = 0,
    latency_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    python: str = sys.executable,
    timeout_s: float = 15.0,
    weak_on: tuple[str, ...] = (),
    max_model_len: int | None = None,
    waiting: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
) -> SimulatedUpstream:
    """Spawn a simulated upstream and wait until it answers ``/healthz``.

    Raises RuntimeError (with the exit code where there is one) if it fails.
    The child exits on its own if this process dies (``--parent-pid``).
    ``waiting``: entered for the wait only, once the child is spawned: an exception it raises
    (``serve``'s stop) stops the child, where one raised within the spawn would leave it behind.
    """
    deadline = time.monotonic() + timeout_s
    tmpdir = Path(tempfile.mkdtemp(prefix="simulated-upstream-"))
    ready_file = tmpdir / "port"
    command = [
        python,
        "-m",
        "gateway.simulated",
        "--name",
        name,
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        "--chunk-delay-ms",
        str(chunk_delay_ms),
        "--ready-file",
        str(ready_file),
        "--parent-pid",
        str(os.getpid()),
        "--weak-on",
        ",".join(weak_on),
        *(["--max-model-len", str(max_model_len)] if max_model_len is not None else []),
    ]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=_child_env(),
        start_new_session=True,  # a Ctrl-C in the terminal is the parent's to handle
    )
    try:
        with waiting():
            bound_port = _wait_for_port(process, ready_file, deadline)
            upstream = SimulatedUpstream(name=name, port=bound_port, process=process)
            _check_health(upstream.root_url, deadline)
    except BaseException as exc:
        _terminate(process)
        if isinstance(exc, (OSError, ValueError)):
            raise RuntimeError(f"simulated upstream {name!r} failed to start: {exc}") from exc
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return upstream
