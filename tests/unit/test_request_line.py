"""The request log's line, written straight from the record, is the line structlog's chain writes."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import structlog

from gateway.accounting import request_log as request_log_module
from gateway.accounting.request_log import (
    RequestLogWriter,
    RequestRecord,
    configure_logging,
    log_request,
    request_event,
    request_line,
)


def _structlog_line(record: RequestRecord) -> dict[str, object]:
    lines: list[str] = []

    class Sink:
        def msg(self, message: str) -> None:
            lines.append(message)

        info = msg

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.JSONRenderer(serializer=lambda event, **_: msgspec.json.encode(event).decode()),
        ],
        logger_factory=lambda *_: Sink(),
        cache_logger_on_first_use=False,
    )
    try:
        structlog.get_logger("gateway.request").info("request", **request_event(record))
    finally:
        structlog.reset_defaults()
    (line,) = lines
    decoded: dict[str, object] = msgspec.json.decode(line)
    return decoded


def test_the_direct_line_has_the_same_fields_in_the_same_order() -> None:
    record = RequestRecord(
        request_id="r1",
        key_id="k",
        tenant="acme",
        route="auto",
        p_large=0.25,
        cost_usd=1.5e-05,
        latency_ms=0.812,
        speculation={"mode": "draft", "rounds": 3},
        passthrough=True,
    )
    direct: dict[str, object] = msgspec.json.decode(request_line(record))
    expected = _structlog_line(record)
    assert list(direct) == list(expected)
    stamp, expected_stamp = direct.pop("ts"), expected.pop("ts")
    assert direct == expected
    assert isinstance(stamp, str) and isinstance(expected_stamp, str)
    assert (
        stamp[:16] == expected_stamp[:16] and stamp.endswith("Z") and len(stamp) == len("2026-12-01T09:52:00.021879Z")
    )


def test_a_configured_gateway_writes_request_lines_to_the_request_log_only(tmp_path: Path) -> None:
    request_log, ops_log = tmp_path / "requests.jsonl", tmp_path / "ops.jsonl"
    requests = RequestLogWriter(stdout=False, path=str(request_log))
    ops = RequestLogWriter(stdout=False, path=str(ops_log))
    configure_logging(requests, ops)
    try:
        log_request(RequestRecord(request_id="r2", key_id="k", tenant="t"))
        structlog.get_logger("gateway.app").info("something_else")
    finally:
        requests.close()
        ops.close()
        structlog.reset_defaults()
        request_log_module._request_writer = None
    (line,) = request_log.read_text().splitlines()
    assert msgspec.json.decode(line)["request_id"] == "r2"
    assert "r2" not in ops_log.read_text() and "something_else" in ops_log.read_text()


def test_ops_lines_say_which_process_wrote_them_and_request_lines_do_not(tmp_path: Path) -> None:
    """t113: with ``serve --workers 2`` each worker's ``policy_reloaded`` came twice, alike."""
    request_log, ops_log = tmp_path / "requests.jsonl", tmp_path / "ops.jsonl"
    requests = RequestLogWriter(stdout=False, path=str(request_log))
    ops = RequestLogWriter(stdout=False, path=str(ops_log))
    configure_logging(requests, ops)
    try:
        log_request(RequestRecord(request_id="r3", key_id="k", tenant="t"))
        structlog.get_logger(request_log_module.REQUEST_LOGGER).info("request", request_id="r4")
        structlog.get_logger("gateway.policy").info("policy_reloaded", version="abc")
    finally:
        requests.close()
        ops.close()
        structlog.reset_defaults()
        request_log_module._request_writer = None
    (line,) = ops_log.read_text().splitlines()
    assert msgspec.json.decode(line)["pid"] == os.getpid()
    assert [("pid" in msgspec.json.decode(line)) for line in request_log.read_text().splitlines()] == [False, False]


