"""One day's usage of a key or a tenant: the one list of the stored usage fields.

The limiter adds a request's figures to Redis hashes of these fields, ``GET /v1/usage``
reads them back and sums them; nothing else spells the stored field names out. The
offline report (:class:`gateway.reporting.aggregate.Totals`) sums the request log's
fields instead, on its own, and splits cache hits into exact and semantic ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import msgspec

from gateway.accounting.request_log import RequestRecord

__all__ = ["USAGE_FIELDS", "UsageFigures"]


class UsageFigures(msgspec.Struct, kw_only=True):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    """What the same tokens would have cost on the route's baseline (large) model."""
    cache_saved_usd: float = 0.0
    cache_hits: int = 0
    errors: int = 0

    @property
    def savings_usd(self) -> float:
        return self.baseline_cost_usd - self.cost_usd

    def as_reported(self) -> dict[str, int | float]:
        """The fields and ``savings_usd``, dollars rounded to a ten-billionth: below any price per
        token, above the noise of summed floats (0.3 - 0.1 - 0.2 is -2.8e-17, not 0)."""
        row: dict[str, int | float] = msgspec.structs.asdict(self)
        row["savings_usd"] = self.savings_usd
        for name in _DOLLAR_FIELDS:
            row[name] = round(row[name], 10)
        return row

    def add(self, other: UsageFigures) -> None:
        # Spelled out: this runs twice per request, and a loop over getattr/setattr costs 3x as much.
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.baseline_cost_usd += other.baseline_cost_usd
        self.cache_saved_usd += other.cache_saved_usd
        self.cache_hits += other.cache_hits
        self.errors += other.errors

    def increments(self) -> Iterator[tuple[str, int | float]]:
        """``(field, value)`` for every field that is not zero."""
        for name in USAGE_FIELDS:
            value = getattr(self, name)
            if value:
                yield name, value

    @classmethod
    def of_request(cls, record: RequestRecord) -> UsageFigures:
        """What one finished request adds to its key's and tenant's usage."""
        return cls(
            requests=1,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cost_usd=record.cost_usd,
            baseline_cost_usd=record.baseline_cost_usd,
            cache_saved_usd=record.cache_saved_usd or 0.0,
            cache_hits=int(record.cache in ("exact", "semantic")),
            errors=int(record.status >= 400),
        )

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> UsageFigures:
        """From a Redis hash of these fields (unknown fields are ignored)."""
        figures = cls()
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            if name in _INTEGERS:
                setattr(figures, name, int(float(value)))
            elif name in USAGE_FIELDS:
                setattr(figures, name, float(value))
        return figures


USAGE_FIELDS = tuple(field.name for field in msgspec.structs.fields(UsageFigures))
_INTEGERS = frozenset(field.name for field in msgspec.structs.fields(UsageFigures) if field.type is int)


_DOLLAR_FIELDS = ("cost_usd", "baseline_cost_usd", "cache_saved_usd", "savings_usd")
