"""Every key the gateway writes, named in one place.

All keys of a tenant start with ``gw:{<tenant hash>}``: the tenant is part of every
key, so no lookup can cross tenants, and the braces are a Redis Cluster hash tag that
keeps a tenant's keys on one slot (the multi-key scripts need that). Tenants are
hashed, so any string is a safe key part.

::

    gw:{t}:x:<sha256>                 exact-cache answer         (TTL)
    gw:{t}:x:<sha256>:lock            its coalescing lease        (TTL)
    gw:{t}:v:<ns>                     semantic vector set         (TTL, refreshed on add)
    gw:{t}:v:<ns>:e:<element>         an element's answer         (TTL)
    gw:{t}:v:<ns>:z                   elements by insertion time  (TTL)
    gw:{t}:rl:k:<key id>:win|spend    a key's rate and spend counters (no TTL: never evicted)
    gw:{t}:rl:t:win|spend             the tenant's
    gw:{t}:rl:r:<reservation id>      a reservation made ("r"), then settled ("s") (TTL: 35 days, then 120 s)
    gw:{t}:rl:pending                 the tenant's unsettled reservations, by when they are given up (TTL: 35 days)
    gw:{t}:rlc:k:<key id>:win|spend   the same for token counts (count_tokens: rpm only); rlf: for feedback
    gw:{t}:rlc:t:win|spend            the tenant's
    gw:{t}:use:k:<key id>:<yyyymmdd>  a key's usage that day      (deleted after the retention period)
    gw:{t}:use:t:<yyyymmdd>           the tenant's
    gw:{t}:ub:<batch>                 a usage-flush batch applied, so a batch sent again adds nothing (TTL: 1 h)
    gw:{usage}:keys:<yyyymmdd>        the tenant and key pairs with usage that day (TTL: a day past its usage keys')
    gw:{t}:resp:<response id>         a stored Responses API turn (TTL: 30 days)
    gw:{t}:respq, gw:{t}:respq:bytes  the tenant's stored turns by age, and their sizes (TTL: 30 days, refreshed)
    gw:{t}:thread:<message id hash>  an Anthropic message a thread answered for the tenant (TTL: 1 day)
    gw:{t}:threadq, :threadq:bytes   the tenant's thread messages by age, and their sizes (TTL: 1 day, refreshed)
    gw:{t}:share:<route>              a route's threshold kept on target_large_share, and that target (TTL: 7 days)
    gw:{t}:share:<route>:w            its recent scores, all processes' (TTL: 7 days)
    gw:{t}:audit:<route>:<setting>    a route's semantic-cache audit state, and its outcomes (:o:<gen>) (TTL: 7 days)
    gw:{t}:learn:tr:<request id>      what the router saw of a routed request (TTL: learning.keep_hours)
    gw:{t}:learn:trq:<route>, :bytes  the tenant's traces on a route by age, and their sizes (TTL: keep_hours, refreshed)
    gw:{t}:learn:labels               labelled routing examples, newest kept (TTL: refreshed on append)
    gw:{t}:learn:n:<request id, trace> how many labels a request has had (TTL: learning.keep_hours)
    gw:{t}:learn:shadow:<route>:<day> a route's shadow-judging spend that UTC day (TTL: 2 days)
    gw:{t}:router:active|previous     the tenant's learnt router version in force, and the one before
    gw:{t}:router:v:<version>         a learnt router (TTL: 90 days)
    gw:{global}:router:...            the same for the router learnt from pooled labels
    gw:{probe}:ready                  the readiness probe's write (TTL: 60 s)
"""

from __future__ import annotations

import functools
import hashlib

__all__ = [
    "GLOBAL_SCOPE",
    "count_counters",
    "exact",
    "hash_tag",
    "large_share_threshold",
    "large_share_window",
    "learned_router",
    "lease",
    "limit_counters",
    "reservation",
    "response",
    "routing_label_count",
    "routing_labels",
    "routing_trace",
    "routing_traces",
    "semantic_ages",
    "semantic_audit",
    "semantic_entry",
    "semantic_entry_prefix",
    "semantic_index",
    "shadow_spend",
    "stored_responses",
    "tenant_prefix",
    "thread_message",
    "thread_messages",
    "usage",
    "usage_index",
]


@functools.lru_cache(maxsize=4096)
def tenant_prefix(tenant: str) -> str:
    return f"gw:{{{hashlib.sha256(tenant.encode()).hexdigest()[:16]}}}"


def hash_tag(key: str) -> str:
    """The part of ``key`` up to its hash tag (``gw:{<tenant hash>}``): keys that share it share a
    Redis Cluster slot, so one script may touch them all."""
    return key[: key.find("}") + 1] or key


def exact(tenant: str, digest: str) -> str:
    return f"{tenant_prefix(tenant)}:x:{digest}"


def large_share_threshold(tenant: str, route: str) -> str:
    return f"{tenant_prefix(tenant)}:share:{hashlib.sha256(route.encode()).hexdigest()[:16]}"


def large_share_window(tenant: str, route: str) -> str:
    """The recent scores of a target-share route, all processes' (a list of batches)."""
    return large_share_threshold(tenant, route) + ":w"


