"""The typed shape of policies.yaml.

Structs are frozen: a loaded policy is never mutated, a reload builds a new one and
swaps it in whole, so a request always sees one consistent version.

What one field can be checked on its own (a range, a pattern) is said here, as msgspec
constraints; what needs several fields or sections (a route naming a model that exists)
is in :mod:`gateway.config.validate`. Building a struct by hand checks neither: the
loader is the one way a policy is read.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

ProviderKind = Literal["openai", "anthropic"]
Tier = Literal["small", "large"]

AtLeastZero = Annotated[float, Meta(ge=0)]
AboveZero = Annotated[float, Meta(gt=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]
AtLeastZeroInt = Annotated[int, Meta(ge=0)]
Share = Annotated[float, Meta(gt=0, le=1, description="a share in (0, 1]")]
Probability = Annotated[float, Meta(ge=0, le=1, description="a number from 0 to 1")]
HttpUrl = Annotated[
    str,
    Meta(
        pattern=r"^https?://[^\s/?#]+(?:[/?#]\S*)?\Z", description="a URL starting with http:// or https://, no spaces"
    ),
]
"""A space in the host passed as a URL and every request then failed over to the next model (t56)."""
KeyHash = Annotated[
    str, Meta(pattern=r"^sha256:[0-9a-f]{64}\Z", description="`sha256:` followed by 64 lowercase hex digits")
]
SpeculationK = Annotated[int, Meta(ge=1, le=64)]
KeyId = Annotated[
    str, Meta(pattern=r"^[^\s\x00-\x1f\x7f]{1,128}\Z", description="1-128 characters, no spaces or control characters")
]
TenantName = Annotated[
    str,
    Meta(
        pattern=r"^[^\s\x00-\x1f\x7f]([^\x00-\x1f\x7f]{0,126}[^\s\x00-\x1f\x7f])?\Z",
        description="1-128 characters, no control characters, no space at either end",
    ),
]


ModelName = Annotated[
    str,
    Meta(
        pattern=r"^[^\s/\x00-\x1f\x7f]([^\s\x00-\x1f\x7f]{0,254}[^\s/\x00-\x1f\x7f])?\Z",
        description="1-256 characters, no spaces or control characters, no `/` at either end",
    ),
]
"""A model's or route's name, which clients send and ``GET /v1/models/{id}`` must give back
as it is (a path drops a trailing slash)."""


EnvVarName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*\Z",
        description="the name of an environment variable (letters, digits and `_`), not the key itself",
        extra={"secret": True},
    ),
]
"""Where a key is read from; a value that is not a name may be the key pasted in, and is never shown."""


OptionValue = Annotated[
    str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}\Z", description="a lowercase name, as Anthropic writes it")
]
Multiplier = Annotated[float, Meta(gt=0, le=100, description="a multiplier in (0, 100]")]
MAX_PRICE = 1_000_000
"""The most a price may be, in USD per million tokens or per 1,000 uses of a server tool: over a
thousand times the dearest model's. A larger one is a slip (a unit, a paste), and 1e308 overflowed
each request's cost to inf, which Redis then kept as the key's spend for the month (t94)."""
TokenPrice = Annotated[
    float, Meta(ge=0, le=MAX_PRICE, description=f"a price in USD per million tokens, from 0 to {MAX_PRICE:,}")
]
UsesPrice = Annotated[
    float, Meta(ge=0, le=MAX_PRICE, description=f"a fee in USD per 1,000 uses, from 0 to {MAX_PRICE:,}")
]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Frozen, strict: an unknown key in policies.yaml is an error, not silently ignored."""


