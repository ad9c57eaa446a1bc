"""Which token ids end a sequence, learned from the servers themselves.

vLLM's API does not name the end-of-sequence ids, but every completion tells: a
generated token followed by more tokens is not one; the last token of a ``stop``
finish (no stop strings are ever sent) is one. The last token of a ``length`` finish
says nothing: vLLM V1 checks the length cap before EOS, so an EOS that is the last
token allowed ends a ``length`` finish. A token seen for the first time as the large
model's correction, before either is known, is probed once: one ``max_tokens: 2``
call that forces it with ``logit_bias`` (an EOS stops after it; any other token is
forced again). Shared by all requests of a pair.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.speculative.token_api import Generation, TokenAPI

__all__ = ["EosTable"]


class EosTable:
    def __init__(self, eos: Iterable[int] = ()) -> None:
        self.eos: set[int] = set(eos)
        self.not_eos: set[int] = set()

    def learn(self, tokens: list[int], finish_reason: str | None) -> None:
        if not tokens:
            return
        self.not_eos.update(tokens[:-1])
        if finish_reason == "stop":
            self.eos.add(tokens[-1])
            self.not_eos.discard(tokens[-1])

    def known(self, token: int) -> bool:
        return token in self.eos or token in self.not_eos

    async def probe(self, api: TokenAPI, token: int, context_token: int) -> Generation:
        """Ask the server whether ``token`` ends a sequence (one tiny, forced, two-token call); the
        table then knows. Returns the call's answer (what it wrote, for the loop's counts)."""
        generation = await api.generate([context_token], 2, temperature=0.0, logprobs=1, logit_bias={token: 100.0})
        if generation.tokens[:1] == [token] and (len(generation.tokens) > 1 or generation.finish_reason == "stop"):
            self.learn(generation.tokens, generation.finish_reason)
        else:  # the bias did not force it: assume it ends nothing, as the large model's text will show
            self.not_eos.add(token)
        return generation
