"""USD cost of tokens at a model's policy prices."""

from __future__ import annotations

from gateway.config.schema import Price

__all__ = ["cost_usd"]


def cost_usd(
    price: Price,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    cached_prompt_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> float:
    """``prompt_tokens`` and ``completion_tokens`` are totals: the cached, cache-write and
    reasoning tokens are parts of them (and the hour-long writes part of the writes), priced at
    their own fields where the policy sets one."""
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
    return cost / 1_000_000
