"""/metrics with several workers: a worker that died leaves its counts, not its gauges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import sys
from gateway.accounting.metrics import Metrics
metrics = Metrics(sys.argv[1])
metrics.redis_up.set(int(sys.argv[2]))
metrics.set_policy_version(sys.argv[3])
metrics.upstream_error("small", "timeout")
if sys.argv[4] == "render":
    sys.stdout.write(metrics.render().decode())
"""


def _worker(tmp_path: Path, redis_up: int, version: str, render: bool) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}  # read by prometheus_client at import
    argv = [sys.executable, "-c", _SCRIPT, str(tmp_path), str(redis_up), version, "render" if render else "-"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout


def test_a_dead_workers_gauges_leave_with_it(tmp_path: Path) -> None:
    _worker(tmp_path, 0, "old", render=False)  # saw Redis down, then was killed and replaced
    scraped = _worker(tmp_path, 1, "new", render=True)
    assert "gateway_redis_up 1.0" in scraped
    assert 'gateway_policy_info{version="new"} 1.0' in scraped and 'version="old"' not in scraped
    assert 'gateway_upstream_errors_total{code="timeout",upstream="small"} 2.0' in scraped  # counts stay
