"""A deterministic toy language model behind the subset of vLLM's HTTP API that speculation uses.

Run: ``python tests/speculative/toy_lm_server.py --role large --port 0`` (prints
``PORT <n>`` once listening). Two instances, one ``--role large`` and one
``--role small --agreement A``, form a pair whose greedy choices agree at rate A.

The model
---------
* Vocabulary: 4 special tokens (``<eos>``, ``<|system|>``, ``<|user|>``,
  ``<|assistant|>``), 64 words and 6 punctuation pieces; a token decodes to
  ``" " + word`` (``" ."``, ``" n't"``, ...). Words outside the vocabulary hash onto
  it (lossy, deterministic). ``--tokenizer-variant`` permutes the word ids, which
  makes a pair whose tokenizers differ. :func:`write_tokenizer_json` writes the same
  vocabulary as a Hugging Face ``tokenizer.json`` (byte-level pieces, specials marked).
* Text, as vLLM makes it: generated text (``/v1/completions``, ``/v1/chat/completions``)
  is the pieces of the non-special tokens joined (incremental detokenization,
  ``skip_special_tokens``); ``/detokenize`` is ``tokenizer.decode``: special tokens kept
  and, with ``--cleanup 1`` (the default, as Llama-3.1's tokenizer), Hugging Face's
  ``clean_up_tokenization_spaces`` applied (``" the ."`` → ``" the."``).
  ``--special-rate`` makes ``<|system|>`` the argmax at that share of positions (a
  model emitting a special token that is not EOS).
* ``--logprobs-mode processed`` returns logprobs after temperature and the repetition
  penalty (vLLM's V0 engine; V1's default ``raw_logprobs`` returns them raw);
  ``processed_logprobs`` scales the sampled tokens' logprobs only (V1's option of that
  name: prompt logprobs stay raw).
* Next-token logits are a pure function of (last two tokens, position): seeded
  Gaussian scores (scale 2). With probability ``--eos-rate`` per position ``<eos>``
  is the argmax. The *small* model reuses the large model's logits plus noise and,
  with probability 1 - A per position (an independent coin per context), moves its
  argmax to another word. So a greedy draft matches the target with i.i.d. rate A.
* Logprobs are the raw log-softmax at temperature 1 (vLLM's default
  ``raw_logprobs`` mode); sampling uses ``softmax(logits / T)``.

Simulated cost (asyncio.sleep, so the process stays idle like a GPU-bound server):
each forward pass costs ``--pass-ms`` plus ``--prefill-ms-per-token`` per prompt
token not already in the prefix cache (16-token blocks, like vLLM's automatic
prefix caching). With ``--batch-knee N`` the server batches instead, as vLLM's
continuous batching does: forward passes wanted while a step runs join the next step,
each sequence adding its uncached tokens (1 when decoding); a step costs ``--pass-ms``
up to N tokens (memory-bound) and grows in proportion beyond (compute-bound).

Endpoints: ``/tokenize``, ``/detokenize`` (root, as vLLM), ``/v1/completions``
(token-id prompts, ``logprobs``, ``prompt_logprobs``, ``return_tokens_as_token_ids``,
``logit_bias``, streaming), ``/v1/chat/completions`` (the plain path), and
``/_control/{stats,reset,fail}`` for tests (``fail``: after N more completion calls
answer 500 or drop the connection).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import sys
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

EOS, SYSTEM, USER, ASSISTANT = 0, 1, 2, 3
_SPECIALS = ["<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "write",
    "would",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
]
PUNCTUATION = [".", ",", "!", "?", "'s", "n't"]
VOCAB = len(_SPECIALS) + len(WORDS) + len(PUNCTUATION)
_FIRST_PUNCTUATION = len(_SPECIALS) + len(WORDS)
_BLOCK = 16
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class Settings:
    role: str = "large"
    agreement: float = 0.8
    seed: int = 1234
    eos_rate: float = 0.0
    pass_ms: float = 0.0
    prefill_ms_per_token: float = 0.0
    tokenizer_variant: int = 0
    max_model_len: int = 4096
    max_logprobs: int = 20
    model_name: str = "toy"
    default_temperature: float = 1.0
    """What a request that leaves ``temperature`` unset gets (vLLM: the model's generation_config)."""
    default_repetition_penalty: float = 1.0
    """Likewise for ``repetition_penalty`` (Qwen2.5 ships 1.05)."""
    flatness: float = 1.0
    """Below 1, the target's word scores are scaled down: a heavy-tailed distribution that the
    top 20 logprobs no longer cover."""
    cleanup: bool = True
    special_rate: float = 0.0
    logprobs_mode: str = "raw"
    stop_check: str = "v1"
    """``v1``: the length cap is checked before EOS, as vLLM V1 does; ``v0``: EOS first."""
    """``raw``: log-softmax of the logits (vLLM V1); ``processed``: after temperature and penalty (V0);
    ``processed_logprobs``: sampled ones processed, prompt ones raw (V1's option)."""
    batch_knee: int = 0
    """Tokens a batched step takes at the cost of one pass; 0: no batching model (each request alone)."""


@dataclass(slots=True)
class Stats:
    completions: int = 0
    chat: int = 0
    forward_passes: int = 0
    prefill_tokens: int = 0
    tokenize: int = 0
    detokenize: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Of the completion calls answered: the tokens they were given and wrote (t124)."""
    unsalted: int = 0
    """Generations (completions and chat) that came without a ``cache_salt``."""
    salts: list[str] = field(default_factory=list)
    """The ``cache_salt`` values generations came with, each once, in the order first seen."""
    engine_fields: list[str] = field(default_factory=list)
    """vLLM's engine-level fields (``request_id``, ``priority``, ...) generations came with, each once (t177)."""


@dataclass(slots=True)
class Failure:
    after_calls: int = 0
    kind: str = "500"  # "500" | "drop" | "hang" (never answers, as a wedged server) | "oov" | "empty" (see below)
    """``oov``: completions answer 200 with token ids beyond the vocabulary, as a server redeployed
    with another model's (larger) vocabulary would; a server given such ids answers vLLM's 400.
    ``empty``: non-streamed completions answer 200 with no token at all (t76)."""
    armed: bool = False


class _Engine:
    """Continuous batching: the passes that arrive while a step runs make the next step."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._running = False
        self.steps = 0
        self.step_tokens = 0

    async def forward(self, tokens: int) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((tokens, done))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._run())
        await done

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                tokens = sum(n for n, _ in batch)
                self.steps += 1
                self.step_tokens += tokens
                await asyncio.sleep(self._settings.pass_ms / 1000 * max(1.0, tokens / self._settings.batch_knee))
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
                # the sequences just stepped are still running: let them queue their next pass
                # before the next step starts (vLLM's scheduler keeps running sequences in the batch)
                await asyncio.sleep(0)
                await asyncio.sleep(0)
        finally:
            self._running = False


@dataclass
class State:
    settings: Settings
    stats: Stats = field(default_factory=Stats)
    failure: Failure = field(default_factory=Failure)
    block_cache: set[int] = field(default_factory=set)
    logits_cache: OrderedDict[tuple[int, int, int], np.ndarray] = field(default_factory=OrderedDict)
    entry_cache: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict)
    engine: _Engine | None = None


# --------------------------------------------------------------------------- tokenizer


def _word_ids(variant: int) -> dict[str, int]:
    order = list(range(len(WORDS)))
    if variant:
        random.Random(variant).shuffle(order)
    return {word: len(_SPECIALS) + order[i] for i, word in enumerate(WORDS)}


def _pieces(variant: int) -> list[str]:
    pieces = list(_SPECIALS) + [""] * len(WORDS) + [" " + p for p in PUNCTUATION]
    for word, token in _word_ids(variant).items():
        pieces[token] = " " + word
    return pieces


def clean_up_tokenization(text: str) -> str:
    """Hugging Face's ``clean_up_tokenization`` (what ``decode`` applies when ``clean_up_tokenization_spaces``)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text


class Tokenizer:
    def __init__(self, variant: int) -> None:
        self._ids = _word_ids(variant)
        self._ids.update({p: _FIRST_PUNCTUATION + i for i, p in enumerate(PUNCTUATION)})
        self._pieces = _pieces(variant)

    def encode(self, text: str) -> list[int]:
        out = []
        for word in re.findall(r"n't|'s|[a-z]+|[.,!?]", text.lower()):
            token = self._ids.get(word)
            out.append(token if token is not None else len(_SPECIALS) + zlib.crc32(word.encode()) % len(WORDS))
        return out

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return "".join(self._pieces[i] for i in ids if not (skip_special and i < len(_SPECIALS)))

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        roles = {"system": SYSTEM, "developer": SYSTEM, "user": USER, "assistant": ASSISTANT}
        out: list[int] = []
        for message in messages:
            out.append(roles.get(str(message.get("role")), USER))
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            out.extend(self.encode(str(content or "")))
        if add_generation_prompt:
            out.append(ASSISTANT)
        return out


def write_tokenizer_json(path: str, variant: int = 0) -> None:
    """The toy vocabulary as a Hugging Face ``tokenizer.json`` (what ops point ``speculative.tokenizer`` at)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {piece.replace(" ", "\u0120"): i for i, piece in enumerate(_pieces(variant))}
    vocab["<unk>"] = VOCAB
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(special, special=True) for special in _SPECIALS])
    hf.save(path)


# --------------------------------------------------------------------------- the model


def _target_logits(state: State, context: list[int]) -> np.ndarray:
    key = _key(context, len(context))
    cached = state.logits_cache.get(key)
    if cached is not None:
        return cached
    rng = np.random.default_rng([state.settings.seed, key[0] + 2, key[1] + 2, key[2]])
    logits = rng.standard_normal(VOCAB) * 2.0 * state.settings.flatness
    logits[1:4] = -30.0
    if rng.random() < state.settings.eos_rate:
        logits[EOS] = logits.max() + 2.0
    else:
        logits[EOS] = min(logits[EOS], logits[4:].max() - 3.0)
        if rng.random() < state.settings.special_rate:
            logits[SYSTEM] = logits.max() + 2.0
    if state.settings.role == "small":
        logits = _perturb(state.settings, key, logits)
    state.logits_cache[key] = logits
    if len(state.logits_cache) > 200_000:
        state.logits_cache.popitem(last=False)
    return logits


def _perturb(settings: Settings, key: tuple[int, int, int], target: np.ndarray) -> np.ndarray:
    """The small model: the target's scores plus noise; with probability 1 - A a different argmax."""
    rng = np.random.default_rng([settings.seed, 7777, key[0] + 2, key[1] + 2, key[2]])
    agree = rng.random() < settings.agreement
    logits = target + rng.standard_normal(VOCAB) * 0.5
    logits[1:4] = -30.0
    best = int(np.argmax(target))
    if agree:
        logits[best] = max(logits[best], logits.max() + 0.2)
    else:
        other = best
        while other == best:
            other = int(rng.integers(4, VOCAB))
        logits[other] = logits.max() + 1.0
    return logits


def _penalized(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """vLLM's repetition penalty: logits of tokens already in the sequence divided by it when
    positive, multiplied when negative (applied when sampling, not to prompt logprobs)."""
    if penalty == 1.0 or not seen:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(seen))
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    log_probs: np.ndarray = shifted - math.log(float(np.exp(shifted).sum()))
    return log_probs


def _choose(logits: np.ndarray, temperature: float, rng: random.Random, bias: dict[int, float]) -> int:
    if bias:
        logits = logits.copy()
        for token, value in bias.items():
            logits[token] += value
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = np.exp(_log_softmax(logits / temperature))
    return int(np.searchsorted(np.cumsum(probs), rng.random() * float(probs.sum()), side="right").clip(0, VOCAB - 1))


def _top(logprobs: np.ndarray, n: int) -> list[int]:
    if n <= 0:
        return []
    order = np.argsort(-logprobs, kind="stable")
    return [int(i) for i in order[:n]]


def _token_name(token: int, as_ids: bool, tokenizer: Tokenizer) -> str:
    return f"token_id:{token}" if as_ids else tokenizer.decode([token])


# --------------------------------------------------------------------------- cost model


def _uncached_tokens(state: State, seq: list[int], salt: str | None) -> int:
    """Tokens of ``seq`` not covered by cached full blocks; caches all of its full blocks. As in
    vLLM, a request's ``cache_salt`` goes into its first block's hash: it finds only its salt's blocks."""
    cached, digest, hit = 0, hash(salt), True
    for start in range(0, len(seq) - _BLOCK + 1, _BLOCK):
        digest = hash((digest, tuple(seq[start : start + _BLOCK])))
        if hit and digest in state.block_cache:
            cached = start + _BLOCK
        else:
            hit = False
            state.block_cache.add(digest)
    if len(state.block_cache) > 500_000:
        state.block_cache.clear()
    return len(seq) - cached


class _Clock:
    """Simulated GPU time. Streamed answers sleep per forward pass (tokens must leave over time);
    non-streamed ones add it up and sleep once, so the timer's own overshoot (~0.5 ms per sleep
    on a busy machine) is not counted k times."""

    def __init__(self, state: State, streamed: bool) -> None:
        self._state = state
        self._streamed = streamed
        self._owed_ms = 0.0

    async def forward(self, prefill_tokens: int) -> None:
        s = self._state.settings
        self._state.stats.forward_passes += 1
        self._state.stats.prefill_tokens += prefill_tokens
        if self._state.engine is not None:
            await self._state.engine.forward(max(1, prefill_tokens))
            return
        self._owed_ms += s.pass_ms + s.prefill_ms_per_token * prefill_tokens
        if self._streamed:
            await self.settle()

    async def settle(self) -> None:
        if self._owed_ms > 0:
            await asyncio.sleep(self._owed_ms / 1000)
        self._owed_ms = 0.0


# --------------------------------------------------------------------------- generation


@dataclass(slots=True)
class _Request:
    prompt: list[int]
    max_tokens: int
    temperature: float
    logprobs: int | None
    prompt_logprobs: int | None
    as_ids: bool
    bias: dict[int, float]
    rng: random.Random
    repetition_penalty: float = 1.0
    cache_salt: str | None = None


_ENGINE_FIELDS = (
    *("bootstrap_host", "bootstrap_port", "bootstrap_room", "chat_template", "custom_logit_processor"),
    *("data_parallel_rank", "kv_transfer_params", "logits_processors", "lora_path", "priority", "request_id"),
    *("return_hidden_states", "rid", "vllm_xargs"),
)
"""vLLM's and SGLang's engine-level fields (the gateway's ``ENGINE_FIELDS``; this script imports nothing of it)."""


def _salt(state: State, body: dict[str, Any]) -> str | None:
    for name in _ENGINE_FIELDS:  # read where the salt is
        if name in body and name not in state.stats.engine_fields:
            state.stats.engine_fields.append(name)
    salt = body.get("cache_salt")
    if salt is None:
        state.stats.unsalted += 1
    elif isinstance(salt, str) and salt not in state.stats.salts:
        state.stats.salts.append(salt)
    return salt if isinstance(salt, str) else None


def _parse_completion(state: State, tokenizer: Tokenizer, body: dict[str, Any]) -> _Request:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and 0 <= t < VOCAB for t in prompt):
        raise web.HTTPBadRequest(text='{"error": {"message": "prompt must be token ids in the vocabulary"}}')
    room = state.settings.max_model_len - len(prompt)
    if room <= 0:
        raise _context_error(state.settings.max_model_len, len(prompt), 0)
    max_tokens = body.get("max_tokens")
    max_tokens = 16 if max_tokens is None else int(max_tokens)
    for name in ("logprobs", "prompt_logprobs"):
        value = body.get(name)
        if value is not None and int(value) > state.settings.max_logprobs:
            raise web.HTTPBadRequest(text='{"error": {"message": "%s above max_logprobs"}}' % name)
    seed = body.get("seed")
    return _Request(
        prompt=prompt,
        max_tokens=min(max_tokens, room),
        temperature=float(body.get("temperature", state.settings.default_temperature)),
        logprobs=body.get("logprobs"),
        prompt_logprobs=body.get("prompt_logprobs"),
        as_ids=bool(body.get("return_tokens_as_token_ids")),
        bias={int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()},
        rng=random.Random(seed) if seed is not None else random.Random(),
        repetition_penalty=float(body.get("repetition_penalty", state.settings.default_repetition_penalty)),
        cache_salt=_salt(state, body),
    )


