"""The soak benchmark runs end to end (a few seconds of it), so ``make soak`` does not rot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import soak


def test_a_short_soak_runs_and_reports_every_figure(tmp_path: Path) -> None:
    assert soak.main(["--duration", "4", "--connections", "4", "--results-dir", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("soak-*.json")
    report = json.loads(result.read_text())
    assert report["healthy"] > 0 and report["requests"] == sum(report["by_kind_and_status"].values())
    for moment in ("start", "end"):
        assert set(report[moment]) == {"worker_rss_mib", "worker_open_fds", "redis_used_memory_mib", "redis_keys"}
