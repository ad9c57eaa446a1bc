"""Process settings: read once from the environment, passed down from there.

The command line sets these for the server's worker processes. Besides them, the
environment holds what policies.yaml names: its ``${VAR}`` references and each model's
``api_key_env``, read where the policy is loaded and its providers are built.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from gateway.config.schema import RequestLogPolicy
from gateway.drain import DEFAULT_DRAIN_S

__all__ = ["DEFAULT_HEAD_TIMEOUT_S", "DEFAULT_ROUTER_ARTIFACTS", "HEAD_TIMEOUT_VARIABLE", "Settings", "head_timeout_s"]

DEFAULT_ROUTER_ARTIFACTS = str(Path(__file__).resolve().parent / "classifier" / "artifacts")
"""The classifier that ships inside the package (package data of ``gateway.classifier``);
``GATEWAY_ROUTER_ARTIFACTS`` overrides it."""

HEAD_TIMEOUT_VARIABLE = "GATEWAY_HEAD_TIMEOUT_S"
DEFAULT_HEAD_TIMEOUT_S = 15.0
_MIN_HEAD_TIMEOUT_S, _MAX_HEAD_TIMEOUT_S = 1.0, 3600.0
"""It runs from the connection's accept: under a second, a client on a slow network is refused its head."""
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # not \d, which matches any script's digits


@dataclass(frozen=True, slots=True)
class Settings:
    policies_path: str = "policies.yaml"
    redis_url: str | None = None
    watch_policies: bool = True
    upstream_transport: str = "http11"
    router_artifacts: str = DEFAULT_ROUTER_ARTIFACTS
    """The classifier's ONNX graph, tokenizer and config (missing: ``auto`` uses its default model)."""
    metrics_dir: str | None = None
    """Set (by ``serve --workers N``, N > 1) for prometheus_client's multiprocess mode."""
    request_log_fd: int | None = None
    """The request log's own descriptor (``serve`` keeps stdout for it alone); None: ``sys.stdout``."""
    split_stdout: bool = False
    """A spawned worker (uvicorn, several workers) takes stdout for the request log itself:
    ``serve`` could not hand it a descriptor of its own."""
    drain_s: float = DEFAULT_DRAIN_S
    """After SIGTERM or SIGINT, streams still open this long are ended in-band (the server kills workers 5 s later)."""
    policy_last_good: str | None = None
    """Where the workers keep the policy in force (set by ``serve``): a worker started while the
    file is broken starts on it (``gateway.runtime.load_at_start``)."""
    onnx_threads: int | None = None
    """onnxruntime's intra-op threads for each model this worker runs (``serve`` sets each
    worker's share of the cores; None: :func:`gateway.inference.intra_op_threads_for` one worker)."""
    auth_required: bool = False
    """Set by ``serve`` on a public address: a policy with auth off is refused, at start-up and
    on every reload, since anyone who reaches the address could then spend the upstreams' keys."""
    request_log: RequestLogPolicy | None = None
    """The policy's ``request_log`` when ``serve`` started: a worker that replaces a dead one writes
    where its siblings do, whatever the file says now (t149). None: the policy's at this worker's start."""

    @classmethod
    def from_env(cls) -> Settings:
        log_fd = os.environ.get("GATEWAY_REQUEST_LOG_FD")
        return cls(
            policies_path=os.environ.get("GATEWAY_POLICIES", "policies.yaml"),
            redis_url=os.environ.get("REDIS_URL") or None,
            watch_policies=os.environ.get("GATEWAY_WATCH_POLICIES", "1") != "0",
            upstream_transport=os.environ.get("GATEWAY_UPSTREAM_TRANSPORT", "http11"),
            metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
            router_artifacts=os.environ.get("GATEWAY_ROUTER_ARTIFACTS") or DEFAULT_ROUTER_ARTIFACTS,
            drain_s=float(os.environ.get("GATEWAY_DRAIN_S") or DEFAULT_DRAIN_S),
            request_log_fd=int(log_fd) if log_fd and log_fd != "split" else None,
            split_stdout=log_fd == "split",
            policy_last_good=os.environ.get("GATEWAY_POLICY_LAST_GOOD") or None,
            auth_required=os.environ.get("GATEWAY_AUTH_REQUIRED", "") == "1",
            onnx_threads=_positive_int(os.environ.get("GATEWAY_ONNX_THREADS")),
            request_log=_request_log(os.environ.get("GATEWAY_REQUEST_LOG_AT_START")),
        )


def _request_log(text: str | None) -> RequestLogPolicy | None:
    """As ``serve`` wrote it; anything else left here means the policy's."""
    try:
        return msgspec.json.decode(text, type=RequestLogPolicy) if text else None
    except msgspec.DecodeError:
        return None


def _positive_int(text: str | None) -> int | None:
    """``serve`` checks the value it is given; anything else left here means the default."""
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if value > 0 else None


def head_timeout_s(text: str | None) -> float:
    """``GATEWAY_HEAD_TIMEOUT_S`` (unset or empty: the default); a ValueError saying why for a value
    it cannot be. ``serve`` refuses one at start (t146: ``abc`` was a traceback, ``nan`` failed every
    connection, 0 or less closed them before they were read; t159: so did ``1e-9``, and float()'s
    ``" 5 "`` and ``1_0`` were taken): a plain decimal number, from 1 s."""
    if not text:
        return DEFAULT_HEAD_TIMEOUT_S
    value = float(text) if _PLAIN_NUMBER.fullmatch(text) else math.nan
    if not _MIN_HEAD_TIMEOUT_S <= value <= _MAX_HEAD_TIMEOUT_S:  # nan compares false
        raise ValueError(
            f"{HEAD_TIMEOUT_VARIABLE}: must be a plain number of seconds from {_MIN_HEAD_TIMEOUT_S:g} to "
            f"{_MAX_HEAD_TIMEOUT_S:g} (15, 2.5), got {text!r}"
        )
    return value