class Price(_Struct, frozen=True, kw_only=True):
    """USD per million tokens."""

    input_per_mtok: TokenPrice = msgspec.field(name="input")
    output_per_mtok: TokenPrice = msgspec.field(name="output")
    cached_input_per_mtok: TokenPrice | None = msgspec.field(name="cached_input", default=None)
    """Prompt tokens read from the upstream's prompt cache (OpenAI ``cached_tokens``, Anthropic
    ``cache_read_input_tokens``); unset: the input price."""
    cache_write_per_mtok: TokenPrice | None = msgspec.field(name="cache_write", default=None)
    """Prompt tokens written to the upstream's prompt cache (Anthropic ``cache_creation_input_tokens``);
    unset: the input price."""
    cache_write_1h_per_mtok: TokenPrice | None = msgspec.field(name="cache_write_1h", default=None)
    """Of those, the ones kept an hour (Anthropic's ``ttl: "1h"``: 2x input where 5 minutes is 1.25x);
    unset: the ``cache_write`` price."""
    reasoning_per_mtok: TokenPrice | None = msgspec.field(name="reasoning", default=None)
    """Completion tokens spent reasoning (``reasoning_tokens``); unset: the output price."""
    audio_input_per_mtok: TokenPrice | None = msgspec.field(name="audio_input", default=None)
    """Prompt tokens of audio (OpenAI's ``prompt_tokens_details.audio_tokens``); unset: a chat
    request with an ``input_audio`` part is refused, as it would be billed at the text price (t150)."""
    audio_output_per_mtok: TokenPrice | None = msgspec.field(name="audio_output", default=None)
    """Completion tokens of audio (``completion_tokens_details.audio_tokens``); unset: a chat
    request asking for audio (``modalities``, ``audio``) is refused (t150)."""
    speed_multipliers: dict[OptionValue, Multiplier] = msgspec.field(name="speed", default={})
    """Anthropic's ``speed``: every token price times this for an answer whose usage says it ran at
    that speed (``fast: 6`` for Opus 4.6's fast mode); ``standard`` is 1. A request asking for a
    speed not set here is refused: it would be billed at the base price (t59)."""
    inference_geo_multipliers: dict[OptionValue, Multiplier] = msgspec.field(name="inference_geo", default={})
    """Anthropic's ``inference_geo``: every token price times this for an answer whose usage says it
    ran there (``us: 1.1``); ``global`` is 1. Applied on top of the speed's, as Anthropic does (t59)."""
    service_tier_multipliers: dict[OptionValue, Multiplier] = msgspec.field(name="service_tier", default={})
    """OpenAI's ``service_tier``: every token price times this for an answer the upstream says it
    processed on that tier (``priority: 2``, ``flex: 0.5``; ``default``, ``auto`` and Anthropic's
    ``standard``/``standard_only`` are 1). A tier it reports that is not set here is billed at the
    base price and logged as ``unpriced_usage``."""
    server_tools_per_1k: dict[OptionValue, UsesPrice] = msgspec.field(name="server_tools", default={})
    """USD per 1,000 uses of an upstream-run tool, by the name its usage counts them under
    (``server_tool_use.web_search_requests``: ``web_search: 10``; ``web_fetch: 0`` says it is free).
    A request offering a server tool not set here is refused (t59). A chat request's
    ``web_search_options`` is one ``web_search``, as OpenAI's search models bill it (t150)."""


class Timeouts(_Struct, frozen=True, kw_only=True):
    """Seconds. ``first_byte`` bounds the wait for response headers; ``total`` bounds the whole
    answer, streamed or not, whatever bytes arrive, and all of a request's attempts at the model
    together (a retry gets what is left of it; the route's next model has its own); ``idle`` bounds the gap between two stream
    events (SSE comments and partial lines do not count as events). ``past_stop`` bounds how long
    a stream cut at a stop string the gateway applies is read on past its client's answer, for
    the usage (t65: each held a connection and its key's generation for up to ``total``)."""

    connect: AboveZero = 5.0
    first_byte: AboveZero = 60.0
    total: AboveZero = 600.0
    idle: AboveZero = 60.0
    past_stop: AboveZero = 60.0


