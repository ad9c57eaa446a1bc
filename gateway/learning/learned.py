"""A router learnt from a deployment's own labels, on top of the shipped one.

The shipped router's ``p_large`` stays the starting point: a learnt router is a logistic
correction ``p = sigmoid(a * logit(p_shipped) + w . x + b)`` over the same inputs the
routing head reads (embedding and surface features), fitted on the labelled examples with
an L2 pull toward "no change" (a = 1, w = 0, b = 0). With few labels it barely moves the
shipped router; with many, it learns what this deployment's small model gets wrong.

``fit_candidate`` holds out the newest quarter of the labels, fits on the rest, and
compares candidate and current router there (APGR, CPT(50 %); a paired bootstrap interval
of the difference); ``promote`` refuses a candidate unless it is better beyond that
interval. Versions live in the store (``keyspace.learned_router``), so every gateway
process serves the same one: :class:`LearnedRouters` re-reads the version in force every
few seconds, off the request path, and swaps it in place (requests in flight keep the
router they started with).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import structlog

from gateway.background import BackgroundTasks
from gateway.classifier.features import NAMES as FEATURE_NAMES
from gateway.learning.examples import LabelledExample
from gateway.store import keyspace
from gateway.store.base import KeyValue, StoreUnavailable

__all__ = [
    "ClassifierInputs",
    "Evaluation",
    "LearnedRouter",
    "LearnedRouters",
    "UnreadableRouter",
    "apgr",
    "cpt",
    "fit_candidate",
    "latest_labels",
    "promote",
    "rollback",
    "same_classifier",
]

if TYPE_CHECKING:
    from gateway.classifier import Classifier

_log = structlog.get_logger("gateway.learning")

_FEATURE_SCALE = 0.2
_VERSION_TTL_S = 90 * 86400
_TIMEOUT_S = 0.5
MIN_HELD_OUT = 20


class LearnedRouter(msgspec.Struct, frozen=True):
    version: str
    created_at: float
    base_weight: float
    bias: float
    weight: bytes  # float32: embedding dims then surface features
    feature_mean: bytes  # float32
    feature_std: bytes  # float32
    labels: int
    evaluation: dict[str, Any] = {}
    inputs: str = ""
    """The classifier whose scores and vectors it was fitted on (:attr:`Classifier.signature`);
    empty for routers fitted before it was recorded (then only the width is checked)."""

    def fits(self, inputs: ClassifierInputs) -> bool:
        """Whether it can correct this classifier's scores: fitted on the same one, with weights
        of the width its embedding and features make, and nothing unreadable in them."""
        if self.inputs and self.inputs != inputs.signature:
            return False
        try:
            params = self._params()
        except ValueError:  # a buffer that is not float32
            return False
        n_features = inputs.width - inputs.embedding_dim
        return (
            len(params.w) == inputs.width
            and len(params.mean) == len(params.std) == n_features
            and bool(np.isfinite(params.w).all() and np.isfinite(params.mean).all())
            and bool((params.std > 0).all())
            and math.isfinite(self.base_weight)
            and math.isfinite(self.bias)
        )

    def apply(self, p_base: float, embedding: np.ndarray, features: np.ndarray | None) -> float:
        if features is None:
            return p_base
        params = self._params()
        return float(_predict(params, _inputs(params, embedding[None, :], features[None, :]), np.array([p_base]))[0])

    def _params(self) -> _Params:
        return _Params(
            self.base_weight,
            self.bias,
            np.frombuffer(self.weight, dtype=np.float32),
            np.frombuffer(self.feature_mean, dtype=np.float32),
            np.frombuffer(self.feature_std, dtype=np.float32),
        )


@dataclass(frozen=True, slots=True)
class ClassifierInputs:
    """What a learnt router reads of the running classifier: which one it is, and the width of
    the vector it hands a router (embedding, then surface features)."""

    signature: str
    embedding_dim: int
    width: int

    @classmethod
    def of(cls, classifier: Classifier) -> ClassifierInputs:
        return cls(classifier.signature, classifier.embedding_dim, classifier.embedding_dim + len(FEATURE_NAMES))


@dataclass(frozen=True, slots=True)
class _Params:
    a: float
    b: float
    w: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-4, 1 - 1e-4)
    out: np.ndarray = np.log(q / (1 - q))
    return out


def _inputs(params: _Params, embedding: np.ndarray, features: np.ndarray) -> np.ndarray:
    scaled = _FEATURE_SCALE * (features - params.mean) / params.std
    return np.hstack([embedding, scaled]).astype(np.float32)


def _predict(params: _Params, x: np.ndarray, p_base: np.ndarray) -> np.ndarray:
    z = params.a * _logit(p_base) + x @ params.w + params.b
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
    return out


def _fit(x: np.ndarray, base: np.ndarray, y: np.ndarray, steps: int = 600) -> tuple[float, float, np.ndarray]:
    """L2-regularized logistic regression on [logit(p_base), x], pulled toward a=1, w=0, b=0 (Adam)."""
    n, d = x.shape
    l2 = 1.0 / (10.0 * n)  # weaker as labels accumulate
    theta = np.zeros(d + 2)
    theta[0] = 1.0  # a
    lb = _logit(base)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    lr, beta1, beta2 = 0.05, 0.9, 0.999
    for t in range(1, steps + 1):
        z = theta[0] * lb + x @ theta[2:] + theta[1]
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        r = (p - y) / n
        grad = np.concatenate([[r @ lb, r.sum()], x.T @ r])
        grad[0] += l2 * (theta[0] - 1.0)
        grad[2:] += l2 * theta[2:]
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        theta -= lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + 1e-8)
    return float(theta[0]), float(theta[1]), theta[2:].astype(np.float32)


def _recovered(score: np.ndarray, needed_large: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(share of large calls, share of needed-large prompts sent to large), best score first."""
    y = np.asarray(needed_large, dtype=float)
    if y.sum() == 0:
        return None
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
    return np.arange(len(y) + 1) / len(y), np.concatenate([[0.0], np.cumsum(y[order])]) / y.sum()