def _prompt_logprobs(state: State, tokenizer: Tokenizer, req: _Request) -> list[Any]:
    """One entry per prompt position (the first is None), as vLLM returns them: the actual token and the top n."""
    n = req.prompt_logprobs or 0
    out: list[Any] = [None]
    for pos in range(1, len(req.prompt)):
        scale = _logprob_scale(state.settings, req.temperature, prompt=True)
        key = (_key(req.prompt, pos), req.prompt[pos], n, req.as_ids, scale)
        entry = state.entry_cache.get(key)
        if entry is None:
            entry = _prompt_entry(state, tokenizer, req.prompt[:pos], req.prompt[pos], n, req.as_ids, scale)
            state.entry_cache[key] = entry
            if len(state.entry_cache) > 200_000:
                state.entry_cache.popitem(last=False)
        out.append(entry)
    return out


def _key(seq: list[int], pos: int) -> tuple[int, int, int]:
    return (seq[pos - 2] if pos > 1 else -1, seq[pos - 1] if pos > 0 else -1, pos)


def _logprob_scale(settings: Settings, temperature: float, *, prompt: bool = False) -> float:
    """What the returned logprobs' logits are divided by: 1 when raw, the temperature when processed."""
    processed = settings.logprobs_mode == "processed" or (settings.logprobs_mode == "processed_logprobs" and not prompt)
    return temperature if processed and temperature > 0 else 1.0


