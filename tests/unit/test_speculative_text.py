"""The answer's text from token ids, as vLLM writes it, with real byte-level and SentencePiece-style tokenizers."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gateway.speculative.loop import Step
from gateway.speculative.text import LocalTextAssembler, ServerTextAssembler, clean_up_tokenization
from gateway.speculative.token_api import TokenAPI
from tests.unit.fake_upstream import pair_provider

_CORPUS = [
    "from . import x, y ; isn't it ? café naïve Straße 東京 Москва مرحبا 🙂🚀",
    "The quick brown fox jumps over the lazy dog. It's the best of times!",
    "def mean(xs): return sum(xs) / len(xs)  # 3.14159",
] * 20


def _byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<|tool|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def _sentencepiece_like() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>", "<|tool|>"],
        initial_alphabet=[f"<0x{b:02X}>" for b in range(256)],
    )  # fmt: skip
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def _assemble(
    tokenizer: Tokenizer, prompt: list[int], answer: list[int], stops: list[str], seed: int
) -> tuple[str, str, int]:
    """Feed ``answer`` in rounds of random size, as the draft/verify loop does; join what is released."""
    assembler = LocalTextAssembler(tokenizer, prompt, stops)
    rng = random.Random(seed)
    sent, at = [], 0
    while at < len(answer) and assembler.finish_reason is None:
        size = rng.randint(1, 5)
        chunk = answer[at : at + size]
        at += size
        finish = "length" if at >= len(answer) else None
        sent.append(asyncio.run(assembler.push(Step(chunk, finish))))
    return "".join(sent), str(assembler.finish_reason), assembler.completion_tokens


@pytest.mark.parametrize("make", [_byte_level, _sentencepiece_like], ids=["byte-level", "sentencepiece"])
def test_the_text_is_the_incremental_decode_vllm_returns(make: object) -> None:
    tokenizer = make()  # type: ignore[operator]
    special = tokenizer.token_to_id("<|tool|>")
    for seed, text in enumerate(_CORPUS[:3]):
        ids = tokenizer.encode(text).ids
        cut = len(ids) // 3
        prompt, answer = ids[:cut], ids[cut:]
        answer = [*answer[:5], special, *answer[5:]]  # a special token mid-answer: skipped, as vLLM does
        # vLLM decodes the answer after the prompt: the prompt's text is cut off the front, specials skipped
        before = tokenizer.decode(prompt[-8:], skip_special_tokens=True)
        whole = tokenizer.decode(prompt[-8:] + answer, skip_special_tokens=True)
        assert whole.startswith(before)
        want = whole[len(before) :]
        got, finish, count = _assemble(tokenizer, prompt, answer, [], seed)
        assert (got, finish, count) == (want, "length", len(answer))
        assert "\ufffd" not in got and "<|tool|>" not in got


def test_a_stop_string_cuts_where_the_tokens_first_contain_it() -> None:
    tokenizer = _byte_level()
    ids = tokenizer.encode(_CORPUS[0]).ids
    prompt, answer = ids[:3], ids[3:]
    full = tokenizer.decode(prompt + answer)[len(tokenizer.decode(prompt)) :]
    assert " ?" in full and clean_up_tokenization(full) != full  # the text /detokenize would have altered
    got, finish, count = _assemble(tokenizer, prompt, answer, ["Straße"], 3)
    assert finish == "stop" and got == full[: full.index("Straße")]
    # the token that completed the stop string is the last one counted
    upto = next(
        n
        for n in range(1, len(answer) + 1)
        if "Straße" in tokenizer.decode(prompt + answer[:n])[len(tokenizer.decode(prompt)) :]
    )
    assert count == upto


def test_without_a_tokenizer_an_answer_cut_mid_character_ends_before_it_as_vllm_writes_it() -> None:
    """t76: ``max_tokens`` ending the answer inside a multi-byte character left a U+FFFD at its
    end when the text came from the server's ``/detokenize``; vLLM's detokenizer (and the local
    tokenizer's) never writes half a character."""
    tokenizer = _byte_level()

    def detokenize(request: httpx.Request) -> httpx.Response:
        ids = json.loads(request.content)["tokens"]
        return httpx.Response(200, json={"prompt": tokenizer.decode(ids, skip_special_tokens=False)})

    provider = pair_provider("large", httpx.MockTransport(detokenize))
    prompt, ids = tokenizer.encode("naïve ").ids, tokenizer.encode("東京 café").ids
    answer = ids[: next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))]

    async def assembled() -> str:
        server = ServerTextAssembler(TokenAPI(provider), [], incremental=False)
        text = await server.push(Step(answer, "length"))
        await provider.aclose()
        return text

    served = asyncio.run(assembled())
    local = asyncio.run(LocalTextAssembler(tokenizer, prompt, []).push(Step(answer, "length")))
    assert served == local and served.startswith("東") and not served.endswith("\ufffd")