class SpeculationPolicy(_Struct, frozen=True, kw_only=True):
    """Speculative decoding for this (large) model, with a smaller model drafting.

    ``engine``: the model's own server drafts (vLLM's speculative config); the gateway only routes.
    ``gateway``: the gateway runs the draft/verify loop over both servers' token-level APIs.
    """

    mode: Literal["off", "engine", "gateway"] = "off"
    draft: str | None = None
    """The drafting model (a key under ``models``); required for ``gateway``."""
    draft_source: Literal["model", "prompt_lookup"] = "model"
    k_initial: SpeculationK = 4
    k_min: SpeculationK = 1
    k_max: SpeculationK = 8
    """``k_min <= k_initial <= k_max``, all from 1 to 64."""
    sampling: Literal["speculative", "plain"] = "speculative"
    """With temperature > 0: speculative sampling from returned logprobs, or plain decoding on the large model."""
    top_logprobs: Annotated[int, Meta(ge=1, le=1000)] = 20
    """Logprobs asked per position for speculative sampling: as many as the server allows
    (vLLM's ``--max-logprobs``, 20 by default)."""
    max_uncovered_mass: Probability = 0.02
    """Speculative sampling sees only the top ``top_logprobs`` of each distribution: when the
    large model's leave more probability than this uncovered at a drafted position, the rest
    of the answer is decoded plainly (its distribution would not be the large model's)."""
    draft_timeout_ms: Annotated[int, Meta(ge=10, le=60_000)] = 1000
    """Each draft call's own deadline: a slow or hung draft server costs a request this much
    (the answer then finishes on the large model), not the draft model's first-byte timeout.
    Each of the pair check's calls, to either server, has it too (t105)."""
    server_defaults: dict[
        Literal[
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"
        ],
        float,
    ] = {}
    """The large server's own defaults for sampling fields a request leaves unset (vLLM's
    ``--generation-config auto`` takes them from the model's generation_config.json, e.g.
    Qwen2.5: temperature 0.7, top_p 0.8, repetition_penalty 1.05). The loop decides with
    them as the server would decode: a request that then needs a penalty or top-p goes
    plain, and an unset temperature is the server's, not 1.0. Declare them, or start vLLM
    with ``--generation-config vllm`` and leave this empty."""
    max_inflight: Annotated[int, Meta(ge=1)] | None = None
    """Speculate only while at most this many requests to this model are in flight through
    this gateway process, this one included (speculation pays when the large model's batch
    has room; under load its extra verify tokens cost more than they save). None: always."""
    draft_cooldown_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    """After a draft call or the pair check fails or times out, or drafting is measured too slow to pay (t49),
    requests skip speculation (plain decoding on the large model, no draft call) for this long;
    then speculation is tried again."""
    min_speedup: Annotated[float, Meta(ge=0, le=1)] = 0.5
    """Drafting is given up for the answer (and paused for ``draft_cooldown_s``) when, after a few
    rounds, it is expected to give less than this share of the tokens per second of the large
    model alone (t49: a draft server slow but inside its deadline). Below 1 because the estimate
    is rough at break-even; 0: never."""
    reasoning_parser: bool = False
    """The large server splits the model's reasoning from its answer (vLLM's ``--reasoning-parser``,
    as for Qwen3 or DeepSeek-R1): the loop writes the tokens as text and cannot, so requests go
    plain, except those that turn thinking off (``chat_template_kwargs`` ``enable_thinking`` or
    ``thinking`` false)."""
    tokenizer: str | None = None
    """The pair's ``tokenizer.json`` (from the large model's Hugging Face files; relative paths
    are read from the policy file's folder). With it, answers are detokenized as vLLM's chat
    endpoint does (incrementally, special tokens skipped). Without it the text comes from
    the large server's ``/detokenize``, and the pair speculates only if that endpoint leaves
    text as the tokens spell it (tokenizers with ``clean_up_tokenization_spaces``, such as
    Llama-3.1's, need this file)."""


