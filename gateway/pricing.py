"""USD cost of tokens at a model's policy prices."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import structlog

from gateway.config.schema import Price
from gateway.sparse_log import SparseLog

__all__ = ["SERVICE_TIERS", "PricedOptions", "Unpriced", "cost_usd", "option_name", "tier_name", "unpriced"]

_BASE_SPEED = "standard"
_BASE_GEO = "global"
_BASE_TIERS = frozenset({"auto", "default", "standard", "standard_only"})
"""OpenAI's and Anthropic's tiers at the list price."""
_OPTION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_not_finite = SparseLog(structlog.get_logger("gateway.pricing"), "cost_not_finite", level="error")


def option_name(value: object) -> str | None:
    """A priced option's value as an upstream's usage reports it (``fast``, ``us``, ``priority``,
    a server tool's name), or None: other text is neither priced nor logged, where a dashboard
    would group by it."""
    return value if isinstance(value, str) and _OPTION_NAME.fullmatch(value) else None


def tier_name(value: object) -> str | None:
    """A ``service_tier`` as an upstream writes it, read as :func:`option_name` reads it, whatever
    its case (t68: an upstream's ``PRIORITY`` was billed at the base price, with no warning)."""
    return option_name(value.lower() if isinstance(value, str) else value)


SERVICE_TIERS = _BASE_TIERS | {"flex", "priority", "scale", "fast"}
"""The ``service_tier`` values OpenAI's and Anthropic's APIs take: a client's other text is
neither priced nor logged (it would be a dashboard's free-text group)."""


@dataclass(frozen=True, slots=True)
class PricedOptions:
    """What a request asks for that its upstream bills above the token prices (t59: Anthropic's
    fast mode at 6x, US-only inference at 1.1x, web search at $10 per 1,000, all billed at the
    base price)."""

    speed: str | None = None
    inference_geo: str | None = None
    server_tools: Mapping[str, int] = field(default_factory=dict)
    """Upstream-run tools offered, by the name usage counts them under, with the most uses the
    request allows (its budget estimate)."""
    service_tier: str | None = None
    """OpenAI's processing tier (``priority`` is dearer, ``flex`` cheaper)."""
    audio_input: str | None = None
    """The field whose ``input_audio`` part asks for audio heard (chat's ``messages``, Responses'
    ``input``; t150: audio tokens cost several times text's); None: none."""
    audio_output: str | None = None
    """The chat field that asks for a spoken answer (``modalities`` or ``audio``); None: none."""
    web_search_options: bool = False
    """A chat request's ``web_search_options``: one web search, as OpenAI's search models bill each request."""

    def tool_uses(self) -> Mapping[str, int]:
        """:attr:`server_tools`, with a chat request's search counted as one ``web_search``."""
        if not self.web_search_options:
            return self.server_tools
        return {**self.server_tools, "web_search": self.server_tools.get("web_search", 0) + 1}


class Unpriced(NamedTuple):
    param: str
    """The request's field that asks for it."""
    asked: str
    """What it asks, as the request writes it."""
    field: str
    """The field under the model's ``price`` that would bill it."""


def unpriced(price: Price, asked: PricedOptions) -> list[Unpriced]:
    """Each option asked that ``price`` does not set: such a request would be billed at the base price."""
    out = []
    if asked.speed not in (None, _BASE_SPEED) and asked.speed not in price.speed_multipliers:
        out.append(Unpriced("speed", f'speed: "{asked.speed}"', f"speed.{asked.speed}"))
    geo = asked.inference_geo
    if geo not in (None, _BASE_GEO) and geo not in price.inference_geo_multipliers:
        out.append(Unpriced("inference_geo", f'inference_geo: "{geo}"', f"inference_geo.{geo}"))
    for name in asked.server_tools:
        if name not in price.server_tools_per_1k:
            out.append(Unpriced("tools", f"the {name} server tool", f"server_tools.{name}"))
    tier = asked.service_tier
    if tier is not None and tier not in _BASE_TIERS and tier not in price.service_tier_multipliers:
        out.append(Unpriced("service_tier", f'service_tier: "{tier}"', f"service_tier.{tier}"))
    if asked.audio_input is not None and price.audio_input_per_mtok is None:
        out.append(Unpriced(asked.audio_input, "an input_audio part", "audio_input"))
    if asked.audio_output is not None and price.audio_output_per_mtok is None:
        out.append(Unpriced(asked.audio_output, "an audio answer", "audio_output"))
    if asked.web_search_options and "web_search" not in price.server_tools_per_1k:
        out.append(Unpriced("web_search_options", "a web search (web_search_options)", "server_tools.web_search"))
    return out


def cost_usd(
    price: Price,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    cached_prompt_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    reasoning_tokens: int = 0,
    audio_prompt_tokens: int = 0,
    audio_completion_tokens: int = 0,
    speed: str | None = None,
    inference_geo: str | None = None,
    service_tier: str | None = None,
    server_tool_requests: Mapping[str, int] | None = None,
) -> float:
    """``prompt_tokens`` and ``completion_tokens`` are totals: the cached, cache-write, reasoning
    and audio tokens are parts of them (and the hour-long writes part of the writes), priced at
    their own fields where the policy sets one.

    ``speed``, ``inference_geo`` and ``service_tier`` (what the upstream says the answer ran with)
    multiply every token price, one on top of the other as Anthropic stacks them; ``server_tool_requests`` add
    their fee per use. One the policy does not price costs nothing more (a request that asks for
    it is refused before it is sent: :func:`unpriced`).

    A cost past a float's range (an upstream's absurd token count: the policy's prices are
    bounded) is 0, logged as ``cost_not_finite``: inf was written to the log as null, made the
    cost metric +Inf and was kept by Redis as the key's spend for the month (t94)."""
    try:
        cost = prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok
        if cached_prompt_tokens and price.cached_input_per_mtok is not None:
            cost += cached_prompt_tokens * (price.cached_input_per_mtok - price.input_per_mtok)
        write = price.input_per_mtok if price.cache_write_per_mtok is None else price.cache_write_per_mtok
        if cache_write_tokens and price.cache_write_per_mtok is not None:
            cost += cache_write_tokens * (write - price.input_per_mtok)
        if cache_write_1h_tokens and price.cache_write_1h_per_mtok is not None:
            cost += min(cache_write_1h_tokens, cache_write_tokens) * (price.cache_write_1h_per_mtok - write)
        if reasoning_tokens and price.reasoning_per_mtok is not None:
            cost += reasoning_tokens * (price.reasoning_per_mtok - price.output_per_mtok)
        if audio_prompt_tokens and price.audio_input_per_mtok is not None:
            cost += audio_prompt_tokens * (price.audio_input_per_mtok - price.input_per_mtok)
        if audio_completion_tokens and price.audio_output_per_mtok is not None:
            cost += audio_completion_tokens * (price.audio_output_per_mtok - price.output_per_mtok)
        if speed is not None:
            cost *= price.speed_multipliers.get(speed, 1.0)
        if inference_geo is not None:
            cost *= price.inference_geo_multipliers.get(inference_geo, 1.0)
        if service_tier is not None:
            cost *= price.service_tier_multipliers.get(service_tier, 1.0)
        tools = server_tool_requests or {}
        fees = sum(count * price.server_tools_per_1k.get(name, 0.0) for name, count in tools.items())
        total = cost / 1_000_000 + fees / 1000
    except OverflowError:  # an int past a float's range raises where a float would give inf
        total = math.inf
    if math.isfinite(total):
        return total
    _not_finite(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, price=msgspec.structs.asdict(price))
    return 0.0
