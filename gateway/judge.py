"""Asking a model a one-word yes/no question about answers: the semantic cache's audits
(gateway/cache/audit.py) and the router's shadow judging (gateway/learning/shadow.py)."""

from __future__ import annotations

__all__ = ["parse_yes_no", "yes_no_request"]


def yes_no_request(model: str, instructions: str, question: str) -> dict[str, object]:
    """A deterministic chat request that leaves the model room for one word."""
    return {
        "model": model,
        "temperature": 0,
        "max_tokens": 3,
        "messages": [{"role": "system", "content": instructions}, {"role": "user", "content": question}],
    }


def parse_yes_no(reply: str) -> bool | None:
    """The judge's word; None when it said something else."""
    word = reply.strip().lower().lstrip("'\"*")
    if word.startswith("yes"):
        return True
    if word.startswith("no"):
        return False
    return None
