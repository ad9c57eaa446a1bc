"""Streaming totals over request log lines (docs/request-log.md).

One pass keeps totals per (UTC day, key, tenant, model, route) — the finest grain any
report asks for — so a table grouped any way and the chart all roll
up from the same small set of cells instead of re-reading the log. The hot loop
decodes each line with a typed msgspec Struct (only the fields used here) and adds
into plain lists; any line that does not decode as a request line (blank lines,
other events, broken lines) takes a slower path that only classifies it. There is no
bytes pre-filter: in a request log nearly every line is a request line, and searching
each ~700-byte line for ``"request"`` cost more (~0.6 µs) than it saved.
"""

from __future__ import annotations

import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import IO, Annotated, Any

import msgspec

__all__ = [
    "DIMENSIONS",
    "Aggregator",
    "DamagedLog",
    "LogLine",
    "Totals",
    "aggregate_path",
    "open_log",
    "parse_dimensions",
    "parse_until",
    "parse_when",
]

DIMENSIONS = ("day", "key", "tenant", "model", "route")
"""What ``--by`` can group on, in the order of a cell's key."""

Cell = tuple[date, str, str, str | None, str | None]
GroupKey = tuple[str | None, ...]


class LogLine(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    """The fields of a request line a report needs; every other field is skipped."""

    event: str
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    key_id: str
    tenant: str
    route: str | None
    model: str | None
    cache: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    baseline_cost_usd: float
    cache_saved_usd: float | None = None
    started_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    """When the request started, the instant its usage counts at; lines written before the field
    have only ``ts``, its end."""


class _EventOnly(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    event: Any = None


_decode_line = msgspec.json.Decoder(LogLine).decode
_decode_event = msgspec.json.Decoder(_EventOnly).decode

# Positions in a cell's accumulator list.
_REQUESTS, _ERRORS, _PROMPT, _COMPLETION, _COST, _BASELINE, _EXACT, _SEMANTIC, _SAVED = range(9)
_FIELDS = 9


@dataclass(slots=True)
class Totals:
    """Summed figures for one group; ``savings_usd`` is the cache's and routing's: ``cache_saved_usd``
    is the cache's share, the rest routing's (negative where dearer models than the baseline answered)."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    cache_exact: int = 0
    cache_semantic: int = 0
    cache_saved_usd: float = 0.0

    @property
    def savings_usd(self) -> float:
        return self.baseline_cost_usd - self.cost_usd

    @property
    def savings_pct(self) -> float | None:
        """Savings as a share of the baseline cost; ``None`` when there is no baseline cost."""
        return 100.0 * self.savings_usd / self.baseline_cost_usd if self.baseline_cost_usd else None

    @property
    def cache_hits(self) -> int:
        return self.cache_exact + self.cache_semantic

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.baseline_cost_usd += other.baseline_cost_usd
        self.cache_exact += other.cache_exact
        self.cache_semantic += other.cache_semantic
        self.cache_saved_usd += other.cache_saved_usd

    def as_dict(self) -> dict[str, int | float | None]:
        """Every figure, derived ones included, in the order reports show them."""
        out: dict[str, int | float | None] = asdict(self)
        out["cache_hits"] = self.cache_hits
        out["savings_usd"] = self.savings_usd
        out["savings_pct"] = self.savings_pct
        return out

    @classmethod
    def _from_list(cls, acc: list[Any]) -> Totals:
        return cls(
            requests=acc[_REQUESTS],
            errors=acc[_ERRORS],
            prompt_tokens=acc[_PROMPT],
            completion_tokens=acc[_COMPLETION],
            cost_usd=acc[_COST],
            baseline_cost_usd=acc[_BASELINE],
            cache_exact=acc[_EXACT],
            cache_semantic=acc[_SEMANTIC],
            cache_saved_usd=acc[_SAVED],
        )


class Aggregator:
    """Totals over request lines whose ``started_at`` (``ts`` on a line without it) lies in ``[since, until)``.

    Line counters: ``lines`` read, ``blank``, ``malformed`` (not JSON, not an object,
    or a request line with a missing or mistyped field), ``ignored`` (other events),
    ``out_of_period`` (request lines outside the period) and ``requests`` (counted).
    """

    def __init__(self, since: datetime | None = None, until: datetime | None = None) -> None:
        for name, bound in (("since", since), ("until", until)):
            if bound is not None and bound.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        self.since = since
        self.until = until
        self.lines = 0
        self.blank = 0
        self.malformed = 0
        self.ignored = 0
        self.out_of_period = 0
        self._cells: dict[Cell, list[Any]] = {}

    @property
    def requests(self) -> int:
        return sum(acc[_REQUESTS] for acc in self._cells.values())

    def feed(self, lines: Iterable[bytes]) -> None:
        """Add every request line in ``lines`` (bytes, with or without the newline)."""
        cells = self._cells
        get = cells.get
        decode = _decode_line
        decode_error = (msgspec.DecodeError, RecursionError)  # t201: a line nested 50,000 deep ended the report
        since, until = self.since, self.until
        utc = UTC
        read = skipped = 0
        try:
            for line in lines:
                read += 1
                try:
                    r = decode(line)
                except decode_error:
                    self._classify(line)
                    continue
                if r.event != "request":
                    self.ignored += 1
                    continue
                ts = r.started_at or r.ts  # the day /v1/usage and the budgets count it on (t114)
                if (since is not None and ts < since) or (until is not None and ts >= until):
                    skipped += 1
                    continue
                day = ts.date() if ts.tzinfo is utc else ts.astimezone(utc).date()
                cell = (day, r.key_id, r.tenant, r.model, r.route)
                acc = get(cell)
                if acc is None:
                    acc = cells[cell] = [0, 0, 0, 0, 0.0, 0.0, 0, 0, 0.0]
                acc[_REQUESTS] += 1
                if r.status >= 400:
                    acc[_ERRORS] += 1
                acc[_PROMPT] += r.prompt_tokens
                acc[_COMPLETION] += r.completion_tokens
                acc[_COST] += r.cost_usd
                acc[_BASELINE] += r.baseline_cost_usd
                cache = r.cache
                if cache == "exact":
                    acc[_EXACT] += 1
                elif cache == "semantic":
                    acc[_SEMANTIC] += 1
                saved = r.cache_saved_usd
                if saved:
                    acc[_SAVED] += saved
        finally:
            self.lines += read
            self.out_of_period += skipped

    def _classify(self, line: bytes) -> None:
        """A line the fast path did not take: blank, another event, or malformed."""
        if not line.strip():
            self.blank += 1
            return
        try:
            event = _decode_event(line).event
        except (msgspec.DecodeError, RecursionError):
            self.malformed += 1
            return
        if event == "request":
            self.malformed += 1
        else:
            self.ignored += 1

    def cells(self) -> Iterator[tuple[Cell, Totals]]:
        for cell, acc in self._cells.items():
            yield cell, Totals._from_list(acc)

    def rows(self, by: Sequence[str], *, key_id: str | None = None) -> list[tuple[GroupKey, Totals]]:
        """Totals grouped by ``by`` (names from ``DIMENSIONS``, in that order), sorted by group.

        ``day`` values are ISO dates; a missing model or route is ``None``.
        """
        index = [DIMENSIONS.index(name) for name in parse_dimensions(by)]
        groups: dict[GroupKey, list[Any]] = {}
        for cell, acc in self._cells.items():
            if key_id is not None and cell[1] != key_id:
                continue
            group: GroupKey = tuple(_dimension(cell, i) for i in index)
            into = groups.get(group)
            if into is None:
                groups[group] = list(acc)
            else:
                for i in range(_FIELDS):
                    into[i] += acc[i]
        ordered = sorted(groups.items(), key=lambda item: tuple("" if v is None else v for v in item[0]))
        return [(group, Totals._from_list(acc)) for group, acc in ordered]

    def total(self, *, key_id: str | None = None) -> Totals:
        rows = self.rows((), key_id=key_id)
        return rows[0][1] if rows else Totals()

    def counters(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "requests": self.requests,
            "out_of_period": self.out_of_period,
            "ignored": self.ignored,
            "blank": self.blank,
            "malformed": self.malformed,
        }


def _dimension(cell: Cell, i: int) -> str | None:
    """A cell's value for one dimension; the day as an ISO date."""
    value = cell[i]
    return value.isoformat() if isinstance(value, date) else value


def parse_dimensions(by: str | Sequence[str]) -> tuple[str, ...]:
    """``"day,model"`` or ``["day", "model"]`` → ``("day", "model")``; rejects unknown or repeated names."""
    names = [part.strip() for part in by.split(",")] if isinstance(by, str) else [str(part) for part in by]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown grouping {', '.join(unknown)}: choose from {', '.join(DIMENSIONS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated grouping in {','.join(names)}")
    return tuple(names)


_RELATIVE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime from ``2026-11-20``, ``2026-11-20T12:00[:00][Z|±hh:mm]`` or ``7d``/``24h``/``30m``/``2w`` ago.

    Dates mean midnight UTC; datetimes without an offset are taken as UTC; relative
    times are truncated to the second.
    """
    match = _RELATIVE.match(text)
    if match:
        now = now or datetime.now(UTC)
        ago = now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return ago.astimezone(UTC).replace(microsecond=0)
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a date, datetime or relative time (7d, 24h, 30m, 2w): {text!r}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_until(text: str, *, now: datetime | None = None) -> datetime:
    """The first time excluded, from the forms :func:`parse_when` reads; but a date alone means
    through that whole day (to the next midnight UTC), as ``/v1/usage``'s ``end`` does, so the
    two agree on one pair of dates (t63: ``--until 2026-12-03`` left out the 3rd)."""
    bound = parse_when(text, now=now)
    try:
        date.fromisoformat(text.strip())
    except ValueError:  # a datetime, or a relative time: exact
        return bound
    try:
        return bound + timedelta(days=1)
    except OverflowError:  # through 9999-12-31: no end
        return datetime.max.replace(tzinfo=UTC)


@contextmanager
def open_log(path: str) -> Iterator[Iterable[bytes]]:
    """The lines of a log file, a gzipped one (by its magic bytes), or stdin for ``-``.

    A gzipped log that is cut short or corrupt gives every whole line before the damage,
    then raises :class:`DamagedLog`.
    """
    if path == "-":
        stream: IO[bytes] = sys.stdin.buffer
        peek = getattr(stream, "peek", None)
        yield _gunzipped_lines(stream) if peek is not None and peek(2)[:2] == _GZIP_MAGIC else stream
        return
    with open(path, "rb") as file:
        yield _gunzipped_lines(file) if file.peek(2)[:2] == _GZIP_MAGIC else file


class DamagedLog(Exception):
    """A gzipped log that ends early or holds corrupt data; raised once every line before the damage was read."""

    def __init__(self, damage: str) -> None:
        super().__init__(damage)
        self.damage = damage


_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31  # zlib's gzip wrapper: header and CRC checked
_CHUNK = 1 << 16  # bytes read at a time, and inflated at most per call: MiB-sized blocks split slower


def _gunzipped_lines(raw: IO[bytes]) -> Iterator[bytes]:
    """The lines (``\\n`` dropped) of a gzipped stream, whose members come one after another.

    Inflated chunk by chunk with zlib rather than through ``GzipFile``, whose EOFError
    loses what its read buffer held (t109: a cut log lost up to 64 KiB of lines). A part
    line at the damage is not a line the writer finished: it is left out.
    """
    rest = b""
    for block in _inflated(raw):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:  # the last line has no newline, as a plain log's may not
        yield rest


def _inflated(raw: IO[bytes]) -> Iterator[bytes]:
    """The inflated data of every gzip member in ``raw``, as zlib gives it; trailing zeros are
    skipped, as ``gzip`` does. On damage, all the data before it, then :class:`DamagedLog`."""
    data = raw.read(_CHUNK)
    while data:
        inflater = zlib.decompressobj(_GZIP_WBITS)
        while True:
            before = inflater.copy()
            try:
                block = inflater.decompress(data, _CHUNK)
            except zlib.error as exc:  # the call's data before the damage is lost with it: again byte by byte
                yield from _up_to_error(before, data)
                raise DamagedLog(f"holds corrupt data ({exc})") from None
            if not block and not data:
                raise DamagedLog("ends early")
            yield block
            if inflater.eof:
                break
            data = inflater.unconsumed_tail or raw.read(_CHUNK)  # b"" at the end: what zlib holds back, if any
        data = _past_zeros(inflater.unused_data, raw)


def _up_to_error(inflater: Any, data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        try:
            block = inflater.decompress(data[i : i + 1])
        except zlib.error:
            return
        yield block


def _past_zeros(data: bytes, raw: IO[bytes]) -> bytes:
    """What follows a member, zero padding skipped: the next member's start, or ``b""`` at the end."""
    data = data.lstrip(b"\0")
    while not data:
        data = raw.read(_CHUNK)
        if not data:
            return b""
        data = data.lstrip(b"\0")
    return data


def aggregate_path(path: str, since: datetime | None = None, until: datetime | None = None) -> Aggregator:
    """Read a whole log (path, gzipped file or ``-``) into a new ``Aggregator``."""
    aggregator = Aggregator(since, until)
    with open_log(path) as stream:
        aggregator.feed(stream)
    return aggregator