def test_a_log_file_renamed_by_logrotate_is_opened_again_at_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t41: after a rename (logrotate's default) lines went on into the renamed file, forever."""
    monkeypatch.setattr(request_log_module, "_LOOK_EVERY_S", 0.0)
    path = tmp_path / "requests.jsonl"
    writer = RequestLogWriter(stdout=False, path=str(path), flush_every_s=0.005)
    writer.write('{"n": 1}')
    _wait_for(lambda: path.exists() and path.read_text() == '{"n": 1}\n')
    path.rename(tmp_path / "requests.jsonl.1")
    writer.write('{"n": 2}')
    writer.close()
    assert (tmp_path / "requests.jsonl.1").read_text() == '{"n": 1}\n'
    assert path.read_text() == '{"n": 2}\n'


def test_a_reopen_moves_the_next_line_to_the_file_the_path_names_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """t109: logrotate's create + compress gzipped the renamed file while lines still went into it
    (the path is looked at once a second): its postrotate asks for the reopen, which comes first."""
    monkeypatch.setattr(request_log_module, "_LOOK_EVERY_S", 1e9)  # only the reopen moves it
    path, rotated = tmp_path / "requests.jsonl", tmp_path / "requests.jsonl.1"
    writer = RequestLogWriter(stdout=False, path=str(path), flush_every_s=0.005)
    writer.write('{"n": 1}')
    _wait_for(lambda: path.exists() and path.read_text() == '{"n": 1}\n')
    path.rename(rotated)
    path.touch()  # logrotate's create
    writer.reopen()
    writer.write('{"n": 2}')
    writer.close()
    assert rotated.read_text() == '{"n": 1}\n'
    assert path.read_text() == '{"n": 2}\n'
    said = [msgspec.json.decode(line) for line in capfd.readouterr().err.splitlines() if "request_log" in line]
    stamps = [line.pop("ts") for line in said]  # t140: a shipper places an ops line by its ts, as any other
    assert said == [{"event": "request_log_reopened", "level": "info", "path": str(path), "pid": os.getpid()}]
    assert all(datetime.fromisoformat(stamp).tzinfo is not None for stamp in stamps)


def test_lines_a_full_disk_refuses_are_counted_and_said(capfd: pytest.CaptureFixture[str]) -> None:
    """t41: with the log on a full disk every line was lost, with no word anywhere."""
    lost: list[int] = []
    writer = RequestLogWriter(stdout=False, path="/dev/full", flush_every_s=0.005, on_lost=lost.append)
    writer.write('{"n": 1}')
    writer.write('{"n": 2}')
    _wait_for(lambda: writer.dropped_lines == 2)
    writer.write('{"n": 3}')
    writer.close()
    assert writer.dropped_lines == sum(lost) == 3  # on_lost: the metric
    said = [msgspec.json.decode(line) for line in capfd.readouterr().err.splitlines() if "request_log" in line]
    # once a minute at most, and at the end: every line lost is counted (t44: only the first)
    assert [notice["error"] for notice in said] == ["ENOSPC", "ENOSPC"]
    assert sum(notice["dropped_lines"] for notice in said) == said[-1]["dropped_lines_total"] == 3


def _wait_for(done: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_log_path_that_cannot_be_opened_yet_is_opened_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t44: a worker restarted while the log's folder was away failed to start, and serve stopped
    the whole gateway; and a write that failed part way glued its fragment to the next good line."""
    monkeypatch.setattr(request_log_module, "_LOOK_EVERY_S", 0.0)
    folder = tmp_path / "logs"
    writer = RequestLogWriter(stdout=False, path=str(folder / "requests.jsonl"), flush_every_s=0.005)
    writer.write('{"n": 1}')
    _wait_for(lambda: writer.dropped_lines == 1)  # counted, not a crash
    folder.mkdir()
    writer.write('{"n": 2}')
    writer.close()
    assert (folder / "requests.jsonl").read_text() == '{"n": 2}\n'


def test_a_line_cut_by_a_full_disk_does_not_spoil_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "requests.jsonl"
    sink = request_log_module._Sink.of_path(str(path))
    real_write = os.write
    calls = 0

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(request_log_module._LinesLost):
        sink.write(['{"n": 1}'])
    monkeypatch.setattr(os, "write", real_write)
    sink.write(['{"n": 2}'])
    sink.close()
    assert path.read_text().splitlines() == ['{"n": 2}']  # the fragment taken back (t132)


@pytest.mark.parametrize("sink", ["path", "stdout"])
def test_a_line_another_worker_left_cut_does_not_spoil_the_next(tmp_path: Path, sink: str) -> None:
    """t175: a sibling killed part way through a write (SIGKILL, the OOM killer) left the file
    ending mid-line, and this worker's next line was glued onto the fragment."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"n": 0, "cut')  # as a host crash left it
    stdout = os.open(path, os.O_WRONLY | os.O_APPEND)  # serve >> requests.jsonl
    mine = (
        request_log_module._Sink.of_path(str(path))
        if sink == "path"
        else request_log_module._Sink.of_fd(stdout, owned=False)
    )
    sibling = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        mine.write(['{"n": 1}'])
        os.write(sibling, b'{"n": 2}\n{"n": 3, "cut')  # a line, then the part of one it was killed in
        mine.write(['{"n": 4}', '{"n": 5}'])
        os.write(sibling, b'{"n": 6}\n')  # whole lines after it: nothing to mend
        mine.write(['{"n": 7}'])
    finally:
        mine.close()
        os.close(sibling)
        os.close(stdout)
    assert path.read_bytes().splitlines() == [
        b'{"n": 0, "cut',
        b'{"n": 1}',
        b'{"n": 2}',
        b'{"n": 3, "cut',
        b'{"n": 4}',
        b'{"n": 5}',
        b'{"n": 6}',
        b'{"n": 7}',
    ]


_WRITE_LINES = """
import resource, sys
from gateway.accounting.request_log import RequestLogWriter
path, first, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if limit:  # writes past it fail with EFBIG, the first one part way: as on a disk that fills up
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
writer = RequestLogWriter(stdout=path == "-", path=None if path == "-" else path)
for n in range(first, first + count):
    writer.write('{"n": %d, "pad": "%s"}' % (n, "x" * 90))
writer.close()
print(writer.dropped_lines, file=sys.stderr)
"""


@pytest.mark.parametrize("sink", ["path", "stdout"])
def test_a_line_a_full_disk_cuts_is_taken_off_the_file_and_counted_lost(tmp_path: Path, sink: str) -> None:
    """t132: the part of a line a full disk let through stayed in the file, where the next line
    another worker appended was glued to it: that line was spoilt too, and counted by no one."""
    import subprocess
    import sys

    path = tmp_path / "requests.jsonl"

    def worker(first: int, count: int, file_size_limit: int) -> int:
        argv = [sys.executable, "-c", _WRITE_LINES, "-" if sink == "stdout" else str(path), str(first), str(count),
                str(file_size_limit)]  # fmt: skip
        with path.open("ab") as stdout:  # serve > requests.jsonl
            done = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, check=True, timeout=60)
        return int(done.stderr.splitlines()[-1])

    lost = worker(0, 12, 1000)  # lines of 110 bytes: the tenth is cut after 10
    lost += worker(100, 3, 0)  # another worker's, after it
    records = [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]  # each line whole
    assert [record["n"] for record in records] == [*range(9), 100, 101, 102]
    assert lost == 3  # the cut line and those after it; not those that landed before it