def _prompt_entry(
    state: State, tokenizer: Tokenizer, context: list[int], actual: int, n: int, as_ids: bool, scale: float
) -> Any:
    lp = _log_softmax(_target_logits(state, context) / scale)
    order = np.argsort(-lp, kind="stable")
    rank_of = {int(t): r + 1 for r, t in enumerate(order[: max(n, 1)])}
    entry: dict[str, Any] = {
        str(actual): {
            "logprob": float(lp[actual]),
            "rank": rank_of.get(actual, int((lp > lp[actual]).sum()) + 1),
            "decoded_token": _token_name(actual, as_ids, tokenizer),
        }
    }
    for token in order[:n]:
        token = int(token)
        entry.setdefault(str(token), {
            "logprob": float(lp[token]), "rank": rank_of[token], "decoded_token": _token_name(token, as_ids, tokenizer),
        })  # fmt: skip
    return msgspec.Raw(_encode(entry))


async def _generate(state: State, req: _Request, on_token: Any = None) -> tuple[list[int], list[np.ndarray], str]:
    """Autoregressive generation with the cost model; ``on_token`` is awaited per token (streaming)."""
    seq = list(req.prompt)
    tokens: list[int] = []
    logprobs: list[np.ndarray] = []
    finish = "length"
    clock = _Clock(state, streamed=on_token is not None)
    await clock.forward(_uncached_tokens(state, seq, req.cache_salt))
    for step in range(req.max_tokens):
        if step:
            await clock.forward(0)
        logits = _penalized(_target_logits(state, seq), seq, req.repetition_penalty)
        token = _choose(logits, req.temperature, req.rng, req.bias)
        tokens.append(token)
        logprobs.append(_log_softmax(logits / _logprob_scale(state.settings, req.temperature)))
        seq.append(token)
        if on_token is not None:
            await on_token(token, logprobs[-1])
        if token == EOS:
            finish = _eos_finish(state.settings, step, req.max_tokens)
            break
    _uncached_tokens(state, seq, req.cache_salt)
    await clock.settle()
    return tokens, logprobs, finish


