"""The typed shape of policies.yaml.

Structs are frozen: a loaded policy is never mutated, a reload builds a new one and
swaps it in whole, so a request always sees one consistent version.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ProviderKind = Literal["openai", "anthropic"]
Tier = Literal["small", "large"]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Frozen, strict: an unknown key in policies.yaml is an error, not silently ignored."""


class Price(_Struct, frozen=True, kw_only=True):
    """USD per million tokens."""

    input_per_mtok: float = msgspec.field(name="input")
    output_per_mtok: float = msgspec.field(name="output")

    def __post_init__(self) -> None:
        if self.input_per_mtok < 0 or self.output_per_mtok < 0:
            raise ValueError("prices must be >= 0")


class Timeouts(_Struct, frozen=True, kw_only=True):
    """Seconds. ``first_byte`` bounds the wait for response headers; ``total`` bounds the whole
    answer, streamed or not, whatever bytes arrive; ``idle`` bounds the gap between two stream
    events (SSE comments and partial lines do not count as events)."""

    connect: float = 5.0
    first_byte: float = 60.0
    total: float = 600.0
    idle: float = 60.0

    def __post_init__(self) -> None:
        if min(self.connect, self.first_byte, self.total, self.idle) <= 0:
            raise ValueError("timeouts must be > 0")


class SpeculationPolicy(_Struct, frozen=True, kw_only=True):
    """Speculative decoding for this (large) model, with a smaller model drafting.

    ``engine``: the model's own server drafts (vLLM's speculative config); the gateway only routes.
    ``gateway``: the gateway runs the draft/verify loop over both servers' token-level APIs.
    """

    mode: Literal["off", "engine", "gateway"] = "off"
    draft: str | None = None
    """The drafting model (a key under ``models``); required for ``gateway``."""
    draft_source: Literal["model", "prompt_lookup"] = "model"
    k_initial: int = 4
    k_min: int = 1
    k_max: int = 8
    sampling: Literal["speculative", "plain"] = "speculative"
    """With temperature > 0: speculative sampling from returned logprobs, or plain decoding on the large model."""

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_initial <= self.k_max <= 64:
            raise ValueError("need 1 <= k_min <= k_initial <= k_max <= 64")


class ModelConfig(_Struct, frozen=True, kw_only=True):
    provider: ProviderKind = "openai"
    base_url: str
    upstream_model: str | None = None
    """The model name sent upstream; defaults to the key under ``models``."""
    api_key_env: str | None = None
    """Name of the environment variable holding the key. Keys never live in the file."""
    price: Price
    encoding: str = "cl100k_base"
    context_window: int = 8192
    tier: Tier
    timeouts: Timeouts = Timeouts()
    max_connections: int = 256
    public: bool = True
    """Whether clients may call this model by name (besides through routes)."""
    simulated: bool = False
    headers: dict[str, str] = {}
    """Extra headers sent upstream (for example an API version)."""
    speculative: SpeculationPolicy = SpeculationPolicy()
    max_stream_line_bytes: int = 1 << 20
    """A streamed line (or one event's data) longer than this ends the stream with an in-band error."""

    def __post_init__(self) -> None:
        if self.max_stream_line_bytes < 1024:
            raise ValueError("max_stream_line_bytes must be >= 1024")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.context_window <= 0:
            raise ValueError("context_window must be > 0")
        if self.max_connections <= 0:
            raise ValueError("max_connections must be > 0")


class RetryPolicy(_Struct, frozen=True, kw_only=True):
    max_attempts: int = 2
    """Attempts per model, the first included, before moving to the next fallback."""
    backoff_initial_ms: float = 100.0
    backoff_max_ms: float = 2000.0
    max_retry_after_s: float = 10.0
    """A Retry-After longer than this is not waited for: the next fallback is tried instead."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")


class CircuitBreakerPolicy(_Struct, frozen=True, kw_only=True):
    """Opens when, within ``window_s``, at least ``min_requests`` requests reached the upstream
    and at least ``failure_rate`` of them failed (connection errors, timeouts, 5xx; one verdict per request)."""

    failure_rate: float = 0.5
    min_requests: int = 10
    window_s: int = 10
    reset_after_s: float = 15.0
    """How long an open circuit skips the upstream before one probe is let through."""

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.min_requests < 1 or self.window_s < 1 or self.reset_after_s <= 0:
            raise ValueError("min_requests and window_s must be >= 1, reset_after_s > 0")


class RouteConfig(_Struct, frozen=True, kw_only=True):
    """A name clients call. ``strategy: classifier`` picks between the pair per prompt."""

    strategy: Literal["fixed", "classifier"] = "fixed"
    model: str | None = None
    """``fixed``: the model that answers. ``classifier``: used until the router is loaded."""
    fallbacks: list[str] = []
    baseline: str | None = None
    """The model whose cost the request is compared with (``baseline_cost_usd``); default: the pair's large model."""
    threshold: float = 0.5
    retry: RetryPolicy | None = None


