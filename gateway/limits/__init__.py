"""Rate limits (:mod:`.rate`) and budgets (:mod:`.budget`), enforced together by :class:`Limiter`."""

from gateway.limits.limiter import Limiter, Reservation

__all__ = ["Limiter", "Reservation"]