_WRITE_IN_BATCHES = """
import sys, time
from gateway.accounting.request_log import RequestLogWriter
path, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = RequestLogWriter(stdout=path == "-", path=None if path == "-" else path, flush_every_s=0.0005)
for n in range(first, first + count):
    writer.write('{"n": %d, "pad": "%s"}' % (n, "x" * 3000))
    if n % 3 == 0:
        time.sleep(0.0005)  # many small batches, each taking the lock
writer.close()
"""


@pytest.mark.parametrize("sink", ["path", "stdout"])
def test_two_workers_writing_one_log_leave_no_blank_or_cut_line(tmp_path: Path, sink: str) -> None:
    """t194: looking at the file's end, under the lock, closed a descriptor of the file, which
    let go of the lock: a sibling's batch then landed while this worker's was half written, it
    saw a cut line at the end and began its own with a newline, and the log had blank lines."""
    import subprocess
    import sys

    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"n": -1}\n')  # not empty: the end is read before the first batch
    count, target = 3000, "-" if sink == "stdout" else str(path)
    with path.open("ab") as stdout:  # serve > requests.jsonl: one description the workers share
        workers = [
            subprocess.Popen([sys.executable, "-c", _WRITE_IN_BATCHES, target, str(first), str(count)], stdout=stdout)
            for first in (0, 100_000)
        ]
        assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    lines = path.read_bytes().split(b"\n")
    assert lines.pop() == b""  # the file ends with a newline
    assert [line for line in lines if not line] == []
    numbers = [msgspec.json.decode(line)["n"] for line in lines]  # each line whole
    assert sorted(numbers) == [-1, *range(count), *range(100_000, 100_000 + count)]