class ModelConfig(_Struct, frozen=True, kw_only=True):
    provider: ProviderKind = "openai"
    kind: Literal["chat", "embedding"] = "chat"
    """``embedding``: served on ``POST /v1/embeddings`` only (and chat models never there)."""
    base_url: HttpUrl
    upstream_model: str | None = None
    """The model name sent upstream; defaults to the key under ``models``."""
    api_key_env: EnvVarName | None = None
    """Name of the environment variable holding the key. Keys never live in the file."""
    price: Price
    encoding: str = "cl100k_base"
    context_window: AtLeastOne = 8192
    tier: Tier | None = None
    """Chat models: ``small`` or ``large`` (required); embedding models have none."""
    timeouts: Timeouts = Timeouts()
    max_connections: AtLeastOne = 256
    public: bool = True
    """Whether clients may call this model by name (besides through routes)."""
    simulated: bool = False
    headers: dict[str, str] = {}
    """Extra headers sent upstream (for example an API version)."""
    responses_api: bool = False
    """The upstream serves OpenAI's Responses API too (``POST {base_url}/responses``): a Responses
    request whose every possible model says so goes to it as the client sent it (OpenAI does;
    vLLM and most local servers do not)."""
    continue_final_message: bool = False
    """The upstream continues a final assistant message when asked to (vLLM's
    ``continue_final_message``): an Anthropic client's prefill is then continued, as Anthropic's
    API does. Other OpenAI-compatible servers (OpenAI's own) answer it with a new turn, which the
    gateway names ``prefill`` in ``x-gateway-dropped``."""
    tenant_cache_salt: bool = False
    """vLLM (0.9.1+, V1 engine): send a ``cache_salt`` per tenant, so one tenant cannot find
    another's prompt in the server's prefix cache (a cached prefix comes back faster and with
    ``cached_tokens``: a guess confirmed, block by block). Servers that refuse unknown fields
    (OpenAI's API) must leave it off; their caches are shared by every tenant of the key."""
    speculative: SpeculationPolicy = SpeculationPolicy()
    max_stream_line_bytes: Annotated[int, Meta(ge=1024)] = 1 << 20
    """A streamed line (or one event's data) longer than this ends the stream with an in-band error."""


class RetryPolicy(_Struct, frozen=True, kw_only=True):
    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 2
    """Attempts per model, the first included, before moving to the next fallback (at most 10: a
    circuit cannot stop retries under way, and 3,000 made one request call a failing upstream
    1,025 times, t56)."""
    backoff_initial_ms: Annotated[float, Meta(ge=0, le=60_000)] = 100.0
    backoff_max_ms: Annotated[float, Meta(ge=0, le=60_000)] = 2000.0
    max_retry_after_s: Annotated[float, Meta(ge=0, le=300)] = 10.0
    """A Retry-After longer than this is not waited for: the next fallback is tried instead (a
    client waits that long, so at most 5 minutes)."""


class CircuitBreakerPolicy(_Struct, frozen=True, kw_only=True):
    """Opens when, within ``window_s``, at least ``min_requests`` requests reached the upstream
    and at least ``failure_rate`` of them failed (connection errors, timeouts, 5xx; one verdict per request)."""

    failure_rate: Share = 0.5
    min_requests: AtLeastOne = 10
    window_s: AtLeastOne = 10
    reset_after_s: AboveZero = 15.0
    """How long an open circuit skips the upstream before one probe is let through."""


