"""Requests in flight per key and per tenant, held to ``max_concurrent`` in each process.

Every tenant's requests share each upstream's connection pool: one tenant's slow streams
could hold them all, and another's requests then waited for a free connection and went to
the route's fallback at its price (t26). A tenant or key with ``max_concurrent`` may hold
that many requests in flight in a process, from the moment it is admitted until its answer
(a stream's last event) is out and the gateway has let its upstream go; the next one is refused
with a 429 at once.

A stream cut at a stop string the gateway applies gives its place back at the cut: the read of
its upstream past the cut, for the usage, is bounded by the model's pool (half its connections,
a tenant half of those) and ``timeouts.past_stop``, not by ``max_concurrent``, so that no new
request of the key, nor one then refused, nor its next cut turn ends it (t68, t71: an agent loop
under ``max_concurrent: 1`` lost the usage of 4 turns in 5).
"""

from __future__ import annotations

from gateway.errors import RateLimitError

__all__ = ["InFlight", "Slot"]


class Slot:
    """What one admitted request holds; :meth:`release` gives it back (once, however often it is called)."""

    __slots__ = ("_counts", "_held")

    def __init__(self, counts: dict[tuple[str, str], int], held: tuple[tuple[str, str], ...]) -> None:
        self._counts = counts
        self._held = held

    def release(self) -> None:
        held, self._held = self._held, ()
        for scope in held:
            left = self._counts[scope] - 1
            if left:
                self._counts[scope] = left
            else:
                del self._counts[scope]


class InFlight:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def enter(self, key_id: str, tenant: str, key_cap: int | None, tenant_cap: int | None) -> Slot | None:
        """A slot for one more request of the key (and its tenant); None when neither has a cap.
        Raises :class:`RateLimitError` when either is at its cap."""
        scopes: list[tuple[str, str]] = []
        for kind, owner, cap in (("key", key_id, key_cap), ("tenant", tenant, tenant_cap)):
            if cap is None:
                continue
            scope = (kind, owner)
            if self._counts.get(scope, 0) >= cap:
                raise RateLimitError(
                    f"too many requests in flight: {kind} '{owner}' allows {cap} at once in each gateway process"
                    f" ({kind}.max_concurrent)",
                    retry_after_s=1,
                    code="concurrency_limit_exceeded",
                )
            scopes.append(scope)
        if not scopes:
            return None
        for scope in scopes:
            self._counts[scope] = self._counts.get(scope, 0) + 1
        return Slot(self._counts, tuple(scopes))

    def held(self, kind: str, owner: str) -> int:
        return self._counts.get((kind, owner), 0)
