"""``/v1/models``, ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, get

from gateway.api.state import GatewayState
from gateway.errors import GatewayError

__all__ = ["healthz", "list_models", "metrics", "readyz"]


@get("/v1/models")
async def list_models(request: Request) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    principal = runtime.auth.authenticate(request.headers.get("authorization"))
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
    return Response(msgspec.json.encode({"object": "list", "data": data}), media_type="application/json")


def _model_entry(name: str, owned_by: str, **extra: object) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by, **extra}


@get("/healthz")
async def healthz() -> Response[bytes]:
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/readyz")
async def readyz(request: Request) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    runtime = state.holder.current
    redis_ok = await state.redis.check()
    body = {
        "ready": redis_ok,
        "redis": "ok" if redis_ok else "unavailable",
        "policy": {
            "version": runtime.version,
            "source": runtime.loaded.source,
            "last_reload_error": state.holder.last_reload_error,
        },
        "classifier": state.classifier_info or {"loaded": False},
        "upstreams": {name: state.holder.breakers[name].state for name in runtime.providers},
    }
    return Response(msgspec.json.encode(body), status_code=200 if redis_ok else 503, media_type="application/json")


@get("/metrics")
async def metrics(request: Request) -> Response[bytes]:
    state: GatewayState = request.app.state.gateway
    await state.redis.check()
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def error_response(exc: GatewayError) -> Response[bytes]:
    return Response(exc.to_body(), status_code=exc.status_code, headers=exc.headers, media_type="application/json")