class LearningPolicy(_Struct, frozen=True, kw_only=True):
    """``routes.<name>.learning``: the router learns from this route's traffic (gateway/learning/)."""

    keep_hours: Annotated[int, Meta(ge=1, le=24 * 90)] = 72
    """How long what the router saw of a request (embedding, surface features, score; never
    the text) stays available for feedback and shadow judging."""
    max_labels: Annotated[int, Meta(ge=100, le=1_000_000)] = 50_000
    """Labelled examples kept per tenant (the newest): one list holds a tenant's labels of every
    route, bounded by the largest ``max_labels`` of the policy's routes."""
    traces_mib_per_tenant: Annotated[float, Meta(ge=0.01, le=4096)] = 16.0
    """What a tenant's traces on this route may take of the shared store (one per routed request,
    about 1.3 KB: 16 MiB holds about 13,000): past it the tenant's oldest go first (feedback on
    them is then a 404, as past ``keep_hours``), so that no tenant's traffic pushes every tenant's
    cached answers out of a full Redis, which evicts the keys nearest their expiry first (t101)."""
    shadow_share: Probability = 0.0
    """Share of this route's answered requests that are also asked of the other model of the
    pair, off the request path, and judged (a label without waiting for users)."""
    judge: str | None = None
    """The model that compares the two answers; default: the pair's large model."""
    usd_per_day: AtLeastZero = 5.0
    """Shadow answers and judgements stop for the day once they cost this much (per tenant
    and route). The operator pays: shadow spend is logged and exported, never charged to
    the tenant's budget."""
    scope: Literal["tenant", "global"] = "tenant"
    """``tenant``: a tenant's labels train only its own router. ``global``: they may also be
    pooled (``gateway router learn --global``) into the router of tenants without their own."""

    @property
    def traces_bytes_per_tenant(self) -> int:
        """:attr:`traces_mib_per_tenant` as the store counts it."""
        return int(self.traces_mib_per_tenant * 1024 * 1024)


class RouteConfig(_Struct, frozen=True, kw_only=True):
    """A name clients call. ``strategy: classifier`` picks between the pair per prompt."""

    strategy: Literal["fixed", "classifier"] = "fixed"
    model: str
    """``fixed``: the model that answers. ``classifier``: used until the router is loaded."""
    fallbacks: list[str] = []
    baseline: str | None = None
    """The model whose cost the request is compared with (``baseline_cost_usd``); default: the pair's large model."""
    threshold: Probability = 0.5
    """``classifier``: a p_large at or above this goes to the pair's large model."""
    target_large_share: Probability | None = None
    """``classifier``: instead of a fixed threshold, one that follows recent scores so that this
    share of the tenant's prompts goes to the large model (gateway/large_share.py)."""
    retry: RetryPolicy | None = None
    learning: LearningPolicy | None = None
    """``classifier``: keep what the router saw, take feedback, judge in the shadow (gateway/learning/)."""


class Pair(_Struct, frozen=True, kw_only=True):
    small: str
    large: str


class Limits(_Struct, frozen=True, kw_only=True):
    """Per key or per tenant; a missing value means no limit."""

    rpm: Annotated[int, Meta(ge=0)] | None = None
    """Requests per minute (sliding window)."""
    tpm: Annotated[int, Meta(ge=0)] | None = None
    """Tokens per minute, prompt + completion (sliding window; estimated before the call, corrected after)."""
    usd_per_day: AtLeastZero | None = None
    """Spend per UTC day."""
    usd_per_month: AtLeastZero | None = None
    """Spend per UTC calendar month."""
    max_concurrent: Annotated[int, Meta(ge=1)] | None = None
    """Requests in flight at once, in each gateway process (gateway/limits/concurrency.py)."""

    @property
    def any(self) -> bool:
        """Whether a limit kept in the store applies (``max_concurrent`` is each process's own)."""
        return any(v is not None for v in (self.rpm, self.tpm, self.usd_per_day, self.usd_per_month))


class AuthKey(_Struct, frozen=True, kw_only=True):
    id: KeyId
    hash: KeyHash
    """``sha256:<hex>`` of the secret."""
    tenant: TenantName = "default"
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    limits: Limits = Limits()
    admin: bool = False
    """May read every key's usage from ``/v1/usage``."""
    engine_fields: list[str] = []
    """vLLM's and SGLang's engine-level fields (``gateway.protocols.engine_fields``) this key's
    requests may send on, where every other key's are taken out: an application the operator
    trusts with the server every tenant shares (``priority`` for a batch job)."""