def _logprobs_block(tokenizer: Tokenizer, req: _Request, tokens: list[int], lps: list[np.ndarray]) -> dict[str, Any]:
    n = req.logprobs or 0
    block: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    offset = 0
    for token, lp in zip(tokens, lps, strict=False):
        block["text_offset"].append(offset)
        offset += len(tokenizer.decode([token], skip_special=True))
        block["tokens"].append(_token_name(token, req.as_ids, tokenizer))
        block["token_logprobs"].append(float(lp[token]))
        top = {_token_name(t, req.as_ids, tokenizer): float(lp[t]) for t in _top(lp, n)}
        top.setdefault(_token_name(token, req.as_ids, tokenizer), float(lp[token]))
        block["top_logprobs"].append(top)
    return block


# --------------------------------------------------------------------------- handlers


def build_app(settings: Settings) -> web.Application:
    state = State(settings, engine=_Engine(settings) if settings.batch_knee > 0 else None)
    tokenizer = Tokenizer(settings.tokenizer_variant)
    app = web.Application(handler_args={"tcp_keepalive": True})

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        state.stats.tokenize += 1
        if "messages" in body:
            ids = tokenizer.chat(body["messages"], bool(body.get("add_generation_prompt", True)))
        else:
            ids = tokenizer.encode(str(body.get("prompt", "")))
        return _json({"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids})

    async def detokenize(request: web.Request) -> web.Response:
        body = await request.json()
        state.stats.detokenize += 1
        text = tokenizer.decode([int(t) for t in body["tokens"]])  # special tokens kept, as tokenizer.decode
        return _json({"prompt": clean_up_tokenization(text) if settings.cleanup else text})

    async def _maybe_fail(request: web.Request) -> str | None:
        """Fails the call as armed; the kind when the call is answered, but oddly (``oov``, ``empty``)."""
        failure = state.failure
        if not failure.armed:
            return None
        if failure.after_calls > 0:
            failure.after_calls -= 1
            return None
        if failure.kind in ("oov", "empty"):
            return failure.kind
        if failure.kind == "hang":
            await asyncio.sleep(3600)
        if failure.kind == "drop":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        raise web.HTTPInternalServerError(text='{"error": {"message": "injected failure"}}')

    async def completions(request: web.Request) -> web.StreamResponse:
        body = _decode(await request.read())
        state.stats.completions += 1
        odd = await _maybe_fail(request)
        req = _parse_completion(state, tokenizer, body)
        created = int(time.time())
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)

            sent = 0

            async def send(token: int, lp: np.ndarray) -> None:
                nonlocal sent
                block = _logprobs_block(tokenizer, req, [token], [lp]) if req.logprobs is not None else None
                # an EOS as the last token allowed: V1's 'length' comes in the tail chunk below
                finish = _eos_finish(settings, sent, req.max_tokens) if token == EOS else None
                finish = None if finish == "length" else finish
                sent += 1
                chunk = {"id": "cmpl-toy", "object": "text_completion", "created": created, "model": settings.model_name,
                         "choices": [{"index": 0, "text": tokenizer.decode([token], skip_special=True),
                                      "logprobs": block, "finish_reason": finish}]}  # fmt: skip
                await resp.write(b"data: " + _encode(chunk) + b"\n\n")

            tokens, _, finish = await _generate(state, req, send)
            state.stats.prompt_tokens += len(req.prompt)
            state.stats.completion_tokens += len(tokens)
            if finish == "length":
                tail = {"id": "cmpl-toy", "object": "text_completion", "created": created, "model": settings.model_name,
                        "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}  # fmt: skip
                await resp.write(b"data: " + _encode(tail) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        prompt_lps = _prompt_logprobs(state, tokenizer, req) if req.prompt_logprobs is not None else None
        tokens, lps, finish = await _generate(state, req)
        if odd == "empty":
            tokens, lps, finish = [], [], "length"
        state.stats.prompt_tokens += len(req.prompt)
        state.stats.completion_tokens += len(tokens)
        block = _logprobs_block(tokenizer, req, tokens, lps) if req.logprobs is not None else None
        if odd == "oov" and block is not None and req.as_ids:
            block["tokens"] = [f"token_id:{VOCAB + 7 + i}" for i in range(len(tokens))]
        choice = {
            "index": 0,
            "text": tokenizer.decode(tokens, skip_special=True),
            "logprobs": block,
            "finish_reason": finish,
            "prompt_logprobs": prompt_lps,
        }
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": len(tokens),
                 "total_tokens": len(req.prompt) + len(tokens)}  # fmt: skip
        return _json({"id": "cmpl-toy", "object": "text_completion", "created": created,
                      "model": settings.model_name, "choices": [choice], "usage": usage})  # fmt: skip

    async def chat(request: web.Request) -> web.StreamResponse:
        """The plain path: the large model alone, with vLLM's stop-string semantics."""
        body = _decode(await request.read())
        state.stats.chat += 1
        prompt = tokenizer.chat(body["messages"])
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        asked = body.get("max_tokens") or body.get("max_completion_tokens")
        room = settings.max_model_len - len(prompt)
        if room <= 0 or (asked and int(asked) > room):  # vLLM refuses what does not fit
            raise _context_error(settings.max_model_len, len(prompt), int(asked or 0))
        max_tokens = asked or room
        req = _Request(prompt, int(max_tokens),
                       float(body.get("temperature", settings.default_temperature)), None, None, False, {},
                       random.Random(body.get("seed")),
                       float(body.get("repetition_penalty", settings.default_repetition_penalty)),
                       _salt(state, body))  # fmt: skip
        tokens, text, finish, stop_reason = await _chat_generate(state, tokenizer, req, stops)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                 "total_tokens": len(prompt) + len(tokens)}  # fmt: skip
        base = {"id": "chatcmpl-toy", "created": int(time.time()), "model": settings.model_name}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            chunks = [{"role": "assistant", "content": text}, {}]
            for i, delta in enumerate(chunks):
                choice = {"index": 0, "delta": delta, "finish_reason": finish if i else None}
                if i:
                    choice["stop_reason"] = stop_reason  # vLLM's: the stop string matched, else null
                chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                await resp.write(b"data: " + _encode(chunk) + b"\n\n")
            usage_chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await resp.write(b"data: " + _encode(usage_chunk) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        message = {"role": "assistant", "content": text}
        return _json({**base, "object": "chat.completion",
                      "choices": [{"index": 0, "message": message, "finish_reason": finish, "stop_reason": stop_reason}],
                      "usage": usage})  # fmt: skip

    async def stats(request: web.Request) -> web.Response:
        engine = {"steps": state.engine.steps, "step_tokens": state.engine.step_tokens} if state.engine else {}
        return _json({**{f: getattr(state.stats, f) for f in state.stats.__slots__}, "role": settings.role, **engine})

    async def reset(request: web.Request) -> web.Response:
        state.stats = Stats()
        if state.engine is not None:
            state.engine.steps = state.engine.step_tokens = 0
        state.failure = Failure()
        state.block_cache.clear()
        return _json({"ok": True})

    async def fail(request: web.Request) -> web.Response:
        body = await request.json()
        state.failure = Failure(
            after_calls=int(body.get("after_calls", 0)), kind=str(body.get("kind", "500")), armed=True
        )
        return _json({"ok": True})

    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/_control/stats", stats)
    app.router.add_post("/_control/reset", reset)
    app.router.add_post("/_control/fail", fail)
    return app


def _eos_finish(settings: Settings, step: int, max_tokens: int) -> str:
    """vLLM V1 checks the length cap before EOS (``check_stop``): an EOS that is the last token
    allowed ends a ``length`` finish; V0 said ``stop``."""
    return "length" if settings.stop_check == "v1" and step + 1 >= max_tokens else "stop"


async def _chat_generate(
    state: State, tokenizer: Tokenizer, req: _Request, stops: list[str]
) -> tuple[list[int], str, str, str | None]:
    """Token by token, checking stop strings after each one as vLLM does (text truncated before
    the stop); the tokens, the text, the finish reason and the stop string matched."""
    seq = list(req.prompt)
    tokens: list[int] = []
    clock = _Clock(state, streamed=False)
    await clock.forward(_uncached_tokens(state, seq, req.cache_salt))
    for step in range(req.max_tokens):
        if step:
            await clock.forward(0)
        token = _choose(
            _penalized(_target_logits(state, seq), seq, req.repetition_penalty), req.temperature, req.rng, {}
        )
        tokens.append(token)
        seq.append(token)
        if token == EOS:
            await clock.settle()
            return (
                tokens,
                tokenizer.decode(tokens, skip_special=True),
                _eos_finish(state.settings, step, req.max_tokens),
                None,
            )
        text = tokenizer.decode(tokens, skip_special=True)
        for stop in stops:
            index = text.find(stop)
            if index >= 0:
                await clock.settle()
                return tokens, text[:index], "stop", stop
    _uncached_tokens(state, seq, req.cache_salt)
    await clock.settle()
    return tokens, tokenizer.decode(tokens, skip_special=True), "length", None


def _context_error(max_model_len: int, prompt: int, completion: int) -> web.HTTPBadRequest:
    """vLLM's 400 (its flat error body of before 0.10.2) for a request that does not fit its window."""
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
        "Please reduce the length of the messages or completion."
    )
    error = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
    return web.HTTPBadRequest(text=msgspec.json.encode(error).decode(), content_type="application/json")


def _json(data: Any) -> web.Response:
    return web.Response(body=_encode(data), content_type="application/json")


def _parse_args(argv: list[str]) -> tuple[Settings, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["large", "small"], default="large")
    parser.add_argument("--agreement", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eos-rate", type=float, default=0.0)
    parser.add_argument("--pass-ms", type=float, default=0.0)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.0)
    parser.add_argument("--tokenizer-variant", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--default-temperature", type=float, default=1.0)
    parser.add_argument("--default-repetition-penalty", type=float, default=1.0)
    parser.add_argument("--flatness", type=float, default=1.0)
    parser.add_argument("--cleanup", type=int, choices=[0, 1], default=1)
    parser.add_argument("--special-rate", type=float, default=0.0)
    parser.add_argument("--logprobs-mode", choices=["raw", "processed", "processed_logprobs"], default="raw")
    parser.add_argument("--batch-knee", type=int, default=0)
    parser.add_argument("--stop-check", choices=["v1", "v0"], default="v1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    settings = Settings(
        role=args.role, agreement=args.agreement, seed=args.seed, eos_rate=args.eos_rate, pass_ms=args.pass_ms,
        prefill_ms_per_token=args.prefill_ms_per_token, tokenizer_variant=args.tokenizer_variant,
        max_model_len=args.max_model_len, max_logprobs=args.max_logprobs, model_name=f"toy-{args.role}",
        default_temperature=args.default_temperature, default_repetition_penalty=args.default_repetition_penalty,
        flatness=args.flatness, cleanup=bool(args.cleanup), special_rate=args.special_rate,
        logprobs_mode=args.logprobs_mode, batch_knee=args.batch_knee, stop_check=args.stop_check,
    )  # fmt: skip
    return settings, args.port


async def _serve(settings: Settings, port: int) -> None:
    runner = web.AppRunner(build_app(settings), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {bound}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    settings, port = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        asyncio.run(_serve(settings, port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