def apgr(score: np.ndarray, needed_large: np.ndarray) -> float:
    """RouteLLM's APGR with the large model taken as right and the small one right unless the
    label says the large one was needed: the share of needed-large prompts recovered, averaged
    over every share of large calls."""
    curve = _recovered(score, needed_large)
    return 0.5 if curve is None else float(np.trapezoid(curve[1], curve[0]))


def cpt(score: np.ndarray, needed_large: np.ndarray, target: float = 0.5) -> float:
    """The smallest share of large calls that recovers ``target`` of the needed-large prompts."""
    curve = _recovered(score, needed_large)
    if curve is None:
        return 0.0
    share, recovered = curve
    return float(share[int(np.argmax(recovered >= target - 1e-12))])


@dataclass(frozen=True, slots=True)
class Evaluation:
    held_out: int
    trained_on: int
    current_apgr: float
    candidate_apgr: float
    difference_ci95: tuple[float, float]
    better: bool
    current_cpt50: float
    candidate_cpt50: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "held_out": self.held_out,
            "trained_on": self.trained_on,
            "current_apgr": round(self.current_apgr, 4),
            "candidate_apgr": round(self.candidate_apgr, 4),
            "difference_ci95": [round(v, 4) for v in self.difference_ci95],
            "better_beyond_interval": self.better,
            "current_cpt50": round(self.current_cpt50, 4),
            "candidate_cpt50": round(self.candidate_cpt50, 4),
        }


