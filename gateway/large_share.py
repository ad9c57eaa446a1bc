"""Keeps a classifier route's share of large-model answers on target as traffic shifts.

A route with ``target_large_share: s`` does not use its fixed ``threshold``: its
threshold follows the (1 − s) quantile of the ``p_large`` scores seen recently, so that
about a share s of prompts goes to the large model whatever the scores' scale on today's
traffic. Per tenant and route (traffic one tenant sends never moves another's routing).
Every ``update_every`` scores a process adds them to the route's window in the store (the
newest ``window`` scores of all processes), reads the window and the shared threshold, and
moves the threshold so that the share the window would send to large
comes closer to s by ``max_share_step``, or by ``catch_up`` of the gap when that is more
(a bound in share, not in score: the routing head's scores are
not on one scale across kinds of traffic, so a bound in score units took 1,600 prompts to
follow a shift from chat to quiz traffic), and writes it back. Every process steps on the
same window: two that see different traffic (a sticky load balancer) no longer undo each
other's steps around their own shares (t28). A process reads the shared threshold when it
first sees a tenant's route (a new or restarted process routes as the others do), and again
every ``refresh_s`` while it routes it (another process's update reaches it then, not only at
its own next update: t85); while the store is unavailable a process steps its own threshold
on its own recent scores.

Scores are ranked with a tie-break far below the scores' precision (:func:`ranked`):
prompts that score alike (one template, images the text model cannot see) would all fall
on one side of a threshold at their score, and the share jumped from a quarter to all.

When the scorer changes (a learnt router is promoted or rolled back), the scores seen before
are on another scale: they are dropped, and the first update on the new scorer's scores goes
straight to their quantile for the target, with no step bound.

The shared threshold is stored with the target it was kept on: after a policy reload that gives
the route another target (or removes it and adds another), no process follows a threshold kept
on another target, its own copy included; the route starts again from its configured
``threshold`` (t178: one learnt for 0.7 stayed in force after the target went to 0.3, and half
the prompts went large).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque

import numpy as np
import structlog

from gateway.background import BackgroundTasks
from gateway.store import keyspace
from gateway.store.base import KeyValue, StoreUnavailable

__all__ = ["LargeShareTracker", "ranked", "shared_threshold"]

_log = structlog.get_logger("gateway.routing")

_TTL_S = 7 * 86400
_TIMEOUT_S = 0.05
_TIE_BREAK = 1e-6
"""Below the 4 decimals a score is logged with, and the scorer's float32 precision near 1."""
_SCORE = np.dtype("<f8")


def ranked(p_large: float) -> float:
    """``p_large`` with a random tie-break, kept within [0, 1]: what a target-share route
    compares and counts (a stored threshold outside it would be read as no threshold)."""
    return (1.0 - _TIE_BREAK) * p_large + _TIE_BREAK * random.random()


