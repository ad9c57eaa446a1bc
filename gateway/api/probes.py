"""``/v1/models``, ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, get

from gateway.accounting.request_log import exception_frames
from gateway.api.credentials import authorization_of
from gateway.api.state import GatewayState
from gateway.errors import GatewayError, InvalidRequestError, ModelNotFoundError
from gateway.learning.learned import active_version
from gateway.runtime import Runtime
from gateway.store.base import StoreUnavailable

__all__ = ["error_response", "healthz", "internal_error", "list_models", "metrics", "readyz", "retrieve_model"]

_log = structlog.get_logger("gateway.app")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """OpenAI's list, which Anthropic's clients read too: its paging fields (``limit``,
    ``after_id``, ``before_id``; ``has_more``, ``first_id``, ``last_id``) are there for them.
    Without ``limit`` the whole list comes, as OpenAI's does."""
    data = _visible_models(request)
    query = request.query_params
    after, before, limit = query.get("after_id"), query.get("before_id"), _page_size(query.get("limit"))
    if after is not None and before is not None:
        raise InvalidRequestError("after_id and before_id cannot both be given", param="before_id")
    ids = [entry["id"] for entry in data]
    if before is not None:  # the page just before it; has_more: there are more before the page (t183)
        data = data[: ids.index(before)] if before in ids else []
        shown = data[-limit:] if limit is not None else data
    else:
        if after is not None:
            data = data[ids.index(after) + 1 :] if after in ids else []
        shown = data[:limit] if limit is not None else data
    body = {
        "object": "list",
        "data": shown,
        "has_more": len(shown) < len(data),
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
    }
    return Response(msgspec.json.encode(body), media_type="application/json")


def _page_size(limit: str | None) -> int | None:
    """``limit`` as Anthropic takes it, 1 to 1000 (t183: 0 or ``abc`` gave the whole list)."""
    if limit is None:
        return None
    if not (limit.isdigit() and 1 <= int(limit) <= 1000):
        raise InvalidRequestError("limit: must be an integer from 1 to 1000", param="limit")
    return int(limit)


@get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
    """One model or route, as OpenAI's ``GET /v1/models/{id}`` (ids may hold slashes)."""
    wanted = model_id.removeprefix("/")  # the path parameter keeps its leading slash
    for entry in _visible_models(request):
        if entry["id"] == wanted:
            return Response(msgspec.json.encode(entry), media_type="application/json")
    raise ModelNotFoundError(f"the model '{wanted}' does not exist or you do not have access to it", param="model")


def _visible_models(request: Request[Any, Any, Any]) -> list[dict[str, object]]:
    """Routes and public models this caller's key may use."""
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    principal = runtime.auth.authenticate(authorization_of(request))
    policy = runtime.policy
    data = []
    for name in runtime.router.route_names:
        route = policy.routes[name]
        data.append(_model_entry(name, "gateway-route", route=route.strategy))
    for name in runtime.router.model_names:
        model = policy.models[name]
        owner = "simulated" if model.simulated else model.provider
        data.append(_model_entry(name, owner, tier=model.tier, simulated=model.simulated))
    allowed = principal.allowed
    if "*" not in allowed:
        data = [entry for entry in data if entry["id"] in allowed]
    return data


def _model_entry(name: str, owned_by: str, **extra: object) -> dict[str, object]:
    """OpenAI's model object, with Anthropic's fields beside it (its SDK requires them)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by,
            "type": "model", "display_name": name, "created_at": "1970-01-01T00:00:00Z", **extra}  # fmt: skip


@get("/healthz")
async def healthz() -> Response[bytes]:
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    redis_ok = await state.redis.check()
    rejected, detailed = state.holder.last_reload_error, _may_see_details(runtime, request)
    if rejected is not None and not detailed:
        rejected = "a policy reload was rejected (details: the gateway's log, or /readyz with an admin key)"
    body: dict[str, object] = {
        "ready": redis_ok,
        "redis": ("full" if state.redis.full else "ok") if redis_ok else "unavailable",  # full: reads go on (t116)
        "policy": {
            "version": runtime.version,
            "source": runtime.loaded.source if detailed else None,
            "last_reload_error": rejected,
            "restart_needed": state.holder.restart_needed,
        },
        "classifier": state.classifier_info or {"loaded": False},
        **await _semantic_cache(state, runtime),
        "learned_router": await _learned_router(state),
        # every model by name, those no key may list too (public: false): an admin key's once auth is on (t46)
        "upstreams": {name: state.holder.breakers.state(name) for name in runtime.providers} if detailed else None,
    }
    return Response(msgspec.json.encode(body), status_code=200 if redis_ok else 503, media_type="application/json")


async def _semantic_cache(state: GatewayState, runtime: Runtime) -> dict[str, str]:
    """Whether the semantic cache can run, when the policy turns it on: a Redis without vector
    sets (Redis 7) answers everything else, and the cache would quietly never hit."""
    if not (runtime.policy.cache.enabled and runtime.policy.cache.semantic.enabled):
        return {}
    found = await state.redis.has_vector_sets()
    if found is None:
        return {"semantic_cache": "unknown (Redis unavailable)"}
    return {"semantic_cache": "ok" if found else "off: this Redis has no vector sets (Redis 8 is needed)"}


def _may_see_details(runtime: Runtime, request: Request[Any, Any, Any]) -> bool:
    """The policy's path and a rejected edit's text (key ids, tenants, values from the
    environment) are for ops: an admin key, or anyone while auth is off. The probe itself
    needs no key, and a wrong one is no error here."""
    if not runtime.auth.enabled:
        return True
    try:
        return runtime.auth.authenticate(authorization_of(request)).admin
    except GatewayError:
        return False


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    await state.redis.check()
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def error_response(exc: GatewayError) -> Response[bytes]:
    return Response(exc.to_body(), status_code=exc.status_code, headers=exc.headers, media_type="application/json")


def internal_error(path: str, exc: Exception) -> GatewayError:
    """What a client is told of a bug of ours (logged here with where it happened, under a request id)."""
    request_id = uuid.uuid4().hex
    _log.error(
        "internal_error", request_id=request_id, path=path, error=type(exc).__name__, where=exception_frames(exc)
    )
    error = GatewayError("internal error in the gateway; the request id is in x-request-id", code="internal_error")
    error.headers["x-request-id"] = request_id
    return error


async def _learned_router(state: GatewayState) -> str | None:
    """The pooled learnt router in force (tenants' own versions are in their responses' headers)."""
    try:
        return await active_version(state.kv, None)
    except StoreUnavailable:
        return None
