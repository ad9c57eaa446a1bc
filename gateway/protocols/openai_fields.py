"""The sampling fields OpenAI's chat and completions APIs share, with the ranges OpenAI accepts."""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["ChoiceCount", "MaxTokens", "Penalty", "Stop", "Temperature", "TopP"]

MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=128)]
Stop = str | list[str]
"""Any number of strings: OpenAI's API takes 4 and says so itself; vLLM and Anthropic take more."""
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
