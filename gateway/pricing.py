"""USD cost of tokens at a model's policy prices."""

from __future__ import annotations

from gateway.config.schema import Price

__all__ = ["cost_usd"]


def cost_usd(price: Price, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1_000_000