class AuthPolicy(_Struct, frozen=True, kw_only=True):
    mode: Literal["none", "keys"]
    """Required, like ``auth`` itself: a missing line must never mean 'no keys'."""
    keys: list[AuthKey] = []
    key_file: str | None = None
    """More keys, in a file of their own (``keys: [...]``), relative to policies.yaml;
    ``python -m gateway keys new`` appends to it."""


class TenantPolicy(_Struct, frozen=True, kw_only=True):
    limits: Limits = Limits()
    downgrade_auto_at: Share | None = None
    """When spend reaches this share of a daily or monthly budget, ``auto`` goes to the small model."""
    stored_responses_mib: AboveZero | None = None
    """The tenant's own cap on kept Responses turns (else ``limits.stored_responses_mib_per_tenant``)."""


class RequestLogPolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    path: str | None = None
    """Also append the JSON lines to this file (relative to policies.yaml's folder)."""
    stdout: bool = True


class LimitsPolicy(_Struct, frozen=True, kw_only=True):
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    body_read_timeout_s: AboveZero = 30.0
    """A request body not received in full within this is answered 408 and its connection closed."""
    long_prompt_chars: AtLeastOne = 32_000
    """Prompts longer than this are tokenized off the event loop."""
    on_redis_error: Literal["open", "closed"] = "open"
    """Rate limits and budgets when Redis cannot answer: serve anyway (open) or refuse with 503 (closed)."""
    default_completion_tokens: AtLeastOne = 512
    """The completion estimate for budgets when a request sets no max_tokens."""
    redis_timeout_ms: AboveZero = 100.0
    stored_responses_mib_per_tenant: AboveZero = 64.0
    """Responses turns a tenant keeps (``store``), in MiB of the shared store: past it the tenant's
    oldest go first, so no tenant can push another's out of a full Redis."""


class ExactCachePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    ttl_s: AtLeastOne = 3600
    max_temperature: AtLeastZero | None = None
    """Skip the exact cache above this temperature (None: cache at any temperature)."""


class SemanticAuditPolicy(_Struct, frozen=True, kw_only=True):
    """The semantic cache's own error measurement (gateway/cache/audit.py)."""

    sample_rate: Probability = 0.02
    """Share of semantic hits also asked upstream, after the hit was served."""
    max_per_minute: AtLeastZeroInt = 10
    """At most this many audits a minute per tenant and gateway process: they cost upstream calls,
    and one tenant's flood of hits must not spend the audits of the others."""
    max_false_hit_rate: Probability = 0.01
    """The error budget: above it (estimated), the cache tightens itself for that tenant's route."""
    min_audits: AtLeastOne = 30
    """Decided audits needed before the estimate can tighten anything."""
    tighten_step: Probability = 0.05
    """How far each tightening raises ``verify_threshold``; past 0.998 (``audit.CEILING``) semantic hits stop."""
    judge_model: str | None = None
    """A model of this policy that judges free-text answers (yes/no); without one only exact
    text, option letters and final numbers are compared and other audits stay undecided."""


class SemanticCachePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = False
    """Off: on hand-written pairs typed alike it met its error budget (≤ 1 % of one-edit near
    misses served), but on pairs typed by people with different habits it served 6 % of near
    misses (docs/semantic-cache.md, "Typing habits"). Only requests at ``temperature`` ≤
    ``max_temperature`` use it, and a request without one counts as 1.0."""
    ttl_s: AtLeastOne = 3600
    threshold: Probability = 0.65
    """Cosine similarity (router embedding) from which a stored prompt is a candidate: a
    floor for the search; whether it is served is the verifier's call."""
    verify_threshold: Probability = 0.993
    """The verifier's P(same answer) from which a candidate is served (docs/semantic-cache.md)."""
    verify_threshold_matched: Probability = 0.993
    """The same where the rules matched numbers or answer options in both prompts (``guard`` on).
    A lower one served more paraphrases on development pairs, and near misses that ask another
    question of the same numbers ("how many pizzas" / "how many slices left over") with them."""
    verify_threshold_close: Probability = 0.998
    """What a candidate at cosine ≥ ``close_similarity`` must reach instead, if higher: a
    small edit of the stored prompt is a near miss more often than a rewording is."""
    close_similarity: Probability = 0.92
    """Cosine (router embedding) from which a candidate counts as close."""
    verify_threshold_far: Probability = 0.998
    """What a candidate at cosine < ``far_similarity`` must reach instead, if higher: the
    embedding barely vouches for it, and there a near miss asks another question about the
    same thing more often than a rewording moves that far."""
    far_similarity: Probability = 0.75
    """Cosine (router embedding) below which a candidate counts as far."""
    guard: bool = True
    """Refuse a candidate whose numbers, answer options, code or script differ, before the verifier."""
    max_entries: AtLeastOne = 10_000
    """Per vector set (tenant, route, system prompt, parameters); the oldest entries go first."""
    max_temperature: AtLeastZero = 0.5
    verify_timeout_ms: AtLeastOne = 250
    """How long a lookup may wait for the verifier's verdicts, after the vector search (which the
    Redis timeout bounds). The verifier runs in one thread per process, so under load a verdict
    waits its turn: a verdict in time saves an upstream call, and one past this is a miss (counted
    in ``gateway_semantic_cache_timeouts_total``). It bounds what a miss can cost in latency."""
    multi_turn: bool = False
    tools: bool = False
    audit: SemanticAuditPolicy = SemanticAuditPolicy()


SEMANTIC_CUTOFFS = (
    "threshold",
    "verify_threshold",
    "verify_threshold_matched",
    "verify_threshold_close",
    "close_similarity",
    "verify_threshold_far",
    "far_similarity",
)
"""The settings of :class:`SemanticCachePolicy` that are cosines or probabilities (each in [0, 1])."""


class CoalescePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    wait_s: AtLeastZero = 30.0
    """How long identical requests wait for the first one's answer before calling upstream themselves."""


class CachePolicy(_Struct, frozen=True, kw_only=True):
    enabled: bool = True
    exact: ExactCachePolicy = ExactCachePolicy()
    semantic: SemanticCachePolicy = SemanticCachePolicy()
    coalesce: CoalescePolicy = CoalescePolicy()
    redis_timeout_ms: AboveZero = 50.0
    """A cache operation slower than this is abandoned: the request goes on without the cache."""


class CorsPolicy(_Struct, frozen=True, kw_only=True):
    """Browsers may call the gateway from these origins (their apps still need a key)."""

    allow_origins: list[Annotated[str, Meta(min_length=1)]] = []
    """Exact origins (``https://app.example.com``), or ``"*"`` for any; empty: no cross-origin calls."""
    max_age_s: AtLeastZero = 600
    """How long a browser may keep a preflight's answer."""


class Policy(_Struct, frozen=True, kw_only=True):
    version: Literal[1] = 1
    pair: Pair
    models: dict[ModelName, ModelConfig]
    routes: dict[ModelName, RouteConfig]
    retry: RetryPolicy = RetryPolicy()
    circuit_breaker: CircuitBreakerPolicy = CircuitBreakerPolicy()
    auth: AuthPolicy
    """Required: a file cut short (a save or ``kubectl cp`` caught half-way) must not switch keys off."""
    request_log: RequestLogPolicy = RequestLogPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    cache: CachePolicy = CachePolicy()
    tenants: dict[TenantName, TenantPolicy] = {}
    cors: CorsPolicy = CorsPolicy()


class KeyFile(_Struct, frozen=True, kw_only=True):
    """The file ``auth.key_file`` names: more keys, kept apart so ``gateway keys new`` can append to it."""

    keys: list[AuthKey] = []
