"""A simulated small model with a hidden weakness, and a simulated judge that can see it.

``--weak-on chemistry,visa,...``: the server answers badly (its answer carries
:data:`FAILURE`) whenever the last user message mentions one of those words. The router
is not told: it has to learn the rule from labels. A request that carries the shadow
judge's instructions (gateway/learning/shadow.py) is answered as a judge would: "no"
when Answer A (the cheaper model's) shows the failure, "yes" otherwise. This is the
documented stand-in for "which prompts this deployment's small model gets wrong".
"""

from __future__ import annotations

import re
from typing import Any

from gateway.simulated.answers import content_text

__all__ = ["FAILURE", "judge_verdict", "weak_on"]

FAILURE = "I am not sure about this one."
_JUDGE_MARK = "You grade whether a cheaper model's answer is good enough"


def weak_on(text: str, topics: tuple[str, ...]) -> bool:
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(topic)}", lowered) for topic in topics)


def judge_verdict(messages: list[Any]) -> str | None:
    """The judge's one-word reply, when ``messages`` is a shadow-judging request."""
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        return None
    if not content_text(messages[0].get("content")).startswith(_JUDGE_MARK):
        return None
    user = content_text(messages[-1].get("content")) if isinstance(messages[-1], dict) else ""
    answer_a = user.split("\n\nAnswer A:\n", 1)[-1].split("\n\nAnswer B:\n", 1)[0]
    return "no" if FAILURE in answer_a else "yes"
