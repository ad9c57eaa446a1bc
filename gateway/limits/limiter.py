"""Limits per key and per tenant, enforced in the shared store for every gateway process.

Before the upstream call, :meth:`Limiter.reserve` checks every rate limit and budget
of the key and of its tenant against the request's *estimate* (prompt tokens + the
completion it may ask for, priced at the dearest model it may end at) and reserves it,
atomically, in one store call: two processes behind a load balancer enforce one limit. After
the call, :meth:`Limiter.settle` replaces the estimate with the actual tokens and cost and
adds the request to the usage ``/v1/usage`` reads.

A reservation leaves a mark in the store. A call that timed out may or may not have reached
the store (a paused Redis applies what it was sent when it wakes; a call still opening its
connection never arrives), so the settlement reads the mark: a reservation made is corrected,
one never made has the whole cost counted, and a settlement sent again after a timeout is
applied once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog

from gateway.accounting.ledger import CLOSING_RETRY_S, UsageKeys, UsageLedger, usage_keys
from gateway.accounting.usage import UsageFigures
from gateway.auth import Principal
from gateway.config.schema import Limits, Policy
from gateway.errors import GatewayError, LimiterUnavailableError
from gateway.limits.budget import budget_error, too_large_for_budget_error, unchecked_budget_error
from gateway.limits.rate import RATE_CAPS, rate_limit_error, too_large_error
from gateway.store import keyspace
from gateway.store.base import (
    HELD_DUST,
    PENDING_S,
    Caps,
    CounterScope,
    LimitCounters,
    ReserveOutcome,
    ReserveRequest,
    SettleRequest,
    StoreTimedOut,
    StoreUnavailable,
    past_budget,
)

__all__ = ["Limiter", "Reservation"]

_NO_LIMIT = Limits()
_SCOPE_NAMES = ("key", "tenant")
_log = structlog.get_logger("gateway.limits")
_RESERVATION_IDS = (f"{os.urandom(6).hex()}{n:x}" for n in itertools.count())
"""Unique across processes (a random prefix per process), cheap per request."""
_DOWN_SETTLE_EVERY_S = 15.0
_DOWN_SETTLE_FOR_S = PENDING_S - 600
"""A settlement never sent (the store down) is tried this long after the first minute: while its
reservation is pending, and well before the tenant's next reservation gives its estimate back."""
_SETTLE_RETRIES_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Pauses before a settlement is sent again: about a minute in all, within the 120 s a settled
mark is kept (a 20 s pause outlasted 15 s of retries, and left estimates in the spend)."""


@dataclass(slots=True)
class Reservation:
    scopes: tuple[CounterScope, ...]
    """The key's and the tenant's counters; empty when nothing was reserved."""
    periods: tuple[int, str, str]
    """The minute the reservation was counted in, and the UTC day and month of the request's start."""
    usage: UsageKeys
    tokens: int
    cost_usd: float
    budget_share: float
    """The largest share of a daily or monthly budget spent before this request."""
    spend: tuple[str, ...] = ()
    """The key's and tenant's spend counters, which the cost of a request that reserved nothing
    is added to with the usage, so that a budget set later starts from what was spent."""
    mark: str | None = None
    """Where the store says whether this reservation was made, and settled (``keyspace.reservation``)."""
    answered: bool = True
    """The reservation call answered, so it was made; False: it timed out, and only its mark can tell."""
    owner: tuple[str, str] = ("", "")
    """The tenant and key id, for a log line that says whose usage was lost."""
    in_view: bool = True
    """Its estimate counts in this process's view of the budgets (a reservation this process
    refused while the store did not answer never did: settling it takes nothing off, t31)."""


