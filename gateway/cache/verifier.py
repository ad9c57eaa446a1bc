"""The semantic cache's second stage: does one answer serve both prompts?

An embedding puts "what is 17 × 23?" beside "what is 17 × 24?" and a reworded question
further away than both, so the vector search only *proposes* candidates. A cross-encoder
(``router_models/verifier_train.py``) reads the stored prompt and the new one together,
as one token sequence, and gives the probability that they share an answer; a hit needs
it at or above the policy's ``verify_threshold``. It reads only what differs: sentences
both prompts open or close with are left out (:func:`gateway.cache.structure.differing_parts`).
It was trained on both orders of each pair and reads one, ``[CLS] new [SEP] stored
[SEP]``: with the shipped verifier, judging both orders (their mean or their minimum) never
served fewer than the 3 development near misses of 592 that one order serves at 0.99, and
served fewer paraphrases there (64.9 % or 62.5 % against 67.6 %), at twice the cost.

Inference runs off the event loop in one dedicated thread; a lookup sends all of its
candidates in one batch. A pair whose differing parts are longer than the model's window
is not judged at all (:attr:`Verdict.unsure`): what it could not read may be what differs.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from gateway.cache.structure import differing_parts
from gateway.inference import ArtifactError, OnnxModel, load_onnx_model

__all__ = ["DEFAULT_ARTIFACTS", "PairVerifier", "Verdict", "load_verifier"]

DEFAULT_ARTIFACTS = Path(__file__).parent / "artifacts"

_log = structlog.get_logger("gateway.cache")


@dataclass(frozen=True, slots=True)
class Verdict:
    p_same: float
    unsure: bool = False
    """The pair did not fit the model's window: treat as different."""


_CLOSING_MARKS = re.compile(r"[\s?.!。？！]+$")


_OPENING_FILLER = re.compile(
    r"^\s*(?:(?:hey|hi|hello|pls|please|plz|quick question|ok|okay|so)\b[\s,:;!.-]*)+", re.IGNORECASE
)
_CLOSING_FILLER = re.compile(
    r"[\s,;:-]*\b(?:pls|please|plz|thanks|thank you|thx|ty)\b(?=[\s?.!。？！]*$)", re.IGNORECASE
)


def _without_fillers(text: str) -> str:
    """The text without a greeting or courtesy word at either end ("hey ...", "... thanks"): the
    verifier took one added on one side only for a rewording, as it took a closing "?" (t122: one
    such word served 14-16 of 20 one-edit near misses that it refused without it)."""
    bare = _CLOSING_FILLER.sub("", _OPENING_FILLER.sub("", text))
    return bare if bare.strip() else text


def _same_ending(stored: str, new: str) -> tuple[str, str]:
    """The pair with one closing run of marks, ``?`` if either asks: the verifier learnt that a
    closing ``?`` on one side only marks a paraphrase (in its training pairs only rewordings
    dropped it), and served 138 of 258 development near misses that end in ``?`` once the stored
    one lacked it (2 with both marks alike, as now). ``??`` against ``?`` differs as much."""
    stored_run, new_run = _closing_run(stored), _closing_run(new)
    if stored_run == new_run:
        return stored, new
    mark = "?" if any(q in stored_run + new_run for q in "?？") else ""
    return _CLOSING_MARKS.sub("", stored) + mark, _CLOSING_MARKS.sub("", new) + mark


def _closing_run(text: str) -> str:
    found = _CLOSING_MARKS.search(text)
    return "".join(found.group(0).split()) if found else ""


class PairVerifier:
    """Loaded verifier. Build it with :func:`load_verifier`."""

    def __init__(self, model: OnnxModel) -> None:
        self._session = model.session
        self._tokenizer = model.tokenizer
        self.max_tokens = int(model.config["max_tokens"])
        self.provider = model.provider
        self.version = model.version
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-verifier")

    def judge_sync(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (stored prompt, new prompt) pairs, on the calling thread."""
        if not pairs:
            return []
        read = [
            differing_parts(*_same_ending(_without_fillers(stored), _without_fillers(new)))[::-1]
            for stored, new in pairs
        ]
        with self._lock:
            encodings = self._tokenizer.encode_batch(read)
        fits = [len(e.ids) <= self.max_tokens for e in encodings]
        judged = [e for e, ok in zip(encodings, fits, strict=True) if ok]
        if not judged:
            return [Verdict(0.0, unsure=True) for _ in pairs]
        width = max(len(e.ids) for e in judged)
        ids = np.zeros((len(judged), width), dtype=np.int64)
        types = np.zeros((len(judged), width), dtype=np.int64)
        mask = np.zeros((len(judged), width), dtype=np.int64)
        for i, e in enumerate(judged):
            k = len(e.ids)
            ids[i, :k], types[i, :k], mask[i, :k] = e.ids, e.type_ids, 1
        (p,) = self._session.run(["p_same"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        scores = iter(np.asarray(p, dtype=np.float32).reshape(-1).tolist())
        return [Verdict(next(scores)) if ok else Verdict(0.0, unsure=True) for ok in fits]

    async def judge(self, pairs: list[tuple[str, str]], deadline: float | None = None) -> list[Verdict]:
        """``deadline`` (``time.monotonic()``, the event loop's clock): a batch whose turn in the one
        thread comes after it is not run (TimeoutError): its lookup has given up, and under load the
        thread would otherwise spend itself on verdicts no one waits for, and every later lookup
        would time out too (t87)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._judge_until, pairs, deadline)

    def _judge_until(self, pairs: list[tuple[str, str]], deadline: float | None) -> list[Verdict]:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError
        return self.judge_sync(pairs)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "version": self.version, "max_tokens": self.max_tokens}


def load_verifier(
    directory: str | Path = DEFAULT_ARTIFACTS, *, prefer_gpu: bool = True, intra_op_threads: int | None = None
) -> PairVerifier | None:
    """None (logged as ``cache_verifier_unavailable``) when the artifacts cannot be used:
    the semantic cache then serves no hits at all, rather than unverified ones."""
    try:
        model = load_onnx_model(directory, prefer_gpu=prefer_gpu, intra_op_threads=intra_op_threads)
    except ArtifactError as exc:
        _log.warning("cache_verifier_unavailable", reason=exc.reason, **exc.details)
        return None
    try:
        verifier = PairVerifier(model)
        verifier.judge_sync([("warm up", "warm up")])
    except Exception as exc:
        _log.warning("cache_verifier_unavailable", reason="load_failed", path=str(directory), error=repr(exc))
        return None
    _log.info("cache_verifier_loaded", **verifier.describe(), threads=model.threads, why_not_cuda=model.why_not_cuda)
    return verifier
