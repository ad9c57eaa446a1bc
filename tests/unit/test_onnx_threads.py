"""How many cores the ONNX models may use: affinity, and a container's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.inference import cgroup_cpu_quota, cpu_count


def _v2(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (root / "cpu" / "cpu.cfs_period_us").write_text(period)
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), ("", None)],
)
def test_a_cgroup_v2_quota_is_read_in_whole_cpus_rounded_up(tmp_path: Path, text: str, cpus: int | None) -> None:
    assert cgroup_cpu_quota(_v2(tmp_path, text)) == cpus


@pytest.mark.parametrize(("quota", "cpus"), [("400000\n", 4), ("-1\n", None), ("junk", None)])
def test_a_cgroup_v1_quota_is_read_when_there_is_no_v2_file(tmp_path: Path, quota: str, cpus: int | None) -> None:
    assert cgroup_cpu_quota(_v1(tmp_path, quota, "100000\n")) == cpus


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert cpu_count(tmp_path) == len(os.sched_getaffinity(0))


def test_a_quota_under_the_affinity_bounds_the_cores(tmp_path: Path) -> None:
    """A pod limited to 1 CPU on a bigger node: its models get 1 thread, not the node's cores."""
    assert cpu_count(_v2(tmp_path, "100000 100000")) == 1
    assert cpu_count(_v2(tmp_path, "6400000 100000")) == len(os.sched_getaffinity(0))  # the affinity, when fewer
