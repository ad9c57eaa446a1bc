"""What the router keeps of a routed request, and the labels that teach it.

A routed request leaves a :class:`RoutingTrace` for ``learning.keep_hours``: the prompt's
embedding and surface features as the router saw them, the score, and which side of the
pair answered (about 1.3 KB of Redis; a tenant's on a route are bounded by
``learning.traces_mib_per_tenant``, the oldest going first). Never the text: a trace says nothing a request log would not. Feedback or a
shadow judgement turns a trace into a :class:`LabelledExample` (did this prompt need the
large model?), appended to the tenant's bounded list. Everything is under the tenant's
keys: no lookup can reach another tenant's traces or labels.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

import msgspec
import numpy as np
import structlog

from gateway.store import keyspace
from gateway.store.base import KeyValue

__all__ = ["LabelledExample", "LearningStore", "RoutingTrace", "Side"]

_log = structlog.get_logger("gateway.learning")

Side = Literal["small", "large"]
_TIMEOUT_S = 0.2
_SHADOW_TTL_S = 2 * 86400
_LABELS_KEEP_DAYS = 180


class RoutingTrace(msgspec.Struct, frozen=True):
    key_id: str
    route: str
    side: Side
    """Which model of the pair answered."""
    p_large: float
    embedding: bytes  # float16
    features: bytes  # float32
    at: float
    inputs: str = ""
    """The classifier that scored it (:attr:`Classifier.signature`): labels from another one live on
    another scale and in another embedding space. Empty in traces kept before it was recorded."""

    @classmethod
    def of(
        cls,
        key_id: str,
        route: str,
        side: Side,
        p_large: float,
        embedding: np.ndarray,
        features: np.ndarray,
        inputs: str = "",
    ) -> RoutingTrace:
        return cls(
            key_id,
            route,
            side,
            float(p_large),
            np.asarray(embedding, dtype=np.float16).tobytes(),
            np.asarray(features, dtype=np.float32).tobytes(),
            time.time(),
            inputs,
        )


class LabelledExample(msgspec.Struct, frozen=True):
    request_id: str
    route: str
    needed_large: bool
    source: Literal["feedback", "shadow"]
    side: Side
    p_large: float
    embedding: bytes
    features: bytes
    at: float
    poolable: bool = False
    """The route's ``learning.scope`` was ``global`` when it was labelled."""
    tenant: str = ""
    """Whose label it is: set when labels are read (request ids are unique only within a tenant)."""
    inputs: str = ""
    """The classifier that scored the request (its trace's ``inputs``)."""
    traced_at: float = 0.0
    """Its trace's ``at``: with the id, which request it labels. A client may use its id (a session's)
    again once the trace of the first request under it is gone (evicted, expired), and labels outlive
    traces; 0.0 in labels kept before it was recorded."""

    @property
    def request(self) -> tuple[str, str, float]:
        """The request it labels: relabels of one request share it; requests that reused an id do not."""
        return self.tenant, self.request_id, self.traced_at

    @classmethod
    def of(
        cls,
        request_id: str,
        trace: RoutingTrace,
        needed_large: bool,
        source: Literal["feedback", "shadow"],
        poolable: bool,
    ) -> LabelledExample:
        return cls(
            request_id,
            trace.route,
            needed_large,
            source,
            trace.side,
            trace.p_large,
            trace.embedding,
            trace.features,
            time.time(),
            poolable,
            inputs=trace.inputs,
            traced_at=trace.at,
        )

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(embedding, features) as float32."""
        return (
            np.frombuffer(self.embedding, dtype=np.float16).astype(np.float32),
            np.frombuffer(self.features, dtype=np.float32),
        )


_trace_encoder = msgspec.msgpack.Encoder()
_trace_decoder = msgspec.msgpack.Decoder(RoutingTrace)
_example_decoder = msgspec.msgpack.Decoder(LabelledExample)


class LearningStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def keep_trace(
        self, tenant: str, request_id: str, trace: RoutingTrace, keep_hours: int, max_bytes: int
    ) -> bool:
        """Whether it was kept. The first request under an id keeps it: a client may choose its
        ``x-request-id``, and another key of the tenant reusing one must not take over the first
        one's feedback. The tenant's traces on the route stay within ``max_bytes``, its oldest
        going first: every request leaves one, for ``keep_hours``, and under ``volatile-ttl``
        a full Redis would evict every tenant's cached answers before any of them (t101)."""
        kept = await self._kv.put_bounded(
            keyspace.routing_trace(tenant, request_id),
            _trace_encoder.encode(trace),
            keep_hours * 3600,
            keyspace.routing_traces(tenant, trace.route),
            max_bytes,
            _TIMEOUT_S,
            new_only=True,
        )
        return kept is not None

    async def trace(self, tenant: str, request_id: str) -> RoutingTrace | None:
        """None also for a value this gateway cannot read (written by another version, or by hand)."""
        raw = await self._kv.get(keyspace.routing_trace(tenant, request_id), _TIMEOUT_S)
        if raw is None:
            return None
        try:
            return _trace_decoder.decode(raw)
        except msgspec.DecodeError:  # ValidationError included
            _unreadable(kind="routing_trace")
            return None

    async def add_label(
        self, tenant: str, example: LabelledExample, max_labels: int, keep_days: int = _LABELS_KEEP_DAYS
    ) -> None:
        key = keyspace.routing_labels(tenant)
        await self._kv.append(key, _trace_encoder.encode(example), max_labels, keep_days * 86400, _TIMEOUT_S)

    async def add_counted_label(
        self, tenant: str, example: LabelledExample, max_labels: int, keep_hours: int, at_most: int
    ) -> bool:
        """:meth:`add_label`, unless the request has had ``at_most`` labels (a bound on relabelling);
        whether it was added. Counted and kept in one step: a label counted and not kept (its write
        failed) was refused later for labels no one had (t165). Counted per trace: a count under the
        id alone outlived an evicted trace, and the next request under the id took no label (t196)."""
        return await self._kv.append_counted(
            keyspace.routing_labels(tenant),
            _trace_encoder.encode(example),
            max_labels,
            _LABELS_KEEP_DAYS * 86400,
            keyspace.routing_label_count(tenant, example.request_id, example.traced_at),
            keep_hours * 3600,
            at_most,
            _TIMEOUT_S,
        )

    async def labels(self, tenant: str, timeout_s: float = 5.0) -> list[LabelledExample]:
        """The tenant's labels; one this gateway cannot read is left out (and logged)."""
        raw = await self._kv.read_list(keyspace.routing_labels(tenant), timeout_s)
        examples: list[LabelledExample] = []
        for item in raw:
            try:
                examples.append(msgspec.structs.replace(_example_decoder.decode(item), tenant=tenant))
            except msgspec.DecodeError:
                _unreadable(kind="routing_label")
        return examples

    async def add_shadow_spend(self, tenant: str, route: str, usd: float) -> float:
        """Today's shadow spend on this tenant's route after adding ``usd``."""
        return await self._kv.add_float(keyspace.shadow_spend(tenant, route, _today()), usd, _SHADOW_TTL_S, _TIMEOUT_S)


def _unreadable(kind: str) -> None:
    _log.warning("learning_value_unreadable", kind=kind)


def _today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")