def semantic_audit(tenant: str, route: str, setting: str) -> str:
    """A route's semantic-cache audit state under one audit setting (its outcomes: ``+ ":o:<generation>"``)."""
    return f"{tenant_prefix(tenant)}:audit:{hashlib.sha256(route.encode()).hexdigest()[:16]}:{setting}"


def lease(key: str) -> str:
    return key + ":lock"


def semantic_index(tenant: str, namespace: str) -> str:
    return f"{tenant_prefix(tenant)}:v:{namespace}"


def semantic_entry_prefix(index: str) -> str:
    return index + ":e:"


def semantic_entry(index: str, element: str) -> str:
    return f"{index}:e:{element}"


def semantic_ages(index: str) -> str:
    return index + ":z"


@functools.lru_cache(maxsize=4096)
@functools.lru_cache(maxsize=4096)
def limit_counters(tenant: str, key_id: str) -> tuple[str, str, str, str]:
    """The key's window and spend counters, then its tenant's."""
    prefix = tenant_prefix(tenant)
    key, scope = f"{prefix}:rl:k:{key_id}", f"{prefix}:rl:t"
    return f"{key}:win", f"{key}:spend", f"{scope}:win", f"{scope}:spend"


def reservation(tenant: str, reservation_id: str) -> str:
    """A reservation's mark, on its tenant's slot (the reserve and settle scripts touch it)."""
    return f"{tenant_prefix(tenant)}:rl:r:{reservation_id}"


def pending_reservations(mark: str) -> str:
    """The tenant's reservations not settled yet (by when they are given up), beside ``mark``'s."""
    return mark.rsplit(":r:", 1)[0] + ":pending"


def count_counters(tenant: str, key_id: str, kind: str = "c") -> tuple[str, str, str, str]:
    """Like :func:`limit_counters`, for calls that spend no tokens, each ``kind`` in an ``rpm``
    window of its own: token counts (``count_tokens``, ``c``), feedback (``f``)."""
    prefix = tenant_prefix(tenant)
    key, scope = f"{prefix}:rl{kind}:k:{key_id}", f"{prefix}:rl{kind}:t"
    return f"{key}:win", f"{key}:spend", f"{scope}:win", f"{scope}:spend"


def usage(tenant: str, key_id: str, day: str) -> tuple[str, str]:
    """The key's and its tenant's usage sums of one UTC day (``yyyymmdd``)."""
    prefix = tenant_prefix(tenant)
    return f"{prefix}:use:k:{key_id}:{day}", f"{prefix}:use:t:{day}"


def usage_index(day: str) -> str:
    """The ``tenant\x1fkey id`` pairs that had usage on one UTC day (``yyyymmdd``), whatever the
    policy says now: a key removed today still spent this month."""
    return f"gw:{{usage}}:keys:{day}"


def response(tenant: str, response_id: str) -> str:
    """A response kept for ``GET /v1/responses/{id}`` and ``previous_response_id``."""
    return f"{tenant_prefix(tenant)}:resp:{response_id}"


def thread_message(tenant: str, message_id: str) -> str:
    """An Anthropic message answered in a thread (message-threads beta) for ``tenant``, which a
    ``continue`` may name as its ``previous_message_id``."""
    return f"{tenant_prefix(tenant)}:thread:{hashlib.sha256(message_id.encode()).hexdigest()[:32]}"


def thread_messages(tenant: str) -> str:
    """The ledger of a tenant's thread messages (oldest first), which bounds them."""
    return f"{tenant_prefix(tenant)}:threadq"


def stored_responses(tenant: str) -> str:
    """The ledger of a tenant's kept responses (their bytes, oldest first), which bounds them."""
    return f"{tenant_prefix(tenant)}:respq"


GLOBAL_SCOPE = "gw:{global}"
"""The prefix of what is learnt from labels pooled across tenants (a policy choice)."""


def routing_trace(tenant: str, request_id: str) -> str:
    return f"{tenant_prefix(tenant)}:learn:tr:{hashlib.sha256(request_id.encode()).hexdigest()[:32]}"


def routing_traces(tenant: str, route: str) -> str:
    """The ledger of a tenant's traces on a route (their bytes, oldest first), which bounds them:
    per route, as every key of a ledger has one TTL and ``keep_hours`` is the route's."""
    return f"{tenant_prefix(tenant)}:learn:trq:{hashlib.sha256(route.encode()).hexdigest()[:16]}"


def routing_label_count(tenant: str, request_id: str, traced_at: float) -> str:
    """Per trace (its ``at``): a client may use its id again once the first request's trace is gone."""
    request = f"{request_id}\n{traced_at.hex()}"
    return f"{tenant_prefix(tenant)}:learn:n:{hashlib.sha256(request.encode()).hexdigest()[:32]}"


def routing_labels(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}:learn:labels"


def shadow_spend(tenant: str, route: str, day: str) -> str:
    return f"{tenant_prefix(tenant)}:learn:shadow:{hashlib.sha256(route.encode()).hexdigest()[:16]}:{day}"


def learned_router(tenant: str | None, part: str) -> str:
    """``part``: ``active``, ``previous`` or ``v:<version>``; ``tenant`` None: the pooled router."""
    return f"{GLOBAL_SCOPE if tenant is None else tenant_prefix(tenant)}:router:{part}"
