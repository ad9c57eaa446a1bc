"""What one speculative request did, for the request log."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SpeculationStats"]


@dataclass(slots=True)
class SpeculationStats:
    mode: str
    """``gateway`` (the loop ran here) or ``plain`` (the large model alone; see ``fallback_reason``)."""
    draft_source: str = "model"
    sampling: str = "greedy"
    """``greedy`` (temperature 0: exact), ``speculative`` (speculative sampling) or ``plain``."""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    """Drafted tokens the large model agreed with (bonus/correction tokens not included)."""
    rejections: int = 0
    """Rounds that stopped at a disagreement (the rest accepted their whole draft)."""
    large_calls: int = 0
    draft_calls: int = 0
    large_prompt_tokens: int = 0
    large_completion_tokens: int = 0
    """Tokens the large model's calls read and wrote (verify rounds, a plain finish, EOS probes): each
    round reads the context again. The log's usage bills the answer as if it had answered alone (t124)."""
    draft_prompt_tokens: int = 0
    draft_completion_tokens: int = 0
    """Tokens the draft calls that answered read and wrote (a failed one: none known)."""
    output_tokens: int = 0
    k_last: int = 0
    fallback_to_plain: bool = False
    fallback_reason: str | None = None
    """Why the request went plain; with mode ``gateway``, ``draft_too_slow``: drafting was measured
    to lose to plain decoding and the rest of the answer was decoded plainly (t49)."""
    draft_failed: bool = False
    """The draft server failed mid-answer; the rest came from the large model alone."""
    heavy_tail: bool = False
    """The large model's returned logprobs left too much mass uncovered; the rest was decoded plainly."""
    eos_probes: int = 0
    draft_ms: float = 0.0
    """Wall time of the draft calls (the part on the critical path: prefetched drafts overlap the gateway's work)."""
    verify_ms: float = 0.0
    loop_cpu_ms: float = 0.0
    """CPU time of the loop's own work (parsing, acceptance, bookkeeping), HTTP client excluded."""
    k_history: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def to_log(self) -> dict[str, Any]:
        """The fields for the request log line (``k_history`` left out: it grows with the answer)."""
        data = asdict(self)
        data.pop("k_history")
        data["acceptance_rate"] = None if self.acceptance_rate is None else round(self.acceptance_rate, 4)
        for name in ("loop_cpu_ms", "draft_ms", "verify_ms"):
            data[name] = round(data[name], 3)
        return data