@dataclass(slots=True)
class _Word:
    """What the store last said one spend counter (a key's, or its tenant's shared by all its keys)
    had spent, and what this process let through since without its word: the view budgets are
    kept by while the store does not answer (a Redis stalled past ``redis_timeout_ms`` on a busy
    host would otherwise switch them off)."""

    day: str
    month: str
    spent_day: float
    spent_month: float
    since_day: float = 0.0
    """USD let through since the word (estimates, corrected to costs when their settlements do not
    land), this day; ``since_month``, this month."""
    since_month: float = 0.0
    blind_day: bool = False
    """The store said nothing of this day: what was spent is unknown, and only :data:`_UNKNOWN_ROOM`
    of the budget is let through (``blind_month``, of this month)."""
    blind_month: bool = False
    held_day: float = 0.0
    """The part of what is spent this day (the word's and since it) that requests in flight hold,
    their estimates until they settle (``held_month``, this month): a refusal for it is short."""
    held_month: float = 0.0

    def at(self, day: str, month: str) -> bool:
        """Carried into a later day or month, on which the store's word says nothing; whether the
        view holds that day and month now. An earlier one (a request begun before midnight that
        reserves after it) leaves the view alone: taking it back a day wiped the new day's
        spend, and the next request's day started from nothing (t193)."""
        if day < self.day or month < self.month:
            return False
        if month != self.month:
            self.month, self.since_month, self.spent_month, self.blind_month = month, 0.0, 0.0, True
            self.held_month = 0.0
        if day != self.day:
            self.day, self.since_day, self.spent_day, self.blind_day = day, 0.0, 0.0, True
            self.held_day = 0.0
        return True

    def add(self, usd: float, held: float = 0.0) -> None:
        """``usd`` let through, ``held`` more held by requests in flight (negative: released)."""
        self.since_day += usd
        self.since_month += usd
        self.held_day = _held(self.held_day + held)
        self.held_month = _held(self.held_month + held)


def _held(usd: float) -> float:
    """What requests in flight hold, none for the float dust their released estimates leave."""
    return usd if usd > HELD_DUST else 0.0


