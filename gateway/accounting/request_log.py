"""One JSON line per finished request: the record cost dashboards are built from.

The schema is documented in docs/request-log.md; bump ``SCHEMA_VERSION`` on any
incompatible change. Lines are handed to a writer thread, so a slow stdout or disk
never blocks the event loop; the thread writes in batches.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import errno
import fcntl
import functools
import os
import select
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import msgspec
import structlog

__all__ = [
    "SCHEMA_VERSION",
    "RequestLogWriter",
    "RequestRecord",
    "configure_logging",
    "exception_frames",
    "log_request",
    "request_line",
    "take_stdout",
    "utc_stamp",
    "write_ops_line",
]

SCHEMA_VERSION = 2


class RequestRecord(msgspec.Struct, kw_only=True):
    """The fields of a request log line, in the order they are written."""

    request_id: str
    key_id: str
    tenant: str
    route: str | None = None
    decision: str | None = None
    p_large: float | None = None
    """Classifier routes: the router's score (higher: the large model helps more)."""
    threshold: float | None = None
    """Classifier routes: the threshold ``p_large`` was held against (a target share moves it)."""
    router_version: str | None = None
    """Classifier routes: the learnt router that scored the request (gateway/learning/); None: the shipped one."""
    model: str | None = None
    provider: str | None = None
    cache: str = "bypass"
    """``bypass`` until a cache layer answers; then ``miss``, ``exact`` or ``semantic``."""
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those the upstream read from its prompt cache (schema 2); 0 on a cache hit."""
    cache_write_tokens: int = 0
    """Of ``prompt_tokens``, those the upstream wrote to its prompt cache (schema 2); 0 on a cache hit."""
    cache_write_1h_tokens: int = 0
    """Of ``cache_write_tokens``, those kept an hour (Anthropic's ``ttl: "1h"``), priced at ``cache_write_1h``."""
    reasoning_tokens: int = 0
    """Of ``completion_tokens``, those spent reasoning (schema 2)."""
    audio_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those of audio (OpenAI's ``input_audio`` parts), priced at ``price.audio_input``."""
    audio_completion_tokens: int = 0
    """Of ``completion_tokens``, those of a spoken answer, priced at ``price.audio_output``."""
    speed: str | None = None
    """What the upstream says the answer ran at (Anthropic's ``usage.speed``: ``fast`` is priced
    at the model's ``price.speed.fast``); None: it said nothing."""
    inference_geo: str | None = None
    """Where the upstream says it ran (Anthropic's ``usage.inference_geo``), priced at ``price.inference_geo``."""
    service_tier: str | None = None
    """The tier the upstream says processed it (OpenAI's ``service_tier``), priced at ``price.service_tier``."""
    server_tool_requests: dict[str, int] | None = None
    """Uses of upstream-run tools, by name (Anthropic's ``server_tool_use``: ``{"web_search": 3}``),
    each billed ``price.server_tools``; None: none."""
    tokens_source: str | None = None
    """``upstream`` when the upstream reported usage, ``gateway`` when counted here."""
    usage_refused: str | None = None
    """Why the upstream's usage was not billed (counts no answer can have: a prompt past the
    model's context window, a completion past ``max_tokens``, 0 for a text): it is counted here."""
    cost_usd: float = 0.0
    baseline_model: str | None = None
    baseline_cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    overhead_ms: float = 0.0
    client_wait_ms: float = 0.0
    """Time spent waiting on the client (its body, a stream's sends): in ``latency_ms``, not ``overhead_ms``."""
    upstream_status: int | None = None
    retries: int = 0
    fallback_used: bool = False
    error_type: str | None = None
    finish_reason: str | None = None
    policy_version: str | None = None
    cache_saved_usd: float | None = None
    """Cache hits: the cost the answer had when it was first paid for, the cache's share of the savings."""
    cache_similarity: float | None = None
    cache_p_same: float | None = None
    """Semantic hits: the verifier's probability that the stored prompt has the same answer."""
    coalesced: bool | None = None
    """True when this request waited for an identical in-flight request's answer."""
    semantic_guard_refusals: int | None = None
    """Semantic lookups: candidates above the similarity floor that the rules or the verifier refused."""
    speculation: dict[str, Any] | None = None
    """Speculative decoding: mode, rounds, drafted and accepted tokens, large-model calls, fallback."""
    protocol: str = "openai.chat"
    """The API the client called: ``openai.chat``, ``openai.completions``, ``openai.responses``,
    ``openai.embeddings`` or ``anthropic.messages``."""
    passthrough: bool | None = None
    """True when the request went upstream as the client sent it (a Responses upstream)."""
    started_at: str = msgspec.field(default_factory=lambda: utc_stamp(time.time()))
    """When the request reached the handler, as ``ts`` is written: the instant its usage and budgets
    count at (``Limiter.reserve``'s ``at``), and ``gateway report`` files it by (t114)."""


@dataclass(slots=True)
class _Sink:
    """Where lines go: a descriptor written with ``os.write``, whole lines per call (a stream
    only when there is no descriptor, as under a test's captured stdout)."""

    fd: int | None
    stream: IO[str] | None
    owned: bool
    limit: int
    """The most bytes one write may carry: ``PIPE_BUF`` for a pipe or terminal, where only
    writes that small are atomic (two workers share one stdout pipe); unbounded for a file
    opened to append, where each write lands whole."""
    file: bool = False
    """A regular file (``path``'s, or stdout redirected to one): a write a full disk cuts part way
    is taken back (:meth:`_take_back`)."""
    path: str | None = None
    """The file the sink appends to, opened again when the path names another (t41: after a
    logrotate-style rename the lines went on into the renamed file, and dashboards lost them)."""
    looked_at: float = 0.0
    torn: bool = False
    """A write failed part way (a full disk) and its fragment could not be taken back, or the file
    ends mid-line (t175: a host crash, a sibling worker killed in a write): the next starts on a
    line of its own, so that the fragment does not spoil a good line (t44)."""
    end: int | None = None
    """The file's size after this sink's last write; None before the first. Another size means
    another writer wrote since (a sibling worker, perhaps killed part way through a line): the
    file's last byte is looked at before the next line (t175), not on every batch."""
    reader: int | None = None
    """A descriptor the file's end is read through (:meth:`_ends_a_line`), kept open as long as
    ``fd``: it is read under the lock, and closing any descriptor of a file lets go of every POSIX
    lock the process holds on it (t194: a sibling's batch landed mid-batch, and left blank lines)."""

    @classmethod
    def of_path(cls, path: str) -> _Sink:
        """A file sink. One that cannot be opened now (its folder moved away) is opened once it can:
        a worker restarted meanwhile failed to start, and took the gateway down with it (t44)."""
        try:
            sink = cls.of_fd(_open_to_append(path), owned=True)
        except OSError:
            sink = cls(None, None, owned=True, limit=1 << 62, file=True)
        sink.path = path
        return sink

    def follow_path(self, now: float) -> None:
        """At most once a second: the path's file is not this one (renamed, deleted): open it. The
        file held, if any, is written on until that succeeds (t44: batches were thrown away)."""
        if self.path is None or now - self.looked_at < _LOOK_EVERY_S:
            return
        self.looked_at = now
        try:
            if self.fd is not None:
                try:
                    named: os.stat_result | None = os.stat(self.path)
                except FileNotFoundError:
                    named = None
                held = os.fstat(self.fd)
                if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    return
        except OSError:
            return  # tried again in a second
        self.reopen(now)

    def reopen(self, now: float) -> OSError | None:
        """Open the path again now, whatever it names; why it could not be. The file held, if any,
        is written on until that succeeds (t44: batches were thrown away); :meth:`follow_path`
        tries again in a second."""
        assert self.path is not None
        self.looked_at = now
        try:
            fd = _open_to_append(self.path)
        except OSError as exc:
            return exc
        if self.fd is not None:
            os.close(self.fd)
        self._close_reader()
        self.fd, self.torn, self.end = fd, False, None
        return None

    @classmethod
    def of_stream(cls, stream: IO[str]) -> _Sink:
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            return cls(None, stream, owned=False, limit=0)
        return cls.of_fd(fd, owned=False)

    @classmethod
    def of_fd(cls, fd: int, *, owned: bool) -> _Sink:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        return cls(fd, None, owned=owned, limit=(1 << 62) if regular else select.PIPE_BUF, file=regular)

    def write(self, lines: list[str]) -> None:
        if self.fd is None:
            if self.stream is None:
                raise FileNotFoundError(errno.ENOENT, "the request log file could not be opened")
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
            return
        held = self._hold()
        try:
            if self.file:
                self._look_at_end()
            landed = 0
            chunk = bytearray(b"\n" if self.torn else b"")
            start = len(chunk)
            ends: list[int] = []  # where each line of the chunk ends in it
            for line in lines:
                encoded = line.encode() + b"\n"
                if ends and len(chunk) + len(encoded) > self.limit:
                    landed += self._write_lines(chunk, start, ends, held, len(lines) - landed)
                    chunk, start, ends = bytearray(), 0, []
                chunk += encoded  # a line longer than the limit goes alone: no write can do better
                ends.append(len(chunk))
            self._write_lines(chunk, start, ends, held, len(lines) - landed)
        finally:
            if held:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _hold(self) -> bool:
        """A file to this process alone while it writes (a POSIX lock: the workers share stdout's
        descriptor, and a lock of ``flock`` or ``F_OFD_SETLK`` would be theirs together): whether it
        is held. Another worker's line can then never land after a fragment before it is taken back
        (t132). No descriptor of the file is closed while it is held (:attr:`reader`)."""
        if not self.file or self.fd is None:
            return False
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except OSError:
            return False  # written all the same; a cut line stays, on a line of its own
        return True

    def _look_at_end(self) -> None:
        """One ``fstat`` a batch: when the file grew or shrank since this sink's last write (or none
        was written yet), whether it ends mid-line (t175: the next line was glued to the fragment)."""
        assert self.fd is not None
        try:
            size = os.fstat(self.fd).st_size
        except OSError:
            return
        if size != self.end:
            ends_a_line = self._ends_a_line(size)
            if ends_a_line is not None:
                self.torn = not ends_a_line
            self.end = size

    def _ends_a_line(self, size: int) -> bool | None:
        """Whether the file, ``size`` bytes long, ends where a line does; None when it cannot be
        read. ``fd`` is open to write only: the file is read through ``/proc``, which names the file
        itself, not its path (a rename may have moved the path on)."""
        if size == 0:
            return True
        try:
            if self.reader is None:
                self.reader = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY)
            return os.pread(self.reader, 1, size - 1) == b"\n"
        except OSError:
            return None

    def _close_reader(self) -> None:
        """Never while the lock is held (:attr:`reader`)."""
        if self.reader is not None:
            with contextlib.suppress(OSError):
                os.close(self.reader)
            self.reader = None

    def _write_lines(self, data: bytearray, start: int, ends: list[int], held: bool, left: int) -> int:
        """Write ``data``, whose lines start at ``start`` (after the newline that ends a fragment
        left before) and end at ``ends``; the lines written. When a write fails part way, the whole
        lines written stay, the part of the next is taken off the file when the file is ``held``,
        and :class:`_LinesLost` says how many of the ``left`` lines did not land."""
        assert self.fd is not None
        written = 0
        while written < len(data):
            try:
                written += os.write(self.fd, memoryview(data)[written:])
            except OSError as exc:
                self.end = None  # the file is looked at again before the next line
                whole = bisect.bisect_right(ends, written)
                fragment = written - (ends[whole - 1] if whole else min(written, start))
                if fragment:
                    self.torn = not (held and self._take_back(fragment))
                elif written >= start:  # the file ends where a line does
                    self.torn = False
                raise _LinesLost(left - whole, exc) from exc
        self.torn = False
        if self.end is not None:
            self.end += len(data)
        return len(ends)

    def _take_back(self, size: int) -> bool:
        """Cut the last ``size`` bytes this sink wrote off the end of its file: whether it did (a
        file grown meanwhile by a writer that takes no lock is left as it is)."""
        assert self.fd is not None
        try:
            end = os.lseek(self.fd, 0, os.SEEK_CUR)  # where its last write ended
            if os.fstat(self.fd).st_size != end:
                return False
            os.ftruncate(self.fd, end - size)
            os.lseek(self.fd, end - size, os.SEEK_SET)  # stdout may not append: no gap before the next line
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._close_reader()
        if self.owned and self.fd is not None:
            os.close(self.fd)


_LOOK_EVERY_S = 1.0


class _LinesLost(Exception):
    """Of a batch, ``count`` lines a sink could not write whole, because of ``error``."""

    def __init__(self, count: int, error: OSError) -> None:
        super().__init__(count, error)
        self.count, self.error = count, error


def _open_to_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class RequestLogWriter:
    """Lines are appended to a list on the caller's thread and written by a background
    thread every ``flush_every_s``: one hand-over per interval, not one per line (a
    per-line queue put cost a GIL hand-off on every request, seen in a profile)."""

    def __init__(
        self,
        *,
        stdout: bool = True,
        stderr: bool = False,
        path: str | None = None,
        flush_every_s: float = 0.02,
        stdout_fd: int | None = None,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        """``stdout_fd``: where "stdout" really is, when ``serve`` moved the process's own stdout to
        stderr so that nothing else (the ASGI server's warnings, a library's print) lands in the log.
        ``on_lost``: called, on the writer's thread, with the number of lines a sink could not take."""
        self._sinks: list[_Sink] = []
        if stdout:
            self._sinks.append(
                _Sink.of_stream(sys.stdout) if stdout_fd is None else _Sink.of_fd(stdout_fd, owned=False)
            )
        if stderr:  # the ops log, often the request log's file too (2>&1): left unlocked, so that
            # its thread never releases the lock the request log's holds (a POSIX lock is the process's)
            ops = _Sink.of_stream(sys.stderr)
            ops.file = False
            self._sinks.append(ops)
        if path:
            self._sinks.append(_Sink.of_path(path))
        self.dropped_lines = 0
        """Lines a sink could not take (a full disk, a closed pipe): said on stderr, at most once a
        minute, and at the end."""
        self._said_lines = 0
        self._said_at = -_SAY_EVERY_S
        self._last_error: Exception | None = None
        self._on_lost = on_lost
        self._reopen_asked = False
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._flush_every_s = flush_every_s
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, line: str) -> None:
        with self._lock:
            self._pending.append(line)

    def reopen(self) -> None:
        """Open the file again at its path before the next line is written (``kill -USR1``, from
        logrotate's ``postrotate``: t109, with ``compress`` and no ``delaycompress`` the lines of
        the second before the path was looked at again went into a file gzip had already read).
        The writer's thread does it, between two batches: no line is cut or lost."""
        self._reopen_asked = True

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_every_s)
            closing = self._closing
            now = time.monotonic()
            if self._reopen_asked:
                self._reopen_asked = False  # first: one asked while this reopens is not lost
                self._reopen_paths(now)
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                for sink in self._sinks:
                    sink.follow_path(now)
                    try:
                        sink.write(batch)
                    except _LinesLost as lost:  # those before the cut landed
                        self._lost(lost.count, lost.error)
                    except (OSError, ValueError) as exc:  # a broken sink must not take the thread down
                        self._lost(len(batch), exc)
            if self.dropped_lines > self._said_lines and (closing or now - self._said_at >= _SAY_EVERY_S):
                self._say_lost(now)
            if closing:
                return

    def _lost(self, lines: int, error: Exception) -> None:
        self.dropped_lines += lines
        self._last_error = error
        if self._on_lost is not None:
            self._on_lost(lines)

    def _reopen_paths(self, now: float) -> None:
        """Open each file sink again, and say so on stderr: logrotate's ``postrotate`` (or whoever
        sent the signal) can tell when every worker writes to the new file."""
        for sink in self._sinks:
            if sink.path is None:
                continue
            failed = sink.reopen(now)
            if failed is None:
                write_ops_line({"event": "request_log_reopened", "level": "info", "path": sink.path})
            else:
                write_ops_line({"event": "request_log_reopen_failed", "level": "error", "path": sink.path,
                                "error": _reason(failed),
                                "effect": "lines go on to the file held until the path opens"})  # fmt: skip

    def _say_lost(self, now: float) -> None:
        """Say on stderr how many lines did not land since it was last said (t41: a full disk lost
        every line in silence; t44: only the first failure of a minute was counted): written here,
        not through a logger, which may be what failed."""
        notice = {"event": "request_log_write_failed", "level": "error", "error": _reason(self._last_error),
                  "dropped_lines": self.dropped_lines - self._said_lines,
                  "dropped_lines_total": self.dropped_lines}  # fmt: skip
        self._said_at, self._said_lines = now, self.dropped_lines
        write_ops_line(notice)

    def close(self) -> None:
        """Write what is pending and stop (at shutdown: nothing is lost)."""
        if self._thread.is_alive():
            self._closing = True
            self._wake.set()
            self._thread.join(timeout=5)
        for sink in self._sinks:
            sink.close()
        self._sinks = []


