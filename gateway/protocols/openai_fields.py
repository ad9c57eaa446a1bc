"""The sampling fields OpenAI's chat and completions APIs share, with the ranges OpenAI accepts."""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["ChoiceCount", "MaxTokens", "Penalty", "Stop", "Temperature", "TopP"]

MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=128)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
