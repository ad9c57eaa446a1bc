"""``POST /v1/feedback``: a caller says how a routed answer turned out.

Body: ``{"request_id": ..., and one of "label": "needed_large" | "small_was_enough",
"score": 0..1, "thumbs": "up" | "down"}``. Accepted only for a request made with the
calling key (an admin key may label any request of its tenant); anything else is answered
404, the same as a request that never existed, so no key learns about another's requests.
A score or thumbs on the small model's answer becomes a label (good: the small model was
enough; bad: the large one was needed); on the large model's answer it says nothing about
whether the small one would have done, so it is acknowledged and not learnt from. A request
takes at most :data:`MAX_LABELS_PER_REQUEST` labels (the last one counts); later ones are a 409.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from litestar import Request, Response, post

from gateway.api.bodies import read_body
from gateway.api.credentials import authorization_of
from gateway.api.state import GatewayState
from gateway.errors import ConflictError, FeedbackUnavailableError, InvalidRequestError, NotFoundError
from gateway.learning.examples import LabelledExample, LearningStore, RoutingTrace
from gateway.protocols.body import decode_body
from gateway.store.base import StoreUnavailable

__all__ = ["MAX_LABELS_PER_REQUEST", "feedback"]

_MAX_BODY = 4096
_TRACE_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8)
_RETRY_AFTER_S = 5
"""As ``limiter_unavailable``'s: a restarted Redis answers within seconds, and the SDKs retry a 503 after it."""
MAX_LABELS_PER_REQUEST = 3
"""A changed mind is a label or two more; beyond that a request's labels would only push the
tenant's other labels out of its bounded list."""


class _Feedback(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    label: Literal["needed_large", "small_was_enough"] | None = None
    score: float | None = None
    thumbs: Literal["up", "down"] | None = None


@post("/v1/feedback", status_code=200)
async def feedback(request: Request[Any, Any, Any]) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    principal = runtime.auth.authenticate(authorization_of(request))
    await state.limiter.admit_count(runtime.policy, principal, "feedback")  # before the body is read
    body = await read_body(request, _MAX_BODY, runtime.policy.limits.body_read_timeout_s)
    given = decode_body(body, _Feedback)  # a 400 naming the field that is wrong
    if sum(v is not None for v in (given.label, given.score, given.thumbs)) != 1:
        raise InvalidRequestError("give exactly one of 'label', 'score' or 'thumbs'", param="label")
    if given.score is not None and not 0.0 <= given.score <= 1.0:
        raise InvalidRequestError("'score' must be between 0 and 1", param="score")
    learning = state.learning
    try:
        request_id, trace = await _written_trace(
            learning.store,
            principal.tenant,
            _ids_meant(given.request_id),
            lambda found: found.key_id == principal.key_id or principal.admin,
        )
    except StoreUnavailable:
        raise _unavailable() from None
    if trace is None:
        raise NotFoundError(
            "no routed request with this id for this key: only answers the router chose the model for, on a "
            "route with `learning` on, can be rated (not cache hits, nor prompts it could not read and sent "
            "large), for the route's learning.keep_hours",
            param="request_id",
        )
    route = runtime.policy.routes.get(trace.route)
    policy = None if route is None else route.learning
    if policy is None:
        raise ConflictError(f"route {trace.route!r} no longer learns from feedback")
    needed_large = _label(given, trace.side)
    if needed_large is not None:
        example = LabelledExample.of(request_id, trace, needed_large, "feedback", policy.scope == "global")
        try:
            added = await learning.store.add_counted_label(
                principal.tenant, example, runtime.router.labels_kept, policy.keep_hours, MAX_LABELS_PER_REQUEST
            )
        except StoreUnavailable:
            raise _unavailable() from None
        if not added:
            raise ConflictError(
                f"this request has had {MAX_LABELS_PER_REQUEST} labels; no more are taken", param="request_id"
            )
    label = None if needed_large is None else ("needed_large" if needed_large else "small_was_enough")
    counted = "none" if needed_large is None else ("needed_large" if needed_large else "small_enough")
    state.metrics.feedback_received(counted)  # as the shadow judgements count it (t152: the body's own word)
    out: dict[str, object] = {
        "object": "feedback",
        "request_id": given.request_id,
        "answered_by": trace.side,
        "label": label,
    }
    if label is None:
        out["note"] = "a score on the large model's answer says nothing about the small model; not learnt from"
    return Response(msgspec.json.encode(out), media_type="application/json")


def _unavailable() -> FeedbackUnavailableError:
    error = FeedbackUnavailableError("feedback cannot be recorded right now (Redis unavailable)")
    error.headers["retry-after"] = str(_RETRY_AFTER_S)
    return error


def _label(given: _Feedback, side: str) -> bool | None:
    """Whether the prompt needed the large model; None when the feedback cannot say."""
    if given.label is not None:
        return given.label == "needed_large"
    good = given.thumbs == "up" if given.thumbs is not None else (given.score or 0.0) >= 0.5
    if side == "small":
        return not good
    return None


def _ids_meant(request_id: str) -> tuple[str, ...]:
    """The ids ``request_id`` may name: Anthropic's SDK gives its caller the ``request-id`` header
    the gateway answers Messages clients with, ``req_`` and the gateway's id (t88: such feedback
    was a 404, so apps on that SDK taught the router nothing)."""
    if request_id.startswith("req_") and len(request_id) > 4:
        return request_id, request_id[4:]
    return (request_id,)


async def _written_trace(
    store: LearningStore, tenant: str, request_ids: tuple[str, ...], visible: Callable[[RoutingTrace], bool]
) -> tuple[str, RoutingTrace | None]:
    """The request's id and routing trace (of the first of ``request_ids`` that has one), waited
    for a moment: it is written just after the answer goes out (the client does not wait for the
    bookkeeping), so feedback sent on a stream's last event can arrive first, and on another
    worker. One the caller may not see is waited for as one not there: a 404 at once told that
    another key of the tenant had used the id (t46)."""
    for wait_s in (*_TRACE_WAITS_S, None):
        for request_id in request_ids:
            trace = await store.trace(tenant, request_id)
            if trace is not None and visible(trace):
                return request_id, trace
        if wait_s is not None:
            await asyncio.sleep(wait_s)
    return request_ids[0], None