class Pair(_Struct, frozen=True, kw_only=True):
    small: str
    large: str


class Limits(_Struct, frozen=True, kw_only=True):
    """Per key or per tenant; a missing value means no limit."""

    rpm: int | None = None
    """Requests per minute (sliding window)."""
    tpm: int | None = None
    """Tokens per minute, prompt + completion (sliding window; estimated before the call, corrected after)."""
    usd_per_day: float | None = None
    """Spend per UTC day."""
    usd_per_month: float | None = None
    """Spend per UTC calendar month."""

    def __post_init__(self) -> None:
        for value in (self.rpm, self.tpm, self.usd_per_day, self.usd_per_month):
            if value is not None and value < 0:
                raise ValueError("limits must be >= 0")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.usd_per_day, self.usd_per_month))


class AuthKey(_Struct, frozen=True, kw_only=True):
    id: str
    hash: str
    """``sha256:<hex>`` of the secret."""
    tenant: str = "default"
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    limits: Limits = Limits()
    admin: bool = False
    """May read every key's usage from ``/v1/usage``."""


class AuthPolicy(_Struct, frozen=True, kw_only=True):
    mode: Literal["none", "keys"]
    """Required, like ``auth`` itself: a missing line must never mean 'no keys'."""
    keys: list[AuthKey] = []
    key_file: str | None = None
    """More keys, in a file of their own (``keys: [...]``), relative to policies.yaml;
    ``python -m gateway keys new`` appends to it."""


class TenantPolicy(_Struct, frozen=True, kw_only=True):
    limits: Limits = Limits()
    downgrade_auto_at: float | None = None
    """When spend reaches this share of a daily or monthly budget, ``auto`` goes to the small model."""


class RequestLogPolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    path: str | None = None
    """Also append the JSON lines to this file (stdout always gets them)."""
    stdout: bool = True


class LimitsPolicy(_Struct, frozen=True, kw_only=True):
    max_body_bytes: int = 4 * 1024 * 1024
    body_read_timeout_s: float = 30.0
    """A request body not received in full within this is answered 408 and its connection closed."""
    long_prompt_chars: int = 32_000
    """Prompts longer than this are tokenized off the event loop."""
    on_redis_error: Literal["open", "closed"] = "open"
    """Rate limits and budgets when Redis cannot answer: serve anyway (open) or refuse with 503 (closed)."""
    default_completion_tokens: int = 512
    """The completion estimate for budgets when a request sets no max_tokens."""
    redis_timeout_ms: float = 100.0


class ExactCachePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    ttl_s: int = 3600
    max_temperature: float | None = None
    """Skip the exact cache above this temperature (None: cache at any temperature)."""


class SemanticCachePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    ttl_s: int = 3600
    threshold: float = 0.95
    """Cosine similarity at or above which a stored prompt counts as the same question
    (0.95 with the guard: 81 % hits on harmless rewrites, 0.6 % false hits; docs/semantic-cache.md)."""
    guard: bool = True
    """Refuse a hit when the prompts differ in numbers, quoted strings, code or names."""
    max_entries: int = 10_000
    """Per vector set (tenant, route, system prompt, parameters); the oldest entries go first."""
    max_temperature: float = 0.5
    multi_turn: bool = False
    tools: bool = False


class CoalescePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    wait_s: float = 30.0
    """How long identical requests wait for the first one's answer before calling upstream themselves."""


class CachePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    exact: ExactCachePolicy = ExactCachePolicy()
    semantic: SemanticCachePolicy = SemanticCachePolicy()
    coalesce: CoalescePolicy = CoalescePolicy()
    redis_timeout_ms: float = 50.0
    """A cache operation slower than this is abandoned: the request goes on without the cache."""


class Policy(_Struct, frozen=True, kw_only=True):
    version: int = 1
    pair: Pair
    models: dict[str, ModelConfig]
    routes: dict[str, RouteConfig]
    retry: RetryPolicy = RetryPolicy()
    circuit_breaker: CircuitBreakerPolicy = CircuitBreakerPolicy()
    auth: AuthPolicy
    """Required: a file cut short (a save or ``kubectl cp`` caught half-way) must not switch keys off."""
    request_log: RequestLogPolicy = RequestLogPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    cache: CachePolicy = CachePolicy()
    tenants: dict[str, TenantPolicy] = {}