def _arrays(examples: list[LabelledExample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    emb = np.stack([e.vectors()[0] for e in examples])
    feats = np.stack([e.vectors()[1] for e in examples])
    base = np.array([e.p_large for e in examples])
    y = np.array([e.needed_large for e in examples], dtype=float)
    return emb, feats, base, y


def fit_candidate(
    examples: list[LabelledExample],
    current: LearnedRouter | None,
    *,
    held_out_share: float = 0.25,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[LearnedRouter, Evaluation]:
    """A candidate fitted on the older labels, and how it and ``current`` (None: the shipped
    router alone) do on the newest ``held_out_share`` of them. A request labelled more than
    once counts once: by a person's last label (feedback) where it has one, whenever the shadow
    judge's verdict landed, else by the judge's last; request ids are the clients' to choose,
    so one names a request only within its tenant."""
    examples = same_classifier(latest_labels(examples))
    inputs = examples[-1].inputs if examples else ""
    if current is not None and current.inputs != inputs:
        current = None  # fitted on another classifier's scores: not what serves these prompts now
    held = max(MIN_HELD_OUT, int(len(examples) * held_out_share))
    if len(examples) < held + MIN_HELD_OUT:
        raise ValueError(f"{len(examples)} labelled requests; at least {2 * MIN_HELD_OUT} are needed")
    train, test, test_groups = _split_by_prompt(examples, held)
    if len(train) < MIN_HELD_OUT:
        raise ValueError(
            f"{len(examples)} labelled requests, but too few distinct prompts to hold some out: "
            f"{len(train)} left to train on once the newest prompts' repeats are held out"
        )
    emb, feats, base, y = _arrays(train)
    mean = feats.mean(0)
    std = np.maximum(feats.std(0), 1e-6)
    stub = _Params(1.0, 0.0, np.zeros(emb.shape[1] + feats.shape[1], dtype=np.float32), mean, std)
    a, b, w = _fit(_inputs(stub, emb, feats), base, y)
    params = _Params(a, b, w, mean.astype(np.float32), std.astype(np.float32))
    t_emb, t_feats, t_base, t_y = _arrays(test)
    candidate_p = _predict(params, _inputs(params, t_emb, t_feats), t_base)
    if current is None:
        current_p = t_base
    else:
        cp = current._params()
        current_p = _predict(cp, _inputs(cp, t_emb, t_feats), t_base)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(test_groups == group) for group in np.unique(test_groups)]
    diffs = []
    for _ in range(resamples):  # whole prompts are resampled: a repeated one is one piece of evidence
        i = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        diffs.append(apgr(candidate_p[i], t_y[i]) - apgr(current_p[i], t_y[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    evaluation = Evaluation(
        len(test),
        len(train),
        apgr(current_p, t_y),
        apgr(candidate_p, t_y),
        (float(lo), float(hi)),
        bool(lo > 0),
        cpt(current_p, t_y),
        cpt(candidate_p, t_y),
    )
    digest = hashlib.sha256(w.tobytes() + np.array([a, b]).tobytes()).hexdigest()[:8]
    version = f"{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}-{digest}"
    router = LearnedRouter(
        version,
        time.time(),
        a,
        b,
        w.tobytes(),
        params.mean.tobytes(),
        params.std.tobytes(),
        len(train),
        evaluation.to_dict(),
        inputs,
    )
    return router, evaluation


_SAME_PROMPT_COSINE = 0.97
"""Embeddings this close are one prompt told again (a template, a retry), for the held-out split."""


def _split_by_prompt(
    examples: list[LabelledExample], held: int
) -> tuple[list[LabelledExample], list[LabelledExample], np.ndarray]:
    """(train, held out, the held-out examples' prompt groups): the newest prompts held out with
    every time they were asked, and no training example that is one of them again (the same
    embedding, or one within ``_SAME_PROMPT_COSINE``). Split by time alone, a repeated prompt
    sat on both sides and the check rewarded a router that had learnt it by heart: promoted at
    APGR 0.78, it scored 0.25 on fresh prompts (t32)."""
    names: dict[bytes, int] = {}
    groups = np.array([names.setdefault(e.embedding, len(names)) for e in examples])
    newest_first = dict.fromkeys(groups[::-1].tolist())
    held_out = np.zeros(len(examples), dtype=bool)
    for group in newest_first:
        if held_out.sum() >= held:
            break
        held_out |= groups == group
    vectors = np.stack([e.vectors()[0] for e in examples])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)
    kept = ~held_out
    rest = np.flatnonzero(kept)
    for start in range(0, len(rest), 1024):  # a near repeat of a held-out prompt is not trained on either
        chunk = rest[start : start + 1024]
        near = (vectors[chunk] @ vectors[held_out].T).max(axis=1) >= _SAME_PROMPT_COSINE
        kept[chunk[near]] = False
    train = [e for e, keep in zip(examples, kept, strict=True) if keep]
    test = [e for e, out in zip(examples, held_out, strict=True) if out]
    return train, test, groups[held_out]


def latest_labels(examples: list[LabelledExample]) -> list[LabelledExample]:
    """One label per request (:attr:`LabelledExample.request`; oldest first): a person's last
    (feedback) where it has one, whenever the shadow judge's verdict landed, else the judge's last."""
    ranked = sorted(examples, key=lambda e: (e.source == "feedback", e.at))
    latest = {e.request: e for e in ranked}
    return sorted(latest.values(), key=lambda e: e.at)


def same_classifier(examples: list[LabelledExample]) -> list[LabelledExample]:
    """The examples (oldest first) that the newest one's classifier scored, with vectors of its
    width: labels kept from before an upgrade of the classifier describe another scale."""
    if not examples:
        return []
    newest = examples[-1]
    widths = (len(newest.embedding), len(newest.features))
    return [e for e in examples if e.inputs == newest.inputs and (len(e.embedding), len(e.features)) == widths]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LearnedRouter)


async def load_version(kv: KeyValue, tenant: str | None, version: str) -> LearnedRouter | None:
    """The stored version; raises :class:`UnreadableRouter` for a value this gateway cannot read."""
    raw = await kv.get(keyspace.learned_router(tenant, f"v:{version}"), _TIMEOUT_S)
    if raw is None:
        return None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:  # ValidationError included
        raise UnreadableRouter(f"learnt router version {version!r} cannot be read") from None


async def active_version(kv: KeyValue, tenant: str | None) -> str | None:
    raw = await kv.get(keyspace.learned_router(tenant, "active"), _TIMEOUT_S)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UnreadableRouter("the learnt router in force is named by bytes that are not text") from None


class UnreadableRouter(ValueError):
    """What the store holds under a learnt router's keys is not one this gateway can read."""


async def active(kv: KeyValue, tenant: str | None) -> LearnedRouter | None:
    version = await active_version(kv, tenant)
    return None if version is None else await load_version(kv, tenant, version)


_HISTORY = 10
"""Promotions a tenant can roll back, one at a time."""


async def promote(kv: KeyValue, tenant: str | None, router: LearnedRouter) -> None:
    """Make ``router`` the one in force; the ones before stay, newest last, for rollback."""
    await kv.put(
        keyspace.learned_router(tenant, f"v:{router.version}"), _encoder.encode(router), _VERSION_TTL_S, _TIMEOUT_S
    )
    try:
        before = await active_version(kv, tenant)
    except UnreadableRouter:
        before = None  # nothing to roll back to
    if before is not None:
        history = [*await _history(kv, tenant), before][-_HISTORY:]
        await kv.put(
            keyspace.learned_router(tenant, "previous"), "\n".join(history).encode(), _VERSION_TTL_S, _TIMEOUT_S
        )
    await kv.put(keyspace.learned_router(tenant, "active"), router.version.encode(), _VERSION_TTL_S, _TIMEOUT_S)


async def rollback(kv: KeyValue, tenant: str | None) -> str | None:
    """Put the version promoted before the one in force back (none left: the shipped router); what
    is in force now. A version whose stored router has expired is passed over; the one put back
    is kept for as long again as a fresh promotion."""
    history = await _history(kv, tenant)
    while history:
        version = history.pop()
        raw = await kv.get(keyspace.learned_router(tenant, f"v:{version}"), _TIMEOUT_S)
        if raw is None:
            continue
        await kv.put(keyspace.learned_router(tenant, f"v:{version}"), raw, _VERSION_TTL_S, _TIMEOUT_S)
        await kv.put(keyspace.learned_router(tenant, "active"), version.encode(), _VERSION_TTL_S, _TIMEOUT_S)
        if history:
            await kv.put(
                keyspace.learned_router(tenant, "previous"), "\n".join(history).encode(), _VERSION_TTL_S, _TIMEOUT_S
            )
        else:
            await kv.delete(keyspace.learned_router(tenant, "previous"), _TIMEOUT_S)
        return version
    await kv.delete(keyspace.learned_router(tenant, "previous"), _TIMEOUT_S)
    await kv.delete(keyspace.learned_router(tenant, "active"), _TIMEOUT_S)
    return None


async def _history(kv: KeyValue, tenant: str | None) -> list[str]:
    raw = await kv.get(keyspace.learned_router(tenant, "previous"), _TIMEOUT_S)
    return [] if raw is None else [v for v in raw.decode(errors="replace").split("\n") if v]


@dataclass(slots=True)
class _Entry:
    router: LearnedRouter | None
    fetched: float


_Scope = tuple[str, bool]
"""A tenant, and whether the route pools labels (``learning.scope: global``): only then does
the pooled router stand in for a tenant without its own."""


class LearnedRouters:
    """The learnt router in force per tenant (its own; on a pooled route, else the pooled
    one), re-read from the store at most every ``refresh_s`` in the background. A process's
    first request of a tenant, and one after a quiet spell, waits for one read.

    A router this classifier cannot use (fitted on another one, of another width, or not
    readable at all) is not applied: the shipped router serves, and the log says why once.
    """

    def __init__(self, kv: KeyValue, inputs: ClassifierInputs | None = None, refresh_s: float = 5.0) -> None:
        self._kv = kv
        self._inputs = inputs
        self._refresh_s = refresh_s
        self._entries: dict[_Scope, _Entry] = {}
        self._loading: set[_Scope] = set()
        self._refused: set[tuple[str, str, str]] = set()
        self._background = BackgroundTasks()

    def current(self, tenant: str, pooled: bool = False) -> LearnedRouter | None:
        scope = (tenant, pooled)
        entry = self._entries.get(scope)
        if (entry is None or time.monotonic() - entry.fetched >= self._refresh_s) and scope not in self._loading:
            self._loading.add(scope)
            self._background.spawn(self._load(scope), "learned-router-refresh")
        return None if entry is None else entry.router

    async def in_force(self, tenant: str, pooled: bool = False) -> LearnedRouter | None:
        """:meth:`current`, but a tenant this process has not read yet, or one quiet for two
        refresh periods, waits for one read (a promotion or rollback made meanwhile applies to
        its very next request, in every process, a new one included)."""
        entry = self._entries.get((tenant, pooled))
        if entry is None or time.monotonic() - entry.fetched >= 2 * self._refresh_s:
            return await self.refresh(tenant, pooled)
        return self.current(tenant, pooled)

    async def refresh(self, tenant: str, pooled: bool = False) -> LearnedRouter | None:
        """Read the version in force now (tests, and the first request after a promotion)."""
        await self._load((tenant, pooled))
        entry = self._entries.get((tenant, pooled))
        return None if entry is None else entry.router

    async def _load(self, scope: _Scope) -> None:
        tenant = scope[0]
        try:
            known = self._entries.get(scope)
            router = await self._fetch(scope, None if known is None else known.router)
        except StoreUnavailable:  # keep what is in force (none yet: the shipped router), read again later
            known = self._entries.get(scope)
            # dated now, so that requests of a quiet tenant do not each wait for a store that is down
            self._entries[scope] = _Entry(None if known is None else known.router, time.monotonic())
            return
        except UnreadableRouter as exc:
            self._refuse(tenant, "unreadable", str(exc))
            router = None
        finally:
            self._loading.discard(scope)
        if router is not None and self._inputs is not None and not router.fits(self._inputs):
            self._refuse(tenant, "another_classifier", router.version)
            router = None
        before = self._entries.get(scope)
        if (None if before is None or before.router is None else before.router.version) != (
            None if router is None else router.version
        ):
            _log.info("learned_router_in_force", tenant=tenant, version=None if router is None else router.version)
        self._entries[scope] = _Entry(router, time.monotonic())

    def _refuse(self, tenant: str, reason: str, detail: str) -> None:
        if (tenant, reason, detail) in self._refused:
            return
        self._refused.add((tenant, reason, detail))
        _log.warning("learned_router_refused", tenant=tenant, reason=reason, detail=detail, effect="shipped router")

    async def _fetch(self, scope: _Scope, known: LearnedRouter | None) -> LearnedRouter | None:
        tenant, pooled = scope
        for owner in (tenant, None) if pooled else (tenant,):
            version = await active_version(self._kv, owner)
            if version is None:
                continue
            if known is not None and known.version == version:
                return known
            return await load_version(self._kv, owner, version)
        return None

    async def aclose(self) -> None:
        await self._background.aclose()
