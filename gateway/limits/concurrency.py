"""Requests in flight per key and per tenant, held to ``max_concurrent`` in each process.

Every tenant's requests share each upstream's connection pool: one tenant's slow streams
could hold them all, and another's requests then waited for a free connection and went to
the route's fallback at its price (t26). A tenant or key with ``max_concurrent`` may hold
that many requests in flight in a process, from the moment it is admitted until its answer
(a stream's last event) is out and the gateway has let its upstream go; the next one is refused
with a 429 at once.

A stream cut at a stop string the gateway applies ends for its client at the cut, while the
gateway reads its upstream on for the usage: that read keeps the slot, since it holds the
upstream's generation and a pooled connection (t65: a key with ``max_concurrent: 1`` ran any
number of generations at once). A new request of the same key or tenant may take such a slot
back (:meth:`Slot.lend`): the read is ended there, and its request billed on what was read.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.errors import RateLimitError

__all__ = ["InFlight", "Slot"]


class Slot:
    """What one admitted request holds; :meth:`release` gives it back (once, however often it is called)."""

    __slots__ = ("_counts", "_end", "_held", "_lent")

    def __init__(self, counts: dict[tuple[str, str], int], held: tuple[tuple[str, str], ...], lent: list[Slot]) -> None:
        self._counts = counts
        self._held = held
        self._lent = lent
        self._end: Callable[[], None] | None = None

    def lend(self, end: Callable[[], None]) -> None:
        """The client has its answer, and the slot is held only for work the gateway may cut short
        (t65: a cut stream's upstream read on for its usage): a request of the same key or tenant
        that finds them at their cap calls ``end`` and takes the slot instead of a 429."""
        if self._held and self._end is None:
            self._end = end
            self._lent.append(self)

    def take_back(self) -> None:
        """Released for a new request: the work it was lent for is ended (its ``end`` is called)."""
        end = self._end
        self.release()
        if end is not None:
            end()

    def release_unless_lent(self) -> None:
        """Its stream is gone: given back, unless work the stream handed on holds it (:meth:`lend`)."""
        if self._end is None:
            self.release()

    def holds(self, scope: tuple[str, str]) -> bool:
        return scope in self._held

    def release(self) -> None:
        if self._end is not None:
            self._end = None
            self._lent.remove(self)
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
        self._lent: list[Slot] = []
        """Slots held by work that a new request may end (:meth:`Slot.lend`), oldest first."""

    def enter(self, key_id: str, tenant: str, key_cap: int | None, tenant_cap: int | None) -> Slot | None:
        """A slot for one more request of the key (and its tenant); None when neither has a cap.
        Raises :class:`RateLimitError` when either is at its cap."""
        scopes: list[tuple[str, str]] = []
        for kind, owner, cap in (("key", key_id, key_cap), ("tenant", tenant, tenant_cap)):
            if cap is None:
                continue
            scope = (kind, owner)
            if self._counts.get(scope, 0) >= cap:
                self._take_lent(scope)
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
        return Slot(self._counts, tuple(scopes), self._lent)

    def _take_lent(self, scope: tuple[str, str]) -> None:
        """Free the oldest lent slot of ``scope``, if there is one, ending its work."""
        for slot in self._lent:
            if slot.holds(scope):
                slot.take_back()
                return

    def held(self, kind: str, owner: str) -> int:
        return self._counts.get((kind, owner), 0)