_TRY_THE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(3)
"""


def _locked_by_another_process(path: Path) -> bool:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRY_THE_LOCK, str(path)], timeout=30, check=False)
    assert done.returncode in (0, 3)
    return done.returncode == 3


@pytest.mark.parametrize("sink", ["path", "stdout"])
def test_the_file_stays_locked_while_a_batch_is_written_after_its_end_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: str
) -> None:
    """t194: closing any descriptor of a file lets go of every POSIX lock the process holds on
    it; the one the end was read through was closed before the batch was written."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"n": 0}\n')  # not empty: its last byte is read
    stdout = os.open(path, os.O_WRONLY | os.O_APPEND)  # serve >> requests.jsonl
    mine = (
        request_log_module._Sink.of_path(str(path))
        if sink == "path"
        else request_log_module._Sink.of_fd(stdout, owned=False)
    )
    real_write = os.write
    locked: list[bool] = []

    def looking_at_the_lock(fd: int, data: bytes | memoryview) -> int:
        locked.append(_locked_by_another_process(path))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", looking_at_the_lock)
    try:
        mine.write(['{"n": 1}'])
    finally:
        monkeypatch.setattr(os, "write", real_write)
        mine.close()
        os.close(stdout)
    assert locked == [True]
    assert not _locked_by_another_process(path)  # and let go after the batch
    assert path.read_bytes().splitlines() == [b'{"n": 0}', b'{"n": 1}']


def test_a_cut_line_is_taken_back_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """t194: the take-back after a full disk (t132) ran after the lock had been let go, where it
    could cut off a line a sibling appended meanwhile."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"n": 0}\n')
    sink = request_log_module._Sink.of_path(str(path))
    real_write, real_truncate = os.write, os.ftruncate
    locked: list[bool] = []

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if not locked:
            locked.append(True)
            return real_write(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    def looking_at_the_lock(fd: int, length: int) -> None:
        locked.append(_locked_by_another_process(path))
        real_truncate(fd, length)

    monkeypatch.setattr(os, "write", half_then_full)
    monkeypatch.setattr(os, "ftruncate", looking_at_the_lock)
    try:
        with pytest.raises(request_log_module._LinesLost):
            sink.write(['{"n": 1}'])
    finally:
        monkeypatch.setattr(os, "write", real_write)
        monkeypatch.setattr(os, "ftruncate", real_truncate)
        sink.close()
    assert locked == [True, True]  # the take-back ran, with the file locked
    assert path.read_bytes() == b'{"n": 0}\n'