class Limiter:
    def __init__(self, counters: LimitCounters, ledger: UsageLedger) -> None:
        self._counters = counters
        self.ledger = ledger
        self._settling: set[asyncio.Task[None]] = set()
        self._words: dict[str, _Word] = {}
        """By spend counter (``CounterScope.spend``)."""
        self._unconfirmed: dict[str, float] = {}
        """By spend counter: the estimates (then costs) of reservations taken as made when their call
        timed out, until their settlements land. A call that timed out before it was sent never
        reached the store, whose first word after a stall lacks it, and 20 requests went past a
        budget in the 250 ms after Redis came back (t39); one that did reach it counts twice here,
        refusing early, until its settlement lands."""

    @staticmethod
    def enforces(policy: Policy, principal: Principal) -> bool:
        """Whether this key or its tenant has a limit to check (only then is an estimate needed)."""
        key_limits, tenant_limits = _limits(policy, principal)
        return key_limits.any or tenant_limits.any

    async def reserve(
        self,
        policy: Policy,
        principal: Principal,
        tokens: int,
        cost_usd: float,
        at: float | None = None,
        *,
        inputs: bool = False,
        requests: int = 1,
    ) -> Reservation:
        """Check and reserve; raises RateLimitError / BudgetExceededError naming the limit (a budget
        the request would fit but for what requests in flight hold: a RateLimitError, retried shortly;
        a request too large for a ``tpm`` or a whole budget: a RateLimitError no retry can pass).

        ``at``: when the request started (its log line's ``started_at``; default now). Its usage and
        budgets count in that UTC day and month, as ``gateway report`` files its line (t114); rate
        windows are the present minute's. ``inputs``: an embeddings batch (its too-large 429's words).
        ``requests``: 0 for a request counted in ``rpm`` already (:attr:`ReserveRequest.requests`)."""
        now = time.time()
        at = now if at is None else at
        periods = _periods(now, at)
        usage = usage_keys(principal.tenant, principal.key_id, at)
        self.ledger.note(principal.tenant, principal.key_id, at)
        window, spend, tenant_window, tenant_spend = keyspace.limit_counters(principal.tenant, principal.key_id)
        if not self.enforces(policy, principal):  # nothing to enforce: usage (and spend) is recorded in batches
            return Reservation((), periods, usage, 0, 0.0, 0.0, (spend, tenant_spend))
        limits = _limits(policy, principal)
        scopes = (
            CounterScope(window, spend, _caps(limits[0])),
            CounterScope(tenant_window, tenant_spend, _caps(limits[1])),
        )
        for scope_index, scope_limits in enumerate(limits):
            if scope_limits.tpm is not None and tokens > scope_limits.tpm:
                raise too_large_error(
                    _owner(principal, scope_index), scope_limits.tpm, tokens, name=f"{_SCOPE_NAMES[scope_index]}.tpm",
                    inputs=inputs,
                )  # fmt: skip
            for cap, budget in (
                ("usd_per_day", scope_limits.usd_per_day),
                ("usd_per_month", scope_limits.usd_per_month),
            ):
                if budget and past_budget(0.0, cost_usd, budget):  # a budget of 0 is spent, not too small
                    raise too_large_for_budget_error(
                        cap, _owner(principal, scope_index), budget, cost_usd,
                        name=f"{_SCOPE_NAMES[scope_index]}.{cap}", inputs=inputs,
                        default_completion_tokens=policy.limits.default_completion_tokens,
                    )  # fmt: skip
        minute, day, month = periods
        whose = (principal.tenant, principal.key_id)
        mark = keyspace.reservation(principal.tenant, next(_RESERVATION_IDS))
        request = ReserveRequest(scopes, tokens, cost_usd, minute, day, month, now / 60 - minute, mark, requests)
        spends = (spend, tenant_spend)
        try:
            outcome = await self._counters.reserve(request, policy.limits.redis_timeout_ms / 1000)
        except StoreUnavailable as exc:
            # Asked and not answered in time, a stalled Redis applies the reservation when it wakes:
            # it is taken as made, so that the settlement corrects it to what was spent (or, refused
            # here, cancels it). Never made (Redis not asked), there is nothing to correct.
            made = (
                Reservation(scopes, periods, usage, tokens, cost_usd, 0.0, spends, mark, False, whose)
                if isinstance(exc, StoreTimedOut)
                else None
            )
            refusal: GatewayError | None
            if policy.limits.on_redis_error == "closed":
                share = 0.0
                refusal = LimiterUnavailableError(
                    "rate limits cannot be checked (Redis unavailable); refusing by policy"
                )
            else:
                share, refusal = self._without_word(principal, scopes, limits, periods, cost_usd, at)
            if refusal is not None:
                if made is not None:  # a stalled store may apply it later: cancelled, outside the view
                    made.in_view = False
                    self.settle_later(policy, made, UsageFigures())
                raise refusal from None
            if made is not None:
                made.budget_share = share
                self._hold(made.spend, cost_usd)
                return made
            # not asked (Redis marked down): nothing reserved; the estimate, let through by this
            # process's view, is kept so that the cost can replace it there (t23: $5.45 of $1.00)
            return Reservation((), periods, usage, 0, cost_usd, share, spends, None, True, whose)
        added = cost_usd if outcome.refused_by is None else 0.0
        held = False
        in_flight = outcome.held or ((0.0, 0.0),) * len(outcome.spent)
        for scope, (spent_day, spent_month), (held_day, held_month) in zip(
            scopes, outcome.spent, in_flight, strict=False
        ):
            unsent = self.ledger.held_spend(scope.spend, day, month) + self._unconfirmed.get(scope.spend, 0.0)
            held = held or unsent > 0
            known = self._words.get(scope.spend)
            if known is not None and (known.day > day or known.month > month):
                continue  # the store's word on an earlier day (t193): the view keeps the later one
            self._words[scope.spend] = _Word(
                day, month, spent_day + added + unsent, spent_month + added + unsent,
                held_day=held_day + added, held_month=held_month + added,
            )  # fmt: skip
        if outcome.refused_by is not None:
            raise _refusal(outcome, limits, principal, now, tokens, cost_usd, at)
        made = Reservation(scopes, periods, usage, tokens, cost_usd, outcome.budget_share, spends, mark, True, whose)
        if held:  # the store's word lacks what this process spent while it was away (t24): counted here
            refusal = self._over_budget(principal, scopes, limits, at, cost_usd)
            if refusal is not None:
                self.settle_later(policy, made, UsageFigures())
                raise refusal
        return made

    def _hold(self, spends: tuple[str, ...], amount: float) -> None:
        for counter in spends:
            left = self._unconfirmed.get(counter, 0.0) + amount
            if left > 1e-12:
                self._unconfirmed[counter] = left
            else:
                self._unconfirmed.pop(counter, None)

    def _over_budget(
        self,
        principal: Principal,
        scopes: tuple[CounterScope, ...],
        limits: tuple[Limits, Limits],
        at: float,
        cost: float,
    ) -> GatewayError | None:
        """A budget this process's view (the store's word, this request and the spend it holds)
        says is spent, as a refusal (for the periods of ``at``, the request's start)."""
        for index, (scope, scope_limits) in enumerate(zip(scopes, limits, strict=True)):
            word = self._words.get(scope.spend)
            if word is not None:  # its figures hold this request's cost already
                refusal = _past_budget(principal, index, scope_limits, word.spent_day - cost, word.spent_month - cost,
                                       cost, at, (word.held_day - cost, word.held_month - cost))  # fmt: skip
                if refusal is not None:
                    return refusal
        return None

    def _without_word(
        self,
        principal: Principal,
        scopes: tuple[CounterScope, ...],
        limits: tuple[Limits, Limits],
        periods: tuple[int, str, str],
        cost: float,
        at: float,
    ) -> tuple[float, GatewayError | None]:
        """The budget share, and a refusal, by the store's last word on each spend counter this
        period plus what this process let through since. A budget this process has no word on
        lets a tenth of itself through (:func:`_past_allowance`), its share counting only that
        tenth's use; rates are open."""
        _, day, month = periods
        words = []
        share = 0.0
        for index, (scope, scope_limits) in enumerate(zip(scopes, limits, strict=True)):
            if scope_limits.usd_per_day is None and scope_limits.usd_per_month is None:
                continue
            word = self._words.get(scope.spend)
            if word is None:
                word = self._words[scope.spend] = _Word("", "", 0.0, 0.0)
            if not word.at(day, month):  # a day the view has left: the store counts it in its own
                continue
            words.append(word)
            day_spent, month_spent = word.spent_day + word.since_day, word.spent_month + word.since_month
            held = (word.held_day, word.held_month)
            refusal = _past_budget(principal, index, scope_limits, day_spent, month_spent, cost, at, held)
            refusal = refusal or _past_allowance(principal, index, scope_limits, word, cost)
            if refusal is not None:
                return share, refusal
            for limit, spent in ((scope_limits.usd_per_day, day_spent), (scope_limits.usd_per_month, month_spent)):
                if limit:
                    share = max(share, spent / limit)
        for word in words:
            word.add(cost, cost)  # held until the request settles
        return share, None

    def _record_unreserved(self, reservation: Reservation, used: UsageFigures, timeout_s: float) -> None:
        """The usage of a request that reserved nothing goes with the ledger's batch, its cost with it;
        one this process let through while Redis was away replaces its estimate in the view."""
        self.ledger.record(reservation.usage, used, timeout_s, _spend_of(reservation, used.cost_usd))
        if reservation.cost_usd:
            self._correct_words(reservation, used.cost_usd)

    def _correct_words(self, reservation: Reservation, cost_usd: float) -> None:
        """What the request cost replaces its estimate in this process's view (sequential requests
        that wrote more than estimated passed a budget 4x while the store did not answer, t19)."""
        _, day, month = reservation.periods
        for counter in reservation.spend:
            word = self._words.get(counter)
            if word is not None and (word.day, word.month) == (day, month):
                word.add(cost_usd - reservation.cost_usd, -reservation.cost_usd)

    async def admit_count(
        self, policy: Policy, principal: Principal, kind: Literal["count", "feedback"] = "count"
    ) -> None:
        """Check and count a token count (``count_tokens``), or a ``feedback`` call, against the
        key's and tenant's ``rpm``.

        Neither spends tokens or money, so no ``tpm`` or budget applies; each is still work (on an
        Anthropic route a call to the operator's ``count_tokens``; a feedback call waits up to
        1.5 s for its request's trace, reading Redis as it waits: t88 sent 400 in 13 s on a key of
        5 a minute), so each has a request window of its own, as Anthropic's counting has a rate
        limit apart from messages.
        """
        limits = _limits(policy, principal)
        if limits[0].rpm is None and limits[1].rpm is None:
            return
        now = time.time()
        minute, day, month = _periods_of_minute(int(now // 60))
        window, spend, tenant_window, tenant_spend = keyspace.count_counters(
            principal.tenant, principal.key_id, "c" if kind == "count" else "f"
        )
        scopes = (
            CounterScope(window, spend, Caps(rpm=limits[0].rpm)),
            CounterScope(tenant_window, tenant_spend, Caps(rpm=limits[1].rpm)),
        )
        request = ReserveRequest(scopes, 0, 0.0, minute, day, month, now / 60 - minute)
        try:
            outcome = await self._counters.reserve(request, policy.limits.redis_timeout_ms / 1000)
        except StoreUnavailable:
            if policy.limits.on_redis_error == "closed":
                raise LimiterUnavailableError(
                    "rate limits cannot be checked (Redis unavailable); refusing by policy"
                ) from None
            return
        if outcome.refused_by is not None:
            raise _refusal(outcome, limits, principal, now, 0, 0.0)

    async def settle(self, policy: Policy, reservation: Reservation, used: UsageFigures) -> None:
        """Replace the reservation by what ``used`` (one request's figures) says, and record the usage."""
        timeout_s = _accounting_timeout_s(policy)
        if not reservation.scopes:
            self._record_unreserved(reservation, used, timeout_s)
            return
        tokens = used.prompt_tokens + used.completion_tokens
        minute, day, month = reservation.periods
        request = SettleRequest(
            reservation.scopes,
            token_delta=tokens - reservation.tokens if reservation.tokens else 0,
            cost_delta=used.cost_usd - reservation.cost_usd if reservation.tokens else 0.0,
            minute=minute,
            day=day,
            month=month,
            usage_keys=reservation.usage[0],
            used=used,
            expired_keys=reservation.usage[1],
            tokens=tokens,
            cost_usd=used.cost_usd,
            mark=reservation.mark,
            made=reservation.answered,
            held_usd=reservation.cost_usd,
        )
        # What it cost replaces its estimate in this process's view at once: a stalled store takes
        # seconds to fail the call, and sequential requests passed a budget 3.4x meanwhile (t24).
        # The store's next word replaces the view, this correction with it.
        if reservation.in_view:
            self._correct_words(reservation, used.cost_usd)
        unconfirmed = not reservation.answered and reservation.in_view
        if unconfirmed:  # its cost, not its estimate, is held until the settlement lands
            self._hold(reservation.spend, used.cost_usd - reservation.cost_usd)
        try:
            timed_out = await self._send_settlement(request, reservation, timeout_s)
        except asyncio.CancelledError:  # shutting down with the store still away
            _unrecorded(reservation, used.cost_usd, tokens, "shut down while the store was away")
            raise
        finally:
            if unconfirmed:
                self._hold(reservation.spend, -used.cost_usd)
        if timed_out is None:
            return
        if timed_out:  # perhaps applied; sent again once its mark is gone, it could count twice
            _unrecorded(reservation, used.cost_usd, tokens, "the store did not confirm it")
            return
        # Never reached the store: the usage goes to the ledger's batch, written when it is back, with
        # the whole cost. The reservation, made or not, stays pending: its estimate is given back by
        # the tenant's next reservation once PENDING_S have passed (correcting it here as well would
        # take it off twice).
        self.ledger.record(reservation.usage, used, timeout_s, _spend_of(reservation, used.cost_usd))

    async def _send_settlement(self, request: SettleRequest, reservation: Reservation, timeout_s: float) -> bool | None:
        """Send it, again after a timeout or while the store is down (its mark makes that safe) for
        about a minute: None when it landed, else whether a call timed out (perhaps applied). Sent
        to the usage batch at once instead, its reservation's estimate stayed pending for an hour
        beside the whole cost, and refused requests within the budget (t31)."""
        timed_out = False
        for pause_s in (*(_SETTLE_RETRIES_S if reservation.mark is not None else ()), None):
            try:
                await self._counters.settle(request, timeout_s)
                return None
            except StoreTimedOut:
                timed_out = True  # asked, and perhaps applied: the mark makes sending it again safe
            except StoreUnavailable:
                pass  # not asked (the store is marked down); a restarted Redis is back in seconds (t31)
            if pause_s is not None:
                await asyncio.sleep(pause_s)
        if timed_out or reservation.mark is None:
            return timed_out
        # Never sent, so never applied: it can wait for the store as long as its reservation is
        # pending (down for 70 s, the whole cost went to the batch beside the estimate: t34).
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _DOWN_SETTLE_FOR_S
        while loop.time() < give_up:
            await asyncio.sleep(_DOWN_SETTLE_EVERY_S)
            try:
                await self._counters.settle(request, timeout_s)
                return None
            except StoreTimedOut:
                return True
            except StoreUnavailable:
                continue
        return False

    def settle_later(self, policy: Policy, reservation: Reservation, used: UsageFigures) -> None:
        """:meth:`settle` off the request's path: the answer does not wait for the store."""
        if not reservation.scopes:  # nothing reserved: the usage goes to the ledger's batch, no task needed
            self._record_unreserved(reservation, used, _accounting_timeout_s(policy))
            return
        task = asyncio.get_running_loop().create_task(self.settle(policy, reservation, used))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def record_unreserved(
        self, policy: Policy, tenant: str, key_id: str, used: UsageFigures, at: float | None = None
    ) -> None:
        """A request of a known key refused before it reserved (a bad body, a model it may not
        use, a limit): counted in the key's usage like any other, as the request log counts it,
        on the day it started (``at``, as :meth:`reserve`'s; default now)."""
        at = time.time() if at is None else at
        self.ledger.note(tenant, key_id, at)
        self.ledger.record(usage_keys(tenant, key_id, at), used, _accounting_timeout_s(policy))

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for the settlements still running (before a usage read, and at shutdown), at most
        ``timeout_s``: one waiting for the store to come back may take a while."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)

    async def aclose(self) -> None:
        """Wait for the settlements still running, then for the ledger to write what it holds:
        both within one :data:`CLOSING_RETRY_S` (the README's "up to 10 s more"), not each its own."""
        until = asyncio.get_running_loop().time() + CLOSING_RETRY_S
        await self.drain(timeout_s=CLOSING_RETRY_S)
        for task in self._settling:  # still waiting for a Redis that is gone: at most once, as documented
            task.cancel()
        await asyncio.gather(*self._settling, return_exceptions=True)
        await self.ledger.aclose(until)


_ACCOUNTING_TIMEOUT_S = 2.0
"""The least time a settlement or a usage batch is given: they run off the request's path, and a
usage batch that times out is not sent again (it may have been applied, and would count twice),
so a Redis pausing for a few hundred milliseconds (a fork for a snapshot) must not cost it."""


def _past_budget(
    principal: Principal,
    index: int,
    limits: Limits,
    day_spent: float,
    month_spent: float,
    cost: float,
    at: float,
    held: tuple[float, float] = (0.0, 0.0),
) -> GatewayError | None:
    """The refusal when ``cost`` on top of what is spent passes the scope's (``index``: key 0,
    tenant 1) daily or monthly budget, that of ``at`` (the request's start); ``held``: the part of
    the day's and month's spend that requests in flight hold."""
    for cap, limit, spent, in_flight in (
        ("usd_per_day", limits.usd_per_day, day_spent, held[0]),
        ("usd_per_month", limits.usd_per_month, month_spent, held[1]),
    ):
        if limit is not None and past_budget(spent, cost, limit):
            owner = _owner(principal, index)
            name = f"{_SCOPE_NAMES[index]}.{cap}"
            return budget_error(cap, owner, limit, spent, cost, at, name=name, held_usd=in_flight)
    return None


def _accounting_timeout_s(policy: Policy) -> float:
    return max(policy.limits.redis_timeout_ms / 1000, _ACCOUNTING_TIMEOUT_S)


def _unrecorded(reservation: Reservation, cost_usd: float, tokens: int, reason: str) -> None:
    tenant, key_id = reservation.owner
    _log.warning("usage_unrecorded", tenant=tenant, key_id=key_id, cost_usd=cost_usd, tokens=tokens, reason=reason)


def _spend_of(reservation: Reservation, usd: float) -> tuple[tuple[str, ...], str, str, float]:
    _, day, month = reservation.periods
    return reservation.spend, day, month, usd


def _refusal(
    outcome: ReserveOutcome,
    limits: tuple[Limits, Limits],
    principal: Principal,
    now: float,
    tokens: int,
    cost: float,
    at: float | None = None,
) -> GatewayError:
    """The error naming the limit that refused (``outcome.refused_by``: ``"<scope index>.<cap>"``);
    a budget's retry-after is the end of the period ``at`` (default ``now``) counted in."""
    index, cap = (outcome.refused_by or "").split(".")
    scope = int(index)
    name = f"{_SCOPE_NAMES[scope]}.{cap}"
    owner = _owner(principal, scope)
    limit = getattr(limits[scope], cap)
    if cap in RATE_CAPS:
        need = 1 if cap == "rpm" else tokens
        return rate_limit_error(cap, owner, limit, now, name=name, need=need, counted=outcome.window)
    held = outcome.held[scope][0 if cap == "usd_per_day" else 1] if scope < len(outcome.held) else 0.0
    when = now if at is None else at
    return budget_error(cap, owner, limit, outcome.spent_usd, cost, when, name=name, held_usd=held)


_UNKNOWN_ROOM = 0.1
"""The share of a budget a process lets through, while Redis does not answer, for a key or tenant
(or a day or month) it has no word on yet: each process so, not the whole budget each."""


def _past_allowance(principal: Principal, index: int, limits: Limits, word: _Word, cost: float) -> GatewayError | None:
    """The refusal when ``cost`` passes the :data:`_UNKNOWN_ROOM` of a budget the store has said
    nothing of this period: told as unchecked, not as spent (t127: "$0.4912 is spent" of $0.50,
    the nine tenths never spent, with a retry-after at midnight)."""
    for cap, limit, blind, since in (
        ("usd_per_day", limits.usd_per_day, word.blind_day, word.since_day),
        ("usd_per_month", limits.usd_per_month, word.blind_month, word.since_month),
    ):
        if limit is not None and blind and past_budget(since, cost, limit * _UNKNOWN_ROOM):
            owner = _owner(principal, index)
            name = f"{_SCOPE_NAMES[index]}.{cap}"
            return unchecked_budget_error(cap, owner, limit, limit * _UNKNOWN_ROOM, since, cost, name=name)
    return None


def _owner(principal: Principal, index: int) -> str:
    return f"key '{principal.key_id}'" if index == 0 else f"tenant '{principal.tenant}'"


def _limits(policy: Policy, principal: Principal) -> tuple[Limits, Limits]:
    tenant = policy.tenants.get(principal.tenant)
    return principal.limits, tenant.limits if tenant else _NO_LIMIT


@functools.lru_cache(maxsize=256)
def _caps(limits: Limits) -> Caps:
    return Caps(limits.rpm, limits.tpm, limits.usd_per_day, limits.usd_per_month)


def _periods(now: float, at: float) -> tuple[int, str, str]:
    """The present minute (rate windows), and the UTC day and month of ``at`` (usage and budgets)."""
    minute, at_minute = int(now // 60), int(at // 60)
    if minute == at_minute:
        return _periods_of_minute(minute)
    return minute, *_periods_of_minute(at_minute)[1:]


@functools.lru_cache(maxsize=4)
def _periods_of_minute(minute: int) -> tuple[int, str, str]:
    """The minute and its UTC day and month: formatted once a minute, not on every request."""
    stamp = datetime.fromtimestamp(minute * 60, UTC)
    return minute, stamp.strftime("%Y%m%d"), stamp.strftime("%Y%m")
