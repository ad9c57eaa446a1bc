"""Speculative decoding between the pair: the small model drafts, the large model verifies.

``SpeculativeProvider(target, draft, policy)`` is a :class:`~gateway.upstreams.base.Provider`
for the large model whose answers come from the draft/verify loop (``mode: gateway``).
Results carry their :class:`SpeculationStats` in ``speculation`` (a field of every
:class:`~gateway.upstreams.base.Completion` and ``ChatStream``) for the request log.
"""

from gateway.speculative.drafts import Draft, DraftSource, ModelDraft, PromptLookupDraft
from gateway.speculative.errors import PairMismatchError
from gateway.speculative.provider import PROBE_TEXT, SpeculativeProvider
from gateway.speculative.stats import SpeculationStats

__all__ = [
    "PROBE_TEXT",
    "Draft",
    "DraftSource",
    "ModelDraft",
    "PairMismatchError",
    "PromptLookupDraft",
    "SpeculationStats",
    "SpeculativeProvider",
]