class LargeShareTracker:
    def __init__(
        self,
        kv: KeyValue,
        *,
        window: int = 250,
        update_every: int = 50,
        max_share_step: float = 0.05,
        catch_up: float = 0.5,
        refresh_s: float = 5.0,
    ) -> None:
        """``window``: the newest scores, of all processes, the share and its quantile are taken on;
        ``catch_up``: a gap between that share and the target larger than ``max_share_step``
        closes by this fraction of it per update. With the whole 1,000-score window and steps of
        5 points, a tenant whose traffic turned from easy to hard got 83 %, 63 % and 54 % large
        answers per 200 requests against a 30 % target (t79): the window still held the old
        traffic, and the first step after the turn went the wrong way."""
        self._kv = kv
        self._window = window
        self._catch_up = catch_up
        self._update_every = update_every
        self._max_share_step = max_share_step
        self._scores: dict[tuple[str, str], deque[float]] = {}
        """This process's recent scores: the window while the store is unavailable."""
        self._unsent: dict[tuple[str, str], list[float]] = {}
        """Scores since the last update, for the shared window."""
        self._seen: dict[tuple[str, str], int] = {}
        self._thresholds: dict[tuple[str, str], tuple[float, float]] = {}
        """The threshold in force here, with the target it was kept on."""
        self._scorers: dict[tuple[str, str], str] = {}
        self._rescale: set[tuple[str, str]] = set()
        self._reads: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._refresh_s = refresh_s
        self._read_at: dict[tuple[str, str], float] = {}
        self._background = BackgroundTasks()

    async def prepare(self, tenant: str, route: str, target: float) -> None:
        """Read the shared threshold the first time this process routes the tenant's route, so a
        new or restarted process routes its first request as the others do (one read; a store
        that does not answer leaves the configured threshold until the first update)."""
        key = (tenant, route)
        read = self._reads.get(key)
        now = time.monotonic()
        if read is None:  # the first request: the others arriving meanwhile wait for the same read
            self._read_at[key] = now
            read = self._reads[key] = asyncio.get_running_loop().create_task(self._read_shared(key, target, first=True))
        elif now - self._read_at[key] >= self._refresh_s:  # read again; this request routes on what it has
            self._read_at[key] = now
            self._background.spawn(self._read_shared(key, target), "large-share-refresh")
        if not read.done():
            await asyncio.shield(read)  # a request that leaves does not cancel the others' read

    def threshold(self, tenant: str, route: str, target: float, configured: float) -> float:
        """The threshold in force for this tenant's route (the shared one, once read), or
        ``configured`` while none was kept on ``target``."""
        return self._kept((tenant, route), target, configured)

    def _kept(self, key: tuple[str, str], target: float, configured: float) -> float:
        held = self._thresholds.get(key)
        return held[1] if held is not None and held[0] == target else configured

    def observe(
        self, tenant: str, route: str, p_large: float, target: float, configured: float, scorer: str = ""
    ) -> None:
        """Count one score (``scorer``: the router version that gave it); every ``update_every``
        scores, update the shared threshold in the background."""
        key = (tenant, route)
        scores = self._scores.get(key)
        if scores is None:
            scores = self._scores[key] = deque(maxlen=self._window)
        unsent = self._unsent.setdefault(key, [])
        if self._scorers.setdefault(key, scorer) != scorer:  # another scale: what came before says nothing
            self._scorers[key] = scorer
            scores.clear()
            unsent.clear()
            self._seen[key] = 0
            self._rescale.add(key)
        scores.append(p_large)
        unsent.append(p_large)
        self._seen[key] = seen = self._seen.get(key, 0) + 1
        if seen % self._update_every == 0:
            recent = np.fromiter(scores, dtype=np.float64)
            batch = np.array(unsent, dtype=np.float64)
            unsent.clear()
            rescale = key in self._rescale
            self._rescale.discard(key)
            self._background.spawn(
                self.update(tenant, route, recent, target, configured, rescale=rescale, batch=batch, scorer=scorer),
                "large-share-update",
            )

    async def update(
        self,
        tenant: str,
        route: str,
        recent: np.ndarray,
        target: float,
        configured: float,
        *,
        rescale: bool = False,
        batch: np.ndarray | None = None,
        scorer: str = "",
    ) -> float:
        """Add ``batch`` (the scores since the last update) to the shared window, and move the
        shared threshold so that the window's share at or above it nears ``target`` by at most
        ``max_share_step`` (``rescale``: all the way); the new threshold. ``recent``, this
        process's own scores, stand in for a window the store does not give."""
        key = (tenant, route)
        store_key = keyspace.large_share_threshold(tenant, route)
        current = self._kept(key, target, configured)
        shared: float | None = None
        reached = True
        try:
            if batch is not None and batch.size:
                window = keyspace.large_share_window(tenant, route)
                batches = -(-self._window // max(batch.size, 1))
                await self._kv.append(window, _packed(scorer, batch), batches, _TTL_S, _TIMEOUT_S)
                recent = _unpacked(await self._kv.read_list(window, _TIMEOUT_S), scorer, self._window, recent)
            shared = await shared_threshold(self._kv, tenant, route, target)
        except StoreUnavailable:  # this process steps on its own scores until the store is back
            reached = False
        share_now = float((recent >= (current if shared is None else shared)).mean())
        step = 1.0 if rescale else max(self._max_share_step, abs(target - share_now) * self._catch_up)
        share_next = share_now + max(-step, min(step, target - share_now))
        new = float(np.quantile(recent, min(max(1.0 - share_next, 0.0), 1.0)))
        if reached:
            # whole: rounded, the threshold lands off the tie-broken scores it was taken from, and
            # the share measured against it next time is not the one that was set (t30)
            with contextlib.suppress(StoreUnavailable):
                await self._kv.put(store_key, f"{new!r} {target!r}".encode(), _TTL_S, _TIMEOUT_S)
        self._thresholds[key] = (target, new)
        if abs(new - current) >= 0.05:
            _log.info("route_threshold_moved", tenant=tenant, route=route, threshold=round(new, 4))
        return new

    async def _read_shared(self, key: tuple[str, str], target: float, *, first: bool = False) -> None:
        """``first``: a threshold this process already set (its own update, which also wrote the
        store) stands; a later read takes the store's, where every process's updates land."""
        try:
            shared = await shared_threshold(self._kv, *key, target)
        except StoreUnavailable:
            return
        held = self._thresholds.get(key)
        if shared is not None and not (first and held is not None and held[0] == target):
            self._thresholds[key] = (target, shared)

    async def aclose(self) -> None:
        await self._background.aclose()


def _packed(scorer: str, batch: np.ndarray) -> bytes:
    """A batch of scores as the window keeps it: the scorer's name, a NUL, little-endian float64s (a
    float32 would round the tie-break away)."""
    return scorer.encode() + b"\0" + batch.astype(_SCORE).tobytes()


def _unpacked(batches: list[bytes], scorer: str, window: int, fallback: np.ndarray) -> np.ndarray:
    """The newest ``window`` scores of ``scorer`` in the stored batches (another scorer's are on
    another scale); ``fallback`` when there are none, or the store holds something else."""
    name = scorer.encode()
    kept: list[np.ndarray] = []
    for raw in batches:
        head, _, body = raw.partition(b"\0")
        if head == name and body and len(body) % _SCORE.itemsize == 0:
            kept.append(np.frombuffer(body, dtype=_SCORE).astype(np.float64))
    if not kept:
        return fallback
    scores = np.concatenate(kept)[-window:]
    scores = scores[np.isfinite(scores)]
    return scores if scores.size else fallback


async def shared_threshold(
    kv: KeyValue, tenant: str, route: str, target: float, timeout_s: float = _TIMEOUT_S
) -> float | None:
    """The threshold the tenant's route shares for ``target``; None when there is none, it was
    kept on another target, or it is not a probability (then it is overwritten by the next update
    rather than freezing the route on it). Raises :class:`StoreUnavailable`."""
    raw = await kv.get(keyspace.large_share_threshold(tenant, route), timeout_s)
    if raw is None:
        return None
    try:
        value, kept_on = (float(part) for part in raw.split(b" "))  # "<threshold> <target>"
    except ValueError:  # not two numbers (one alone: written before the target was kept), not text
        return None
    return value if kept_on == target and 0.0 <= value <= 1.0 else None  # NaN fails both comparisons
