"""Asking a model a one-word yes/no question about answers: the semantic cache's audits
(gateway/cache/audit.py) and the router's shadow judging (gateway/learning/shadow.py)."""

from __future__ import annotations

import re

from gateway.core.model import Message, Request, TextPart

__all__ = ["YES_NO_TOKENS", "parse_yes_no", "yes_no_request"]

YES_NO_TOKENS = 3
"""What a yes/no request lets the model write."""


def yes_no_request(model: str, instructions: str, question: str) -> Request:
    """A deterministic request that leaves the model room for one word."""
    messages = [Message("system", (TextPart(instructions),)), Message("user", (TextPart(question),))]
    return Request(model=model, messages=messages, temperature=0.0, max_tokens=YES_NO_TOKENS)


_VERDICT = re.compile(r"""[\s'"*_`\u2018\u2019\u201c\u201d(\[]*(yes|no)(?![\w/-])""", re.IGNORECASE)


def parse_yes_no(reply: str) -> bool | None:
    """The judge's first word, whole ("Yes.", "No, because", "yes<|eot_id|>"); None when it said
    something else ("nope", "Note", "yes-and-no")."""
    found = _VERDICT.match(reply)
    return None if found is None else found.group(1).lower() == "yes"
