"""One exception hierarchy for everything a client can be told.

Every error the gateway returns is a :class:`GatewayError`; it knows its HTTP
status and renders itself as OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), so handlers never build
OpenAI error JSON by hand. An Anthropic client gets the same error in Anthropic's shape,
which the Anthropic codec writes (``anthropic_messages.encode_error``).

The tree (each line a subclass of the one it is indented under)::

    GatewayError                    500 server_error: everything a client is told
        InvalidRequestError         400
        AuthenticationError         401
        PermissionDeniedError       403
        ModelNotFoundError          404
        NotFoundError               404 a request id the caller cannot see (feedback)
            ResponseNotFoundError   404 a stored response (``code`` null, as OpenAI's)
        ConflictError               409
        RequestTimeoutError         408 the client's body came too slowly
        ClientStalled               408 the client stopped reading a stream
        PayloadTooLargeError        413
        UnsupportedMediaTypeError   415
        RateLimitError              429
        BudgetExceededError         429 insufficient_quota
        ServiceUnavailableError     503 a dependency the request needs is down
            LimiterUnavailableError, UsageUnavailableError, FeedbackUnavailableError,
            ResponseStoreUnavailableError, ShuttingDownError
        UpstreamError               502 an upstream gave no answer (``retryable``, ``try_next``)
            UpstreamStatusError     its HTTP error status (a 4xx of the client's own passes through)
            UpstreamConnectError
            UpstreamTimeoutError    504
                UpstreamBusyError   504 the gateway's own connection pool is full
                UpstreamTotalTimeoutError  504 the model's ``timeouts.total`` ran out (``try_next``)
            UpstreamProtocolError   an answer that is not the API it claims
            UpstreamUnavailableError  its circuit is open: not called

    ConfigError (an Exception, never told to a client): policies.yaml is invalid
        PairMismatchError (gateway.speculative.errors)

Errors that never reach a client stay beside the code that raises them (the store's
``StoreUnavailable``, artifact and classifier errors).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "ClientStalled",
    "ConfigError",
    "ConflictError",
    "ContextOverflow",
    "FeedbackUnavailableError",
    "GatewayError",
    "InvalidRequestError",
    "LimiterUnavailableError",
    "ModelNotFoundError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ResponseNotFoundError",
    "ResponseStoreUnavailableError",
    "ServiceUnavailableError",
    "ShuttingDownError",
    "ThreadNotFoundError",
    "ThreadStoreUnavailableError",
    "UnsupportedMediaTypeError",
    "UpstreamBusyError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "UpstreamTotalTimeoutError",
    "UpstreamUnavailableError",
    "UsageUnavailableError",
    "context_overflow",
    "upstream_error_fields",
]


class GatewayError(Exception):
    """An error that is answered to the client with an OpenAI-style body."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_body(self) -> bytes:
        return msgspec.json.encode(
            {
                "error": {
                    "message": self.message,
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class ModelNotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(GatewayError):
    """A resource the caller named (a request id, a stored response) that it cannot see."""

    status_code = 404
    error_type = "invalid_request_error"
    code: str | None = "not_found"


class ResponseNotFoundError(NotFoundError):
    """A stored response (``/v1/responses/{id}``) the caller cannot see, told as OpenAI tells it:
    with no ``code``."""

    code = None


class ThreadNotFoundError(NotFoundError):
    """An Anthropic thread ``continue`` naming a message the gateway did not answer for the tenant."""

    code = "thread_not_found"


class ConflictError(GatewayError):
    """The request was valid but the gateway's state refuses it (e.g. a route that no longer learns)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["x-should-retry"] = "false"  # the SDKs retry a 409 (a lock's); this one stays


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaTypeError(GatewayError):
    """A body in an encoding the gateway does not read (``Content-Encoding``)."""

    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_content_encoding"


class RequestTimeoutError(GatewayError):
    """The client did not finish sending its request body in time."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class ClientStalled(GatewayError):
    """The client took nothing for too long while it held the upstream: the upstream was let go
    (:class:`gateway.client_pace.ClientPace`)."""

    status_code = 408
    error_type = "timeout_error"
    code = "client_stalled"


class RateLimitError(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:
            self.headers.setdefault("retry-after", _whole_seconds(retry_after_s))


class BudgetExceededError(GatewayError):
    """429 as OpenAI answers an exhausted quota (type and code ``insufficient_quota``), which
    SDKs already handle; ``x-should-retry: false``, for the SDKs would otherwise wait out its
    ``retry-after`` (the next day or month: the Anthropic SDK blocks for hours)."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["x-should-retry"] = "false"


class ServiceUnavailableError(GatewayError):
    """A dependency the request needs cannot answer (the policy says not to go on without it)."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class LimiterUnavailableError(ServiceUnavailableError):
    code = "limiter_unavailable"


class UsageUnavailableError(ServiceUnavailableError):
    code = "usage_unavailable"


class FeedbackUnavailableError(ServiceUnavailableError):
    code = "feedback_unavailable"


class ResponseStoreUnavailableError(ServiceUnavailableError):
    """The store that keeps Responses API turns cannot answer."""

    code = "response_store_unavailable"


class ThreadStoreUnavailableError(ServiceUnavailableError):
    code = "thread_store_unavailable"


class ShuttingDownError(ServiceUnavailableError):
    """The worker is stopping and its drain deadline passed before the answer ended."""

    code = "shutting_down"


class UpstreamError(GatewayError):
    """An upstream could not give an answer. ``retryable`` drives retries and fallbacks;
    ``try_next``: not worth retrying there, but the route's next model may answer."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"
    retryable = True
    try_next = False
    speculation: dict[str, Any] | None = None
    """The speculative loop's work before the failure (its log fields): rounds ran and were paid for."""
    retry_after_s: float | None = None
    """How long the upstream asked to be left alone (its ``Retry-After``); None: it did not say."""

    def __init__(self, upstream: str, message: str, **kwargs: Any) -> None:
        super().__init__(f"upstream '{upstream}': {message}", **kwargs)
        self.upstream = upstream


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error status.

    429 and 5xx are retryable. A 401 or 403, a 404 for the model, or OpenAI's 429
    ``insufficient_quota`` or ``billing_not_active`` (the operator's quota or billing is spent or
    stopped: no wait refills it), is the gateway's own configuration (the client's key never goes
    upstream): a 502 that names no detail of the upstream's (its text can quote the operator's key),
    and the next model is tried. A prompt too long for the model's context window is a 400
    ``context_length_exceeded``, and the next model (perhaps with a longer window) is tried. Other
    4xx are the client's fault, so they are passed through with the upstream's own status and
    message and never retried. Those the gateway does not retry say ``x-should-retry: false``: the
    SDKs would only repeat them (t148).
    """

    def __init__(
        self,
        upstream: str,
        status: int,
        detail: str,
        *,
        retry_after_s: float | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(upstream, f"HTTP {status}: {detail}")
        self.upstream_status = status
        self.retry_after_s = retry_after_s
        self.upstream_body = body
        self.retryable = status == 429 or status >= 500 or status == 408
        error = upstream_error_fields(body) if 400 <= status < 500 else {}
        # The upstream's own words are its operator's (an organisation id and its limits, a proxy's
        # page naming hosts and versions, a traceback): the client is told the status, and the
        # upstream's message only where it blames the request the client sent.
        self.message = f"upstream '{upstream}': HTTP {status}: " + _STATUS_WORDS.get(status, "the upstream failed")
        if status == 429 and _out_of_quota(error):
            self._misconfigured(
                "the upstream says the gateway's account is out of quota or not active (its plan or billing); "
                "the gateway's operator can fix this"
            )
        elif status == 429:
            self.status_code = 429
            self.error_type = "rate_limit_error"
            self.code = "upstream_rate_limited"
            if retry_after_s is not None:
                self.headers["retry-after"] = _whole_seconds(retry_after_s)
        elif status in (401, 403) or (status == 404 and _names_the_model(error)):
            self._misconfigured(
                "the upstream refused the gateway's own request (its API key or model name in the "
                "gateway's policy); the gateway's operator can fix this"
            )
        elif 300 <= status < 400:  # a base_url that moved (http to https, a path without /v1)
            self._misconfigured(
                f"{detail}; the gateway does not follow redirects (a request's body and key would "
                "follow): the gateway's operator can fix its base_url"
            )
        elif status == 529:  # Anthropic's "overloaded": its clients have an error class for it
            self.code = "upstream_overloaded"
            self.status_code = 529
            if retry_after_s is not None:  # as a 503's (t181)
                self.headers["retry-after"] = _whole_seconds(retry_after_s)
        elif status in (400, 413) and _exceeds_context(error):
            # Too long for this model; a later model of the route may have a longer window.
            self.status_code = 400
            self.error_type = "invalid_request_error"
            self.code = "context_length_exceeded"  # OpenAI's code, which client libraries look for
            self.param = _context_param(error)
            self.retryable, self.try_next = False, True
            self.message = f"upstream '{upstream}': HTTP {status}: {_its_words(error)}"
        elif status in (400, 413) and _about_the_account(error):  # a 422 is a validation error: the request's
            self._misconfigured("the upstream refused the gateway's account (its billing or verification)")
        elif status in _THE_REQUESTS_FAULT:
            self.status_code = status
            self.error_type = "invalid_request_error"
            code = error.get("code")
            self.code = code if code in _CODES_CLIENTS_ACT_ON else "upstream_rejected_request"
            param = error.get("param")
            self.param = param if isinstance(param, str) else None  # the client's parameter the upstream named
            self.message = f"upstream '{upstream}': HTTP {status}: {_its_words(error)}"
        elif 400 <= status < 500 and status != 408:  # 402, 405, 409, ...: the operator's account or setup
            self._misconfigured("the upstream refused the gateway's request; the gateway's operator can look into it")
        elif status == 503:  # HTTP's "unavailable": overloaded (OpenAI's word for it), not broken (f222)
            self.status_code = 503
            if retry_after_s is not None:  # "come back then" (t174)
                self.headers["retry-after"] = _whole_seconds(retry_after_s)
        else:
            self.status_code = 502
        if not self.retryable:
            self.headers["x-should-retry"] = "false"

    def _misconfigured(self, why: str) -> None:
        """The gateway's own configuration (a 502 that names no upstream text: it can quote the
        operator's key); the route's next model is tried."""
        self.status_code = 502
        self.code = "upstream_misconfigured"
        self.retryable, self.try_next = False, True
        self.message = f"upstream '{self.upstream}': HTTP {self.upstream_status}: {why}"


_ACCOUNT_PHRASES = (
    "credit balance is too low",  # Anthropic: "Your credit balance is too low to access the Anthropic API."
    "organization must be verified",  # OpenAI: "Your organization must be verified to stream this model."
    "account is not active",  # OpenAI: "Your account is not active, please check your billing details ..."
    "exceeded your current quota",  # OpenAI's insufficient_quota, from a server that sends it as a 400
    "insufficient credits",  # OpenRouter's and others' 402, from a server that sends it as a 400
)
"""A 400 that blames the operator's account, not the request: the route's next model may answer.
Whole phrases of the providers' messages, never a word a client's name can hold (a tool
``billing_lookup``, a field ``payment_method``: t181)."""

_ACCOUNT_CODES = frozenset({"insufficient_quota", "billing_not_active"})
"""OpenAI's 429s for the account: its quota or billing spent, or its billing not active."""


def _out_of_quota(error: dict[str, Any]) -> bool:
    """OpenAI's 429 for an account whose quota is spent or whose billing is not active, told by its
    ``code`` or ``type`` (t174): a message can quote the client's text."""
    return error.get("code") in _ACCOUNT_CODES or error.get("type") in _ACCOUNT_CODES


_QUOTED = re.compile(r"""(?<!\w)'(?:\\.?|[^\\])*?(?:'(?!\w)|\Z)|"(?:\\.?|[^\\])*?(?:"|\Z)|`[^`]*(?:`|\Z)""", re.DOTALL)
"""Text an error quotes, to its closing quote or the end: '...' (not an apostrophe within a word),
"..." and `...`, with their backslash escapes (Python's repr of vLLM's validation errors)."""


def _about_the_account(error: dict[str, Any]) -> bool:
    """Read from the upstream's own words, not what it quotes: a 400 can quote what the client
    sent (vLLM's validation errors quote the value refused), and taking the client's "billing"
    for the account's tries the next model and counts against the model's circuit (t174)."""
    message = error.get("message")
    if not isinstance(message, str) or error.get("type") == _VALIDATION:
        return False
    own = _QUOTED.sub(" ", message[:1000]).lower()  # an account's words are few; a quote cut off here ends here
    return any(phrase in own for phrase in _ACCOUNT_PHRASES)


def _its_words(error: dict[str, Any]) -> str:
    """The message of an API's error object (a proxy's page is not the client's to read)."""
    said = error.get("message")
    return said[:500] if isinstance(said, str) else "the upstream refused the request"


_CODES_CLIENTS_ACT_ON = frozenset({"previous_response_not_found", "invalid_encrypted_content"})
"""OpenAI's codes for a request's fault that clients recover from by their code (t60: Codex and the
proxies in front of it drop a ``previous_response_id`` OpenAI no longer has, or the reasoning items
another organisation encrypted, and send the whole conversation again): kept as the upstream wrote
them. Others read ``upstream_rejected_request`` (one code for the metrics' labels and the log)."""
_THE_REQUESTS_FAULT = frozenset({400, 413, 422})
"""Upstream statuses that blame the request the client sent: told with the upstream's own words."""
_STATUS_WORDS = {
    408: "the upstream timed out reading the request",
    429: "the upstream is limiting the gateway's requests",
    503: "the upstream is unavailable",
    504: "the upstream timed out",
    529: "the upstream is overloaded",
}


def upstream_error_fields(body: bytes | None) -> dict[str, Any]:
    """The error object of an upstream's error body: ``{"error": {...}}`` as OpenAI, Anthropic and
    vLLM from 0.10.2 write it, or vLLM's earlier flat ``{"object": "error", "message": ...}``, or
    FastAPI's ``{"detail": ...}`` (its message alone); {} when the body has none."""
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    error = data.get("error")
    if isinstance(error, dict):
        return error
    if data.get("object") == "error":
        return data
    detail = data.get("detail")
    if isinstance(detail, str):
        return {"message": detail}
    said = _detail_text(detail)
    return {"message": said, "type": _VALIDATION} if said else {}


_VALIDATION = "validation_error"
"""The ``type`` of FastAPI's ``detail`` list, pydantic's errors: the request's by definition, and
what they say names the client's fields (``loc``) and values (t181)."""


def _detail_text(detail: Any) -> str | None:
    """FastAPI's ``detail`` list, pydantic's errors, each ``loc: msg`` (t143: a 422 in that shape
    reached the client without the upstream's words)."""
    if not isinstance(detail, list):
        return None
    said = []
    for problem in detail:
        if isinstance(problem, dict) and isinstance(problem.get("msg"), str):
            loc = problem.get("loc")
            where = ".".join(str(part) for part in loc) + ": " if isinstance(loc, list) and loc else ""
            said.append(where + problem["msg"])
    return "; ".join(said) or None


def _names_the_model(error: dict[str, Any]) -> bool:
    """A 404 that says the model does not exist (OpenAI's ``model_not_found``, vLLM's "The model
    `x` does not exist"), not one for a resource the client named."""
    message = error.get("message")
    return (
        error.get("code") == "model_not_found"
        or error.get("param") == "model"
        or (isinstance(message, str) and message.lower().startswith("the model"))
    )


_CONTEXT_PHRASES = (
    "maximum context length",  # vLLM, OpenAI
    "prompt is too long",  # Anthropic
    "exceed context limit",  # Anthropic: input and max_tokens together
    "context size",  # llama.cpp
)


def _exceeds_context(error: dict[str, Any]) -> bool:
    """The prompt (with the completion asked for) does not fit this model's context window."""
    message = error.get("message")
    return error.get("code") == "context_length_exceeded" or (
        isinstance(message, str) and any(phrase in message.lower() for phrase in _CONTEXT_PHRASES)
    )


class ContextOverflow(NamedTuple):
    """The sizes an upstream's context-overflow error says (t59): its window, the prompt's tokens,
    and the completion's asked for where it says it; None where it does not."""

    window: int | None
    prompt: int | None
    completion: int | None = None

    @property
    def prompt_fits(self) -> bool:
        """The prompt alone fits the window: only the completion asked for does not."""
        return self.window is not None and self.prompt is not None and self.prompt < self.window


_OVERFLOW_WORDS: tuple[tuple[re.Pattern[str], tuple[str, str, str | None]], ...] = (
    # OpenAI, vLLM before 0.10: "maximum context length is W tokens. However, you requested N tokens
    # (P in the messages, C in the completion)"
    (re.compile(r"maximum context length is (?P<w>\d+) tokens.*?\((?P<p>\d+) in the messages, (?P<c>\d+) in the completion"), ("w", "p", "c")),
    # vLLM: "... maximum context length is W tokens and your request has P input tokens (C > W - P)"
    (re.compile(r"maximum context length is (?P<w>\d+) tokens and your request has (?P<p>\d+) input tokens(?: \((?P<c>\d+) >)?"), ("w", "p", "c")),
    # vLLM 0.11+: "... maximum context length of W tokens. You requested a total of N tokens: P tokens
    # from the input messages and C tokens for the completion"
    (re.compile(r"maximum context length of (?P<w>\d+) tokens.*?(?P<p>\d+) tokens from the input messages(?: and (?P<c>\d+) tokens for the completion)?"), ("w", "p", "c")),
    # vLLM 0.10.2+: "maximum context length is W tokens. However, your request has P input tokens." (t170)
    (re.compile(r"maximum context length is (?P<w>\d+) tokens\. However, your request has (?P<p>\d+) input tokens"), ("w", "p", None)),
    # vLLM before 0.10, prompt alone: "maximum context length is W tokens. However, you requested P tokens in the messages"
    (re.compile(r"maximum context length is (?P<w>\d+) tokens.*?you requested (?P<p>\d+) tokens in the messages"), ("w", "p", None)),
    # vLLM V1 engine: "Input length (P) exceeds model's maximum context length (W)."
    (re.compile(r"Input length \((?P<p>\d+)\) exceeds model's maximum context length \((?P<w>\d+)\)"), ("w", "p", None)),
    # OpenAI, prompt alone: "maximum context length is W tokens. However, your messages resulted in P tokens"
    (re.compile(r"maximum context length is (?P<w>\d+) tokens.*?resulted in (?P<p>\d+) tokens"), ("w", "p", None)),
    # Anthropic: "prompt is too long: P tokens > W maximum"
    (re.compile(r"prompt is too long: (?P<p>\d+) tokens > (?P<w>\d+) maximum"), ("w", "p", None)),
    # Anthropic: "input length and `max_tokens` exceed context limit: P + C > W"
    (re.compile(r"exceed context limit: (?P<p>\d+) \+ (?P<c>\d+) > (?P<w>\d+)"), ("w", "p", "c")),
    # llama.cpp: "request (P tokens) exceeds the available context size (W tokens)"
    (re.compile(r"request \((?P<p>\d+) tokens\) exceeds the available context size \((?P<w>\d+) tokens"), ("w", "p", None)),
    # the window alone (OpenAI's shortest wording)
    (re.compile(r"maximum context length is (?P<w>\d+) tokens"), ("w", "", None)),
)  # fmt: skip


def context_overflow(message: str) -> ContextOverflow:
    """The sizes in an upstream's words for a prompt that does not fit its window (OpenAI's,
    vLLM's, Anthropic's, llama.cpp's wordings); unknown ones None."""
    for pattern, (window, prompt, completion) in _OVERFLOW_WORDS:
        found = pattern.search(message)
        if found is not None:
            return ContextOverflow(
                int(found[window]),
                int(found[prompt]) if prompt else None,
                int(found[completion]) if completion and found[completion] else None,
            )
    return ContextOverflow(None, None)


def _context_param(error: dict[str, Any]) -> str:
    """``max_tokens`` when the prompt alone fits the window and the completion asked for does not
    (the server's words say both sizes), else ``messages``."""
    message = error.get("message")
    fits = isinstance(message, str) and context_overflow(message).prompt_fits
    return "max_tokens" if fits else "messages"


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    error_type = "timeout_error"
    code = "upstream_timeout"


class UpstreamBusyError(UpstreamTimeoutError):
    """No free connection to the upstream in this process within the connect timeout: the
    gateway's own pool is full (all tenants' requests share it), which says nothing about
    the upstream's health, so no tenant's circuit is charged for it."""

    code = "upstream_busy"


class UpstreamTotalTimeoutError(UpstreamTimeoutError):
    """The model's ``timeouts.total`` ran out. It bounds all of a request's attempts at the model
    together, so nothing is left for a retry there; the route's next model has a total of its own
    (t95: each attempt had its own, and a body that stalled took ``max_attempts`` times it)."""

    code = "upstream_total_timeout"
    try_next = True

    def __init__(self, upstream: str, total_s: float, what: str = "no complete answer") -> None:
        super().__init__(upstream, f"{what} within its total timeout of {total_s:g}s (retries included)")


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not the API it claims to speak."""

    code = "upstream_bad_response"
    upstream_status: int | None = None
    """The HTTP status that answer came with, where it had one (see :func:`~gateway.upstreams.base.answered`)."""


class UpstreamGaveUpError(UpstreamError):
    """The upstream answered, and said it gave the generation up part-way (vLLM's finish reason
    ``abort``): what a Messages or Responses client is told, whose APIs have no word for it (t121)."""

    upstream_status: int | None = 200


class UpstreamUnavailableError(UpstreamError):
    """Skipped without a call: the upstream's circuit breaker is open."""

    code = "upstream_unavailable"


class ConfigError(Exception):
    """policies.yaml is invalid. ``problems`` are human-readable lines naming field and line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _whole_seconds(seconds: float) -> str:
    """A Retry-After in whole seconds, rounded up: a client that waits 2 s for a limit that resets in
    2.5 s is limited again (t53). At least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))
