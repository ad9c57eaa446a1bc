"""The Litestar application and its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException

from gateway.accounting.ledger import UsageLedger
from gateway.accounting.metrics import Metrics
from gateway.accounting.request_log import RequestLogWriter, configure_logging, take_stdout
from gateway.api.chat import ChatRoute
from gateway.api.completions import create_completion
from gateway.api.embeddings import create_embeddings
from gateway.api.feedback import feedback
from gateway.api.handoff import log_refused_method
from gateway.api.messages import count_message_tokens, create_message
from gateway.api.probes import error_response, healthz, internal_error, list_models, metrics, readyz, retrieve_model
from gateway.api.responses import (
    cancel_response,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from gateway.api.state import GatewayState
from gateway.api.usage import usage
from gateway.cache.audit import SemanticAudit
from gateway.cache.exact import ExactCache
from gateway.cache.semantic import SemanticCache
from gateway.cache.verifier import load_verifier
from gateway.classifier import load_classifier
from gateway.drain import Drain
from gateway.embeddings import EmbeddingsPipeline
from gateway.errors import ConfigError, GatewayError, InvalidRequestError, ModelNotFoundError
from gateway.http_paths import base_url_hint, canonical_path, in_messages_api, names_messages
from gateway.large_share import LargeShareTracker
from gateway.learning.learned import ClassifierInputs
from gateway.learning.loop import LearningLoop
from gateway.limits import Limiter
from gateway.pipeline import ChatPipeline
from gateway.protocols import anthropic_messages
from gateway.runtime import RuntimeHolder, load_at_start, loggable_problems, still_written
from gateway.services.parent_death import end_with_supervisor
from gateway.services.server_log import say_unsaid
from gateway.settings import Settings
from gateway.store.redis import SharedRedis, connect, redis_store

__all__ = ["create_app"]

_log = structlog.get_logger("gateway.app")


def create_app(settings: Settings | None = None) -> ChatRoute:
    """The gateway's ASGI application: the chat route in front, Litestar for the rest."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        end_with_supervisor()  # a worker does not outlive a serve killed outright
        try:
            state = await _start(settings)
        except Exception as exc:
            # The ASGI server may not show a failed start-up; say why before the worker exits.
            print(f"[gateway] worker failed to start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            raise
        app.state.gateway = state
        try:
            yield
        finally:
            await state.aclose()
            say_unsaid()  # the malformed requests counted since the last line (uvicorn)

    return ChatRoute(
        Litestar(
            route_handlers=[
                create_completion,
                create_embeddings,
                create_message,
                count_message_tokens,
                create_response,
                retrieve_response,
                list_input_items,
                cancel_response,
                delete_response,
                list_models,
                retrieve_model,
                usage,
                feedback,
                healthz,
                readyz,
                metrics,
            ],
            lifespan=[lifespan],
            exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _internal_error},
            openapi_config=None,
            logging_config=None,
            request_max_body_size=None,
        )
    )


async def _start(settings: Settings) -> GatewayState:
    last_good = Path(settings.policy_last_good) if settings.policy_last_good else None
    path = Path(settings.policies_path)
    written = await asyncio.to_thread(still_written, path)  # never the half of a file being written (t122)
    try:
        first = load_at_start(path, last_good, auth_required=settings.auth_required, written=written)
    except ConfigError as exc:  # said on stderr, the operational log: no value a problem quotes (t134)
        raise ConfigError(exc.source, loggable_problems(exc.problems)) from None
    log_policy = settings.request_log or first.loaded.policy.request_log
    stdout_fd = settings.request_log_fd
    if settings.split_stdout:  # a spawned worker: serve could not hand it the request log's descriptor
        stdout_fd = take_stdout()
    log_path = log_policy.path if log_policy.enabled and log_policy.path else None
    metrics = Metrics(settings.metrics_dir)
    request_log = RequestLogWriter(
        stdout=log_policy.enabled and log_policy.stdout,
        # relative to policies.yaml, as auth.key_file is (not to wherever serve was started: t27)
        path=str(Path(settings.policies_path).parent / log_path) if log_path else None,
        stdout_fd=stdout_fd,
        on_lost=metrics.request_log_lines_lost,
    )
    ops_log = RequestLogWriter(stdout=False, stderr=True)
    configure_logging(request_log, ops_log)
    loop = asyncio.get_running_loop()
    _reopen_on_sigusr1(loop, request_log)
    _log.info("event_loop", implementation=f"{type(loop).__module__}.{type(loop).__qualname__}")
    holder = RuntimeHolder(
        settings.policies_path,
        metrics,
        transport=settings.upstream_transport,  # type: ignore[arg-type]
        last_good=last_good,
        auth_required=settings.auth_required,
        request_log=log_policy,
    )
    holder.start(first, written=bool(written))
    client = connect(settings.redis_url) if settings.redis_url else None
    redis = SharedRedis(client, metrics)
    store = redis_store(redis)
    limiter = Limiter(store.counters, UsageLedger(store.counters, store_configured=client is not None))
    classifier = await asyncio.to_thread(
        load_classifier, settings.router_artifacts, intra_op_threads=settings.onnx_threads
    )
    if classifier is None:
        _log.warning("router_not_loaded", artifacts=settings.router_artifacts, effect="auto uses its default model")
        classifier_info: dict[str, object] = {"loaded": False, "artifacts": settings.router_artifacts}
    else:
        classifier_info = {"loaded": True, **classifier.describe()}
        _log.info("router_loaded", **classifier_info)
    verifier = await asyncio.to_thread(load_verifier, intra_op_threads=settings.onnx_threads)
    if verifier is None:
        _log.warning("cache_verifier_not_loaded", effect="the semantic cache serves no hits")
    audit = SemanticAudit(metrics, kv=store.kv)
    large_share = LargeShareTracker(store.kv)
    learning = LearningLoop(store.kv, metrics, None if classifier is None else ClassifierInputs.of(classifier))
    drain = Drain(settings.drain_s)
    drain.install_signal_handler(asyncio.get_running_loop())
    _take_sigterm()
    pipeline = ChatPipeline(
        holder,
        metrics,
        ExactCache(store.kv),
        SemanticCache(store.vectors, verifier),
        limiter,
        scorer=classifier,
        drain=drain,
        audit=audit,
        large_share=large_share,
        learning=learning,
    )
    embeddings = EmbeddingsPipeline(holder, metrics, store.kv, limiter, drain)
    state = GatewayState(
        holder, pipeline, metrics, redis, limiter, request_log, ops_log, embeddings, store.kv, learning, classifier_info
    )
    state.closers.append(drain.aclose)
    state.closers.append(audit.aclose)
    state.closers.append(large_share.aclose)
    state.closers.append(learning.aclose)
    if verifier is not None:
        state.closers.append(verifier.aclose)
    if classifier is not None:
        state.closers.append(classifier.aclose)
    holder.reload_on_sighup()
    if settings.watch_policies:
        state.tasks.append(asyncio.create_task(holder.watch(), name="policy-watch"))
    if not await state.redis.check():
        _log.warning("redis_not_ready", url_set=bool(settings.redis_url))
    return state