_SAY_EVERY_S = 60.0


def _reason(exc: Exception | None) -> str:
    return errno.errorcode.get(exc.errno, "") if isinstance(exc, OSError) and exc.errno else type(exc).__name__


def write_ops_line(notice: dict[str, Any]) -> None:
    """A line on stderr, written here, not through a logger, which may be what failed; with the
    pid and ``ts``, as the ops log's lines have them (a shipper places a line by its ``ts``)."""
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    with contextlib.suppress(OSError):
        os.write(2, msgspec.json.encode({**notice, "pid": os.getpid(), "ts": ts}) + b"\n")


def take_stdout() -> int:
    """Keep stdout for the request log, which dashboards parse line by line: a descriptor of its
    own is returned, and this process's stdout now goes to stderr, so that a server's warnings
    or anything a library prints never land between request lines."""
    sys.stdout.flush()
    request_log = os.dup(1)
    os.dup2(2, 1)
    return request_log


class _QueuedLogger:
    """structlog's final logger: hands the rendered line to the writer thread."""

    def __init__(self, writer: RequestLogWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write(message)

    info = warning = error = debug = critical = exception = msg


def _encode(event: dict[str, Any], **_: Any) -> str:
    return msgspec.json.encode(event).decode()


REQUEST_LOGGER = "gateway.request"

_request_writer: RequestLogWriter | None = None


def configure_logging(request_writer: RequestLogWriter, ops_writer: RequestLogWriter) -> None:
    """JSON lines for every structlog logger: request lines to ``request_writer``, the rest to ``ops_writer``."""
    global _request_writer
    _request_writer = request_writer

    def factory(name: str | None = None, *_: Any) -> _QueuedLogger:
        return _QueuedLogger(request_writer if name == REQUEST_LOGGER else ops_writer)

    def add_pid(logger: _QueuedLogger, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Which worker wrote an ops line: with ``--workers 2`` each says ``policy_reloaded``
        (t113). Not the request log, whose schema is docs/request-log.md."""
        if logger._writer is ops_writer:
            event["pid"] = os.getpid()
        return event

    structlog.configure(
        processors=[
            add_pid,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_encode),
        ],
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def log_request(record: RequestRecord) -> None:
    """Write the request's line. Once :func:`configure_logging` ran, straight to the request
    log's writer, encoded from the record in one call (structlog's processor chain cost ~8 %
    of the proxy path's CPU in a profile); before, through structlog, where tests capture it."""
    writer = _request_writer
    if writer is None:
        structlog.get_logger(REQUEST_LOGGER).info("request", **request_event(record))
    else:
        writer.write(request_line(record))


_RECORD_ENCODER = msgspec.json.Encoder()
_LINE_END = b',"schema_version":%d,"event":"request","level":"info","ts":"%s.%06dZ"}'
_second: list[Any] = [-1, b""]
"""The last second formatted for ``ts``, and its text: strftime once a second, not per line."""


def request_line(record: RequestRecord) -> str:
    """The JSON line structlog would write for ``log.info("request", **request_event(record))``."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()]
    head = _RECORD_ENCODER.encode(record)
    return (head[:-1] + _LINE_END % (SCHEMA_VERSION, _second[1], int((now - second) * 1e6))).decode()


def utc_stamp(at: float) -> str:
    """``at`` (seconds since the epoch) as ``ts`` is written: ISO 8601 UTC, microseconds."""
    second = int(at)
    return f"{_second_text(second)}.{int((at - second) * 1e6):06d}Z"


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def request_event(record: RequestRecord) -> dict[str, Any]:
    """The record as keyword arguments for ``log.info("request", **...)``."""
    fields = msgspec.structs.asdict(record)
    fields["schema_version"] = SCHEMA_VERSION
    return fields


def exception_frames(exc: BaseException, depth: int = 6) -> list[str]:
    """Where an exception was raised, as ``file:line function``, for logs.

    Its message is left out on purpose: it may quote the request (a KeyError names
    the key, a TypeError the value), and contents never reach the logs.
    """
    frames = traceback.extract_tb(exc.__traceback__)[-depth:]
    return [f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in frames]