def _take_sigterm() -> None:
    """A SIGTERM held since ``serve`` forked this worker (``serve._HELD_IN_A_GRANIAN_WORKER``) comes
    now, to the drain's handler and through it to the server's, in place by the lifespan: the worker
    stops once started. The drain's sees every stop the worker takes, the first passed on: it acts on
    one that came as granian's loop was not running, and must know whether the server had one already
    (``Drain.install_signal_handler``). Blocked nowhere else: nothing changes."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _reopen_on_sigusr1(loop: asyncio.AbstractEventLoop, request_log: RequestLogWriter) -> None:
    """``kill -USR1`` (``serve`` passes it on to every worker) opens the request log file again at
    its path, for logrotate's ``postrotate``. ``serve`` starts each worker with SIGUSR1 blocked
    (its default action ends a process): unblocked here, once the handler is in place."""
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGUSR1, request_log.reopen)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


_MODEL_ENDPOINTS = {
    "/v1/completions": "openai.completions",
    "/v1/responses": "openai.responses",
    "/v1/messages": "anthropic.messages",
    "/v1/embeddings": "openai.embeddings",
}
"""The model endpoints Litestar routes (chat is :class:`ChatRoute`'s): their 405 writes a request line."""


def _gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return _in_callers_shape(request, exc)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if exc.status_code == 404:
        hint = base_url_hint(request.url.path)  # the documented SDK mistakes (t200: a bare "no such endpoint")
        said = "no such endpoint" if hint is None else f"no such endpoint: {hint}"
        return _in_callers_shape(request, ModelNotFoundError(said, code="not_found"))
    error = InvalidRequestError(str(exc.detail), headers=dict(exc.headers or {}))  # a 405's Allow among them
    error.status_code = exc.status_code
    if exc.status_code == 405 and (protocol := _MODEL_ENDPOINTS.get(canonical_path(request.url.path))):
        state: GatewayState | None = getattr(request.app.state, "gateway", None)
        if state is not None:  # requests come after the lifespan's start
            error.headers["x-request-id"] = log_refused_method(request, state, protocol)
    allowed = error.headers.get("allow", "")
    if "GET" in allowed.split(", "):  # served for HEAD too (ChatRoute)
        error.headers["allow"] = allowed.replace("GET", "GET, HEAD", 1)
    return _in_callers_shape(request, error)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return _in_callers_shape(request, internal_error(request.url.path, exc))


def _in_callers_shape(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    """Anthropic's error shape on the Messages API (and for a path that ends as its paths do, which
    is not served: ``/v1/v1/messages``), and on ``/v1/models`` for Anthropic's SDK (it
    sends ``anthropic-version`` on every call and reads only its own shape); OpenAI's on every
    path Anthropic's API has no version of, whatever the headers (t197: feedback's were Anthropic's)."""
    path = request.url.path
    if (
        in_messages_api(path)
        or (exc.status_code == 404 and names_messages(path))  # an Anthropic SDK's base URL ending in /v1
        or ("anthropic-version" in request.headers and _in_models_api(path))
    ):
        body = anthropic_messages.encode_error(exc.status_code, exc.message)
        return Response(body, status_code=exc.status_code, headers=exc.headers, media_type="application/json")
    return error_response(exc)


def _in_models_api(path: str) -> bool:
    """Whether ``path`` is ``/v1/models`` or a model under it, which Anthropic's API has too."""
    path = canonical_path(path)
    return path == "/v1/models" or path.startswith("/v1/models/")
