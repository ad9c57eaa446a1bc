"""Semantic cache benchmark: answer quality (hits and false hits, with and without the
guard) on a rule-built test set, lookup latency with the embedding, and VSIM at 100k.

Run: ``nice -n 10 python -m tests.bench.semantic_cache_bench`` (2 cores: about 2.5
minutes on a quiet machine, 4.5 with a training job beside it; most of it is inserting
100,000 vectors; ``--help`` for the options; ``--quant Q8,NOQUANT`` adds the unquantized
set, about 2 minutes more; ``--vectors 20000`` for a quick run).

Method
------
* Test set: ``tests/bench/semantic_testset.py`` (400 originals from
  ``../shared/data/routing/`` or ``--data``, 3 positive and 3 negative variants each, 600
  distractors, seeded), plus 30 hand-written paraphrase pairs and 30 hand-written near
  misses.
* Embeddings: the router's ONNX model (``--artifacts``, CPU provider, as the gateway
  runs it without a GPU), ``score_batch_sync`` one prompt at a time, as the gateway
  embeds a request when it is not busy. (The int8 graph quantizes activations per
  batch, padding included, so the same prompt embedded inside a batch of 32 comes out
  at cosine 0.986-1.0 to itself alone: batching would add that noise.)
* Quality, per pair (original cached, variant asked): cosine of the two embeddings. At
  threshold t a positive is a *hit* when cosine >= t (and, with the guard, the guard
  allows it); a negative is a *false hit* under the same condition. Hit rate = hits /
  positives, false-hit rate = false hits / negatives. Thresholds 0.80 ... 0.99.
  **Recommended threshold**: the one with the highest hit rate (with the guard) among
  those whose false-hit rate with the guard is <= ``--max-false-hit`` (1%); since both
  rates fall as t rises, that is the lowest such t.
* Guards compared: ``none``; ``v0``, the guard as first committed (numbers, quotes, code,
  case-sensitive names, options; copied below); ``rules``, the current guard without its
  lexical rule; ``full``, the current guard (``gateway/cache/guard.py``). Per rule: how
  many negatives it refuses (and how many only it refuses), how many positives it
  refuses (false refusals), over all pairs whatever their cosine.
* Cache simulation: the 1,000 originals and distractors (plus the first prompt of each
  hand-written pair) in an exact top-4 index (numpy; what VSIM approximates); every
  variant is looked up the way ``SemanticCache.lookup`` does it (best first, stop below
  the threshold, skip what the guard refuses, serve the first allowed): a positive
  served from its own original is a hit, from another entry a wrong hit; a negative
  served from anything is a false hit. Also each original against the index without
  itself: any hit is a false hit between two different questions.
* Latency: a real Redis 8 (embedded), ``SemanticCache.store`` of those ~1,000 entries in
  one vector set; ``--lookups`` lookups alone (embeddings computed beforehand), then the
  same requests sequentially (after 20 warm-ups), each
  ``await classifier.score(messages)`` (the gateway's micro-batched path, 1 ms batching
  wait included) + ``await SemanticCache.lookup(...)`` at the recommended threshold with
  the guard and a 50 ms Redis timeout, as the pipeline does. p50/p99 of embedding,
  lookup and the sum, overall and by prompt length (tokens the model sees). Twice: with
  onnxruntime's defaults (as ``load_classifier`` builds the session: its intra-op threads
  spin-wait after each run) and with ``session.intra_op.allow_spinning=0``.
* VSIM at 100,000: vectors mixed from the real embeddings (``a*e_i + (1-a)*e_j`` plus
  noise, renormalized; a nearest neighbour at cosine ~0.85, like real prompts) added with
  pipelined ``VADD ... FP32`` (1,000 per pipeline; time and rate), per quantization in
  ``--quant`` (default Q8, Redis' default). Then ``--vsim-queries`` fresh vectors, each
  ``VSIM key FP32 <blob> WITHSCORES COUNT 4`` from a Python client (client p50/p99;
  a ``PING`` round trip is given for scale) and the server's own time per call
  (``INFO commandstats``). recall@1 = VSIM's first result equals the exact nearest
  neighbour (numpy over the float32 vectors); also for 500 near duplicates (a stored
  vector plus noise, cosine ~0.97: what a cache hit looks like). Also ``SemanticCache.lookup`` at 100k
  (no embedding) for 200 of those queries.
* One run on a shared machine: the load average and core count are recorded; compare
  figures only within one run.

Results: tables on stdout and ``bench-results/semantic-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pickle
import platform
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script: make `gateway` and `tests` importable
    sys.path.insert(0, str(_ROOT))

from gateway.cache import guard as guard_module  # noqa: E402
from gateway.cache.guard import guard_allows, refusal_reasons  # noqa: E402
from tests.bench.semantic_testset import (  # noqa: E402
    DEFAULT_DATA,
    NEAR_MISSES,
    PARAPHRASES,
    TestSet,
    Variant,
    build_testset,
)

RULES = ["code", "quote", "option", "num", "numword", "unit", "neg", "polar", "name", "lexical"]
GUARDS = ["none", "v0", "rules", "full"]


class Pair(TypedDict):
    """A test-set variant scored against its original (the original cached, the variant asked)."""

    v: Variant
    cos: float
    allowed: dict[str, bool]  # guard name -> whether that guard serves the cached answer
    reasons: list[str]  # the current guard's rules that refuse the pair
    source: str
    long: bool  # one of the two prompts fills the embedding's token window


class HandwrittenRow(TypedDict):
    cached: str
    asked: str
    cos: float
    guard: bool
    guard_rules: bool
    reasons: list[str]


# ------------------------------------------------------------ the guard as first committed (v0)

_V0_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
_V0_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|‘([^’\n]{1,200})’|(?<!\w)'([^'\n]{1,200})'(?!\w)")
_V0_NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:[.,]\d+)*(?:/\d+)?%?")
_V0_NUMBER_WORDS = re.compile(
    r"\b(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|"
    r"seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|million|"
    r"billion|half|twice|double|triple|first|second|third|fourth|fifth|tenth)\b",
    re.I,
)
_V0_OPTION = re.compile(r"(?m)^\s*\(?([A-Ja-j])[).:]\s+(.+?)\s*$")
_V0_WORD = re.compile(r"[A-Za-z][\w'’-]*")
_V0_SENTENCE_START = re.compile(r"(?:^|[.!?\n]\s*|[\"“(]\s*)$")
_V0_COMMON = frozenset(
    [
        "I",
        "A",
        "An",
        "The",
        "What",
        "Which",
        "Who",
        "Whom",
        "Whose",
        "Why",
        "How",
        "When",
        "Where",
        "Is",
        "Are",
        "Was",
        "Were",
        "Do",
        "Does",
        "Did",
        "Can",
        "Could",
        "Should",
        "Would",
        "Will",
        "Please",
        "Explain",
        "Tell",
        "Give",
        "List",
        "Describe",
        "Write",
        "Find",
        "Calculate",
        "Compute",
        "Answer",
        "Question",
        "Options",
        "Choose",
        "Select",
        "True",
        "False",
        "Yes",
        "No",
        "If",
        "In",
        "On",
        "At",
        "Of",
        "For",
        "To",
        "From",
        "By",
        "With",
        "And",
        "Or",
        "But",
        "Not",
        "All",
        "None",
        "Both",
        "Neither",
        "Let",
        "Suppose",
        "Assume",
        "Consider",
        "Given",
        "Then",
        "Thus",
        "So",
        "It",
        "This",
        "That",
        "These",
        "Those",
        "There",
        "Here",
        "My",
        "Your",
        "Our",
        "Their",
        "His",
        "Her",
        "Its",
        "We",
        "You",
        "They",
        "He",
        "She",
    ]
)


def v0_determinants(prompt: str) -> Counter[str]:
    text = unicodedata.normalize("NFKC", prompt).replace("−", "-")
    found: Counter[str] = Counter()
    for block in _V0_CODE.findall(text):
        found["code:" + " ".join(block.strip("`").split())] += 1
    text = _V0_CODE.sub(" ", text)
    for match in _V0_QUOTED.finditer(text):
        quoted = next(g for g in match.groups() if g is not None)
        found["quote:" + " ".join(quoted.lower().split())] += 1
    for letter, option in _V0_OPTION.findall(text):
        found[f"option:{letter.upper()}:" + " ".join(option.lower().split())] += 1
    for number in _V0_NUMBER.findall(text):
        found["num:" + number.replace(",", "").rstrip(".")] += 1
    for word in _V0_NUMBER_WORDS.findall(text):
        found["numword:" + word.lower()] += 1
    for match in _V0_WORD.finditer(text):
        word = match.group(0)
        if word[0].isupper() and word not in _V0_COMMON and not _V0_SENTENCE_START.search(text[: match.start()]):
            found["name:" + word] += 1
    return found


def v0_allows(new: str, cached: str) -> bool:
    return v0_determinants(new) == v0_determinants(cached)


def allows(guard: str, new: str, cached: str, long: bool = False) -> bool:
    """``long``: a prompt filled the embedding's window, as the gateway tells the guard."""
    if guard == "none":
        return True
    if guard == "v0":
        return v0_allows(new, cached)
    return guard_allows(new, cached, lexical=guard == "full", beyond_window=long)


# ----------------------------------------------------------------------------- helpers


def pct(xs: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def embed_all(
    clf: Any, texts: list[str], cache_path: Path | None, model_sha: str
) -> tuple[dict[str, np.ndarray], float]:
    store: dict[str, dict[str, np.ndarray]] = {}
    if cache_path is not None and cache_path.exists():
        store = pickle.loads(cache_path.read_bytes())
    known = store.setdefault(model_sha, {})
    todo = [t for t in dict.fromkeys(texts) if t not in known]
    start = time.perf_counter()
    for text in todo:  # one at a time: int8 activations are quantized per batch, so a batch changes the embedding
        known[text] = np.asarray(clf.score_batch_sync([text])[0].embedding, dtype=np.float32)
    elapsed = time.perf_counter() - start
    if cache_path is not None and todo:
        cache_path.write_bytes(pickle.dumps({model_sha: known}))
    return known, (elapsed / len(todo) * 1000 if todo else float("nan"))


# ----------------------------------------------------------------------------- quality


def quality(ts: TestSet, emb: dict[str, np.ndarray], thresholds: list[float], max_false_hit: float,
            tokens: dict[str, int], window: int) -> dict[str, Any]:  # fmt: skip
    originals = {o.id: o for o in ts.originals}
    pairs: list[Pair] = []
    for v in ts.variants:
        o = originals[v.original_id]
        cosine = float(emb[o.prompt] @ emb[v.text])
        long = max(tokens[o.prompt], tokens[v.text]) >= window
        allowed = {g: allows(g, v.text, o.prompt, long) for g in GUARDS}
        reasons = refusal_reasons(v.text, o.prompt, beyond_window=long)
        pairs.append({"v": v, "cos": cosine, "allowed": allowed, "reasons": reasons, "source": o.source, "long": long})
    pos = [p for p in pairs if p["v"].positive]
    neg = [p for p in pairs if not p["v"].positive]

    def rate(rows: list[Pair], t: float, g: str) -> float:
        return sum(r["cos"] >= t and r["allowed"][g] for r in rows) / max(len(rows), 1)

    sweep = []
    for t in thresholds:
        row = {"threshold": t}
        for g in GUARDS:
            row[f"hit_{g}"] = rate(pos, t, g)
            row[f"false_hit_{g}"] = rate(neg, t, g)
        sweep.append(row)
    recommended = {}
    for g in GUARDS:
        ok = [r for r in sweep if r[f"false_hit_{g}"] <= max_false_hit]
        recommended[g] = max(ok, key=lambda r: (r[f"hit_{g}"], -r["threshold"]))["threshold"] if ok else None
    chosen = recommended["full"] if recommended["full"] is not None else thresholds[-1]
    # the same, for prompts that fit the embedding's window (a longer prompt's tail is invisible to it)
    short_pos = [p for p in pos if not p["long"]]
    short_neg = [p for p in neg if not p["long"]]
    window_sweep = []
    for t in thresholds:
        window_sweep.append({
            "threshold": t,
            "hit_full_short": rate(short_pos, t, "full"), "false_hit_full_short": rate(short_neg, t, "full"),
            "hit_full_long": rate([p for p in pos if p["long"]], t, "full"),
            "false_hit_full_long": rate([p for p in neg if p["long"]], t, "full"),
        })  # fmt: skip
    ok = [r for r in window_sweep if r["false_hit_full_short"] <= max_false_hit]
    recommended_short = min(r["threshold"] for r in ok) if ok else None

    def per_transform(t: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        groups: dict[tuple[bool, str], list[Pair]] = defaultdict(list)
        for p in pairs:
            groups[(p["v"].positive, p["v"].transform)].append(p)
        for (positive, name), rows in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            cos = [r["cos"] for r in rows]
            entry = {"kind": "positive" if positive else "negative", "n": len(rows), "cos_p10": pct(cos, 10),
                     "cos_p50": pct(cos, 50), "cos_min": min(cos)}  # fmt: skip
            for g in GUARDS:
                entry[f"{'hit' if positive else 'false_hit'}_{g}"] = rate(rows, t, g)
            entry["guard_refuses"] = sum(not r["allowed"]["full"] for r in rows) / len(rows)
            out[f"{'+' if positive else '-'}{name}"] = entry
        return out

    rules: dict[str, dict[str, int]] = {}
    for rule in RULES:
        rules[rule] = {
            "negatives_refused": sum(rule in p["reasons"] for p in neg),
            "negatives_refused_only_by_it": sum(p["reasons"] == [rule] for p in neg),
            "positives_refused": sum(rule in p["reasons"] for p in pos),
            "positives_refused_only_by_it": sum(p["reasons"] == [rule] for p in pos),
        }
    guards = {
        g: {"positives_allowed": sum(p["allowed"][g] for p in pos) / len(pos),
            "negatives_refused": sum(not p["allowed"][g] for p in neg) / len(neg)}
        for g in GUARDS
    }  # fmt: skip
    reverse = {
        "positives_allowed": sum(guard_allows(originals[p["v"].original_id].prompt, p["v"].text) for p in pos)
        / len(pos),
        "negatives_refused": sum(not guard_allows(originals[p["v"].original_id].prompt, p["v"].text) for p in neg)
        / len(neg),
    }
    leaks = [
        {"transform": p["v"].transform, "detail": p["v"].detail, "cos": round(p["cos"], 4), "long": p["long"]}
        for p in neg if p["allowed"]["full"] and p["cos"] >= chosen
    ]  # fmt: skip
    refused = [
        {"transform": p["v"].transform, "detail": p["v"].detail, "reasons": p["reasons"]}
        for p in pos if not p["allowed"]["full"]
    ]  # fmt: skip
    return {
        "pairs": {"positives": len(pos), "negatives": len(neg)},
        "sweep": sweep,
        "recommended": recommended,
        "chosen": chosen,
        "window_tokens": window,
        "pairs_longer_than_window": {"positives": len(pos) - len(short_pos), "negatives": len(neg) - len(short_neg)},
        "window_sweep": window_sweep,
        "recommended_if_only_prompts_within_window": recommended_short,
        "per_transform_at_chosen": per_transform(chosen),
        "per_transform_at_0.92": per_transform(0.92),
        "rules": rules,
        "guards": guards,
        "guard_reverse_direction": reverse,
        "false_hits_at_chosen_with_guard": leaks,
        "positives_refused_by_guard": Counter(r["transform"] for r in refused),
        "positives_refused_examples": refused[:20],
    }


def handwritten(emb: dict[str, np.ndarray], thresholds: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pairs in (("paraphrases", PARAPHRASES), ("near_misses", NEAR_MISSES)):
        rows: list[HandwrittenRow] = [{"cached": a, "asked": b, "cos": float(emb[a] @ emb[b]), "guard": guard_allows(b, a),
                 "guard_rules": guard_allows(b, a, lexical=False), "reasons": refusal_reasons(b, a)}
                for a, b in pairs]  # fmt: skip
        out[name] = {
            "rows": rows,
            "cos_p50": pct([r["cos"] for r in rows], 50),
            "rate": {f"{t:.2f}": {"none": sum(r["cos"] >= t for r in rows) / len(rows),
                                  "rules": sum(r["cos"] >= t and r["guard_rules"] for r in rows) / len(rows),
                                  "full": sum(r["cos"] >= t and r["guard"] for r in rows) / len(rows)}
                     for t in thresholds},
        }  # fmt: skip
    return out


def cache_simulation(ts: TestSet, emb: dict[str, np.ndarray], threshold: float, tokens: dict[str, int], window: int,
                     count: int = 4) -> dict[str, Any]:  # fmt: skip
    entries = [o.prompt for o in ts.originals] + list(ts.distractors) + [a for a, _ in PARAPHRASES + NEAR_MISSES]
    entries = list(dict.fromkeys(entries))
    index = {text: i for i, text in enumerate(entries)}
    matrix = np.stack([emb[t] for t in entries])
    originals = {o.id: o for o in ts.originals}

    def lookup(query: str, exclude: int | None, guard: str) -> int | None:
        scores = matrix @ emb[query]
        if exclude is not None:
            scores[exclude] = -2.0
        for i in np.argsort(-scores)[:count]:
            if scores[i] < threshold:
                return None
            if allows(guard, query, entries[i], max(tokens[query], tokens[entries[i]]) >= window):
                return int(i)
        return None

    out: dict[str, Any] = {"entries": len(entries), "threshold": threshold}
    for guard in ("none", "full"):
        c: Counter[str] = Counter()
        for v in ts.variants:
            hit = lookup(v.text, None, guard)
            own = index[originals[v.original_id].prompt]
            if v.positive:
                c["positive_hit" if hit == own else "positive_miss" if hit is None else "positive_wrong_hit"] += 1
            else:
                c["negative_miss" if hit is None else "negative_false_hit"] += 1
        for o in ts.originals:
            c["distinct_false_hit" if lookup(o.prompt, index[o.prompt], guard) is not None else "distinct_miss"] += 1
        for a, b in PARAPHRASES:
            hit = lookup(b, None, guard)
            c[
                "hand_paraphrase_hit"
                if hit == index[a]
                else "hand_paraphrase_miss"
                if hit is None
                else "hand_paraphrase_wrong_hit"
            ] += 1
        for _, b in NEAR_MISSES:
            c["hand_near_miss_false_hit" if lookup(b, None, guard) is not None else "hand_near_miss_miss"] += 1
        n_pos = sum(v.positive for v in ts.variants)
        n_neg = len(ts.variants) - n_pos
        out[guard] = {
            **dict(sorted(c.items())),
            "hit_rate": c["positive_hit"] / n_pos,
            "false_hit_rate": (c["negative_false_hit"] + c["positive_wrong_hit"]) / len(ts.variants),
            "negative_false_hit_rate": c["negative_false_hit"] / n_neg,
            "distinct_false_hit_rate": c["distinct_false_hit"] / len(ts.originals),
        }
    return out


def guard_cost(ts: TestSet, n: int = 2000) -> dict[str, float]:
    originals = {o.id: o for o in ts.originals}
    pairs = [(v.text, originals[v.original_id].prompt) for v in ts.variants[:n]]
    cold = []
    for a, b in pairs:
        guard_module._analyse.cache_clear()
        start = time.perf_counter()
        guard_allows(a, b)
        cold.append((time.perf_counter() - start) * 1e6)
    warm = []
    for a, b in pairs:
        guard_allows(a, b)
        start = time.perf_counter()
        guard_allows(a, b)
        warm.append((time.perf_counter() - start) * 1e6)
    return {"cold_p50_us": pct(cold, 50), "cold_p99_us": pct(cold, 99), "warm_p50_us": pct(warm, 50),
            "mean_prompt_chars": float(np.mean([len(a) + len(b) for a, b in pairs]) / 2)}  # fmt: skip


# ----------------------------------------------------------------------------- latency


async def lookup_latency(clf: Any, ts: TestSet, emb: dict[str, np.ndarray], redis_url: str, threshold: float,
                         lookups: int, seed: int) -> dict[str, Any]:  # fmt: skip
    from gateway.accounting.metrics import Metrics
    from gateway.cache.entries import CachedAnswer
    from gateway.cache.semantic import SemanticCache
    from gateway.store import keyspace
    from gateway.store.redis import RedisVectorIndex, SharedRedis, connect

    client = connect(redis_url, timeout_s=1.0)
    cache = SemanticCache(RedisVectorIndex(SharedRedis(client, Metrics())))
    set_key = keyspace.semantic_index("bench", "latency")
    entries = list(dict.fromkeys([o.prompt for o in ts.originals] + list(ts.distractors) + [a for a, _ in PARAPHRASES]))
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x" * 400}}]}).encode()
    store_ms = []
    for text in entries:
        answer = CachedAnswer(body=body, model="m", provider="p", prompt_tokens=100, completion_tokens=100,
                              cost_usd=0.001, created_at=time.time(), prompt=text)  # fmt: skip
        start = time.perf_counter()
        await cache.store(set_key, emb[text], answer, 3600, 100_000, 1.0)
        store_ms.append((time.perf_counter() - start) * 1000)
    rng = np.random.default_rng(seed)
    positives = [v.text for v in ts.variants if v.positive]
    negatives = [v.text for v in ts.variants if not v.positive]
    queries = (list(rng.choice(positives, lookups // 2, replace=False)) + list(rng.choice(negatives, lookups // 3, replace=False))
               + [b for _, b in PARAPHRASES + NEAR_MISSES])  # fmt: skip
    queries = queries[:lookups]
    rng.shuffle(queries)
    queries = [str(x) for x in queries]
    alone = []
    for q in queries:  # the lookup by itself, the embedding computed beforehand
        start = time.perf_counter()
        await cache.lookup(set_key, emb[q], q, threshold, True, 0.05)
        alone.append((time.perf_counter() - start) * 1000)
    rows = []
    for i, q in enumerate(queries[:20] + queries):
        messages = [{"role": "user", "content": q}]
        t0 = time.perf_counter()
        score = await clf.score(messages)
        t1 = time.perf_counter()
        found = await cache.lookup(set_key, score.embedding, q, threshold, True, 0.05)
        t2 = time.perf_counter()
        if i >= 20:
            tokens = len(clf._tokenizer.encode(q).ids)
            rows.append({"embed": (t1 - t0) * 1000, "lookup": (t2 - t1) * 1000, "total": (t2 - t0) * 1000,
                         "tokens": tokens, "hit": found.hit is not None, "timeout": found.best_similarity is None,
                         "refused": found.refused_by_guard})  # fmt: skip
    await client.aclose()

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        if not rs:
            return {"n": 0}
        return {"n": len(rs), **{f"{k}_{q}": pct([r[k] for r in rs], n) for k in ("embed", "lookup", "total")
                                 for q, n in (("p50", 50), ("p99", 99))}}  # fmt: skip

    buckets = {"<=32 tokens": [r for r in rows if r["tokens"] <= 32],
               "33-64 tokens": [r for r in rows if 32 < r["tokens"] <= 64],
               "65-128 tokens": [r for r in rows if r["tokens"] > 64]}  # fmt: skip
    return {
        "entries": len(entries),
        "store_p50_ms": pct(store_ms, 50),
        "store_p99_ms": pct(store_ms, 99),
        "all": summary(rows),
        "hits": summary([r for r in rows if r["hit"]]),
        "misses": summary([r for r in rows if not r["hit"]]),
        **{k: summary(v) for k, v in buckets.items()},
        "lookup_alone_p50_ms": pct(alone, 50),
        "lookup_alone_p99_ms": pct(alone, 99),
        "hit_share": sum(r["hit"] for r in rows) / len(rows),
        "guard_refusals": sum(r["refused"] for r in rows),
        "timeouts": sum(r["timeout"] for r in rows),
        "tokens_p50": pct([r["tokens"] for r in rows], 50),
    }


def load_without_spinning(artifacts: Path) -> Any:
    """The classifier as ``load_classifier`` builds it, but with onnxruntime's intra-op
    threads told not to spin-wait after a run (``session.intra_op.allow_spinning=0``)."""
    import onnxruntime as ort

    from gateway.classifier import load_classifier

    original = ort.SessionOptions

    class NoSpin(original):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.add_session_config_entry("session.intra_op.allow_spinning", "0")

    ort.SessionOptions = NoSpin
    try:
        return load_classifier(artifacts, prefer_gpu=False)
    finally:
        ort.SessionOptions = original


def realish_vectors(anchors: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    i = rng.integers(0, len(anchors), n)
    j = rng.integers(0, len(anchors), n)
    a = rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, anchors.shape[1])).astype(np.float32) * np.float32(0.3 / np.sqrt(anchors.shape[1]))
    x = a * anchors[i] + (1 - a) * anchors[j] + noise
    unit: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return unit


def vsim_phase(redis_url: str, anchors: np.ndarray, n: int, n_queries: int, quant: str, seed: int) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(redis_url)
    command: Callable[..., Any] = r.execute_command  # redis-py leaves execute_command unannotated
    rng = np.random.default_rng(seed)
    vectors = realish_vectors(anchors, n, rng)
    queries = realish_vectors(anchors, n_queries, rng)
    key = f"gw:{{bench}}:v:vsim-{quant.lower()}"
    r.delete(key)
    start = time.perf_counter()
    for s in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        queue: Callable[..., Any] = pipe.execute_command  # unannotated in redis-py, as above
        for i in range(s, min(n, s + 1000)):
            queue("VADD", key, "FP32", vectors[i].tobytes(), f"e{i}", quant)
        pipe.execute()
    insert_s = time.perf_counter() - start
    info = command("VINFO", key)
    memory = command("MEMORY", "USAGE", key)
    ping = []
    for _ in range(200):
        t0 = time.perf_counter()
        r.ping()
        ping.append((time.perf_counter() - t0) * 1000)
    r.config_resetstat()
    lat, firsts = [], []
    for q in queries:
        t0 = time.perf_counter()
        found = command("VSIM", key, "FP32", q.tobytes(), "WITHSCORES", "COUNT", 4)
        lat.append((time.perf_counter() - t0) * 1000)
        pairs = list(found.items()) if isinstance(found, dict) else list(zip(found[::2], found[1::2], strict=False))
        best = max(pairs, key=lambda kv: float(kv[1]))[0] if pairs else b"e-1"
        firsts.append(int((best.decode() if isinstance(best, bytes) else str(best))[1:]))
    stats = r.info("commandstats")
    server = stats.get("cmdstat_VSIM") or stats.get("cmdstat_vsim") or {}
    truth = np.concatenate([np.argmax(queries[s : s + 250] @ vectors.T, axis=1) for s in range(0, n_queries, 250)])
    recall = float(np.mean(np.asarray(firsts) == truth))
    # near duplicates (what a cache hit looks like): a stored vector plus noise, cosine ~0.94-0.99 to it
    picked = rng.integers(0, n, 500)
    noise = rng.standard_normal((500, vectors.shape[1])).astype(np.float32) / np.float32(np.sqrt(vectors.shape[1]))
    near = vectors[picked] + noise * rng.uniform(0.15, 0.35, (500, 1)).astype(np.float32)
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
    near_truth = np.argmax(near @ vectors.T, axis=1)
    near_first = []
    for q in near:
        found = command("VSIM", key, "FP32", q.tobytes(), "WITHSCORES", "COUNT", 4)
        pairs = list(found.items()) if isinstance(found, dict) else list(zip(found[::2], found[1::2], strict=False))
        best = max(pairs, key=lambda kv: float(kv[1]))[0] if pairs else b"e-1"
        near_first.append(int((best.decode() if isinstance(best, bytes) else str(best))[1:]))
    near_recall = float(np.mean(np.asarray(near_first) == near_truth))
    near_cos = float(np.median(np.sum(near * vectors[near_truth], axis=1)))
    r.close()
    return {
        "quant": quant, "n": n, "insert_s": insert_s, "insert_per_s": n / insert_s,
        "memory_mb": memory / 1e6 if memory else None,
        "vinfo": {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in (info.items() if isinstance(info, dict) else zip(info[::2], info[1::2], strict=False))},
        "queries": n_queries, "vsim_client_p50_ms": pct(lat, 50), "vsim_client_p99_ms": pct(lat, 99),
        "vsim_server_usec_per_call": server.get("usec_per_call"), "ping_p50_ms": pct(ping, 50),
        "recall_at_1": recall, "recall_at_1_near_duplicates": near_recall, "near_duplicate_cos_p50": near_cos,
        "key": key, "queries_sample": queries[:200],
    }  # fmt: skip


async def lookup_at_scale(redis_url: str, key: str, queries: np.ndarray, threshold: float) -> dict[str, float]:
    from gateway.accounting.metrics import Metrics
    from gateway.cache.semantic import SemanticCache
    from gateway.store.redis import RedisVectorIndex, SharedRedis, connect

    client = connect(redis_url, timeout_s=1.0)
    cache = SemanticCache(RedisVectorIndex(SharedRedis(client, Metrics())))
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        await cache.lookup(key, q, "bench", threshold, True, 1.0)  # threshold > 1: VSIM and its reply only
        lat.append((time.perf_counter() - t0) * 1000)
    await client.aclose()
    return {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


# ----------------------------------------------------------------------------- report


def print_report(res: dict[str, Any]) -> None:
    m = res["model"]
    print(f"\nmodel: {m['artifacts']} config.json sha256 {m['config_sha256'][:16]} ({m['train_command']})")
    print(f"machine: {res['machine']['cores_usable']} cores ({res['machine']['cpu']}), "
          f"load average at start {res['machine']['loadavg_at_start'][0]:.1f}")  # fmt: skip
    if "quality" in res:
        q = res["quality"]
        print(f"\ntest set: {json.dumps(res['testset'])}")
        print(f"embedding, one prompt at a time: {res['embed_ms_per_prompt']:.1f} ms/prompt")
        print(f"\nQUALITY per pair ({q['pairs']['positives']} positives, {q['pairs']['negatives']} negatives); "
              "hit = positive served, false hit = negative served")  # fmt: skip
        print("thresh | hit: none    v0  rules  full | false hit: none    v0  rules  full")
        for r in q["sweep"]:
            print(f" {r['threshold']:.2f}  |      " + " ".join(f"{r['hit_' + g]:5.1%}" for g in GUARDS)
                  + " |            " + " ".join(f"{r['false_hit_' + g]:5.1%}" for g in GUARDS))  # fmt: skip
        print(f"recommended (max hit rate with false hit <= {res['args']['max_false_hit']:.0%}): "
              + ", ".join(f"{g}: {t}" for g, t in q["recommended"].items()))  # fmt: skip
        lw = q["pairs_longer_than_window"]
        print(f"\nprompts longer than the embedding's {q['window_tokens']}-token window: {lw['positives']} positive and "
              f"{lw['negatives']} negative pairs; full guard, within the window / longer:")  # fmt: skip
        for r in q["window_sweep"]:
            if r["threshold"] in (0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98):
                print(f"  {r['threshold']:.2f}: hit {r['hit_full_short']:5.1%} / {r['hit_full_long']:5.1%}, "
                      f"false hit {r['false_hit_full_short']:5.1%} / {r['false_hit_full_long']:5.1%}")  # fmt: skip
        print(
            f"  recommended if prompts longer than the window were not cached: {q['recommended_if_only_prompts_within_window']}"
        )
        for label in ("at_chosen", "at_0.92"):
            t = q["chosen"] if label == "at_chosen" else 0.92
            print(f"\nper transformation at threshold {t:.2f} (rate = hit for +, false hit for -)")
            print(f"  {'transform':16s}    n  cos p10  p50 | none    v0  rules  full | guard refuses")
            for name, e in q[f"per_transform_{label}"].items():
                key = "hit" if e["kind"] == "positive" else "false_hit"
                print(f"  {name:16s} {e['n']:4d}  {e['cos_p10']:.3f} {e['cos_p50']:.3f} | "
                      + " ".join(f"{e[f'{key}_{g}']:5.1%}" for g in GUARDS) + f" | {e['guard_refuses']:5.1%}")  # fmt: skip
        print("\nguard rules over all pairs (whatever the cosine):")
        print(f"  {'rule':8s} negatives refused (only it) | positives refused (only it)")
        for rule, e in q["rules"].items():
            print(f"  {rule:8s} {e['negatives_refused']:6d} ({e['negatives_refused_only_by_it']:4d})"
                  f"             | {e['positives_refused']:5d} ({e['positives_refused_only_by_it']:3d})")  # fmt: skip
        for g, e in q["guards"].items():
            print(
                f"  guard {g:5s}: allows {e['positives_allowed']:.1%} of positives, refuses {e['negatives_refused']:.1%} of negatives"
            )
        rv = q["guard_reverse_direction"]
        print(f"  full guard, variant cached and original asked: allows {rv['positives_allowed']:.1%} of positives, "
              f"refuses {rv['negatives_refused']:.1%} of negatives")  # fmt: skip
        print(f"  guard cost: {json.dumps({k: round(v, 1) for k, v in res['guard_cost'].items()})}")
        h = res["handwritten"]
        for name in ("paraphrases", "near_misses"):
            rates = h[name]["rate"]
            shown = [k for k in rates if k in (f"{q['chosen']:.2f}", "0.92", "0.85")]
            print(f"  hand-written {name} (30): cos p50 {h[name]['cos_p50']:.3f}; served at "
                  + "; ".join(f"{k}: none {rates[k]['none']:.0%}, rules {rates[k]['rules']:.0%}, full {rates[k]['full']:.0%}" for k in shown))  # fmt: skip
        for _label, sim in res["cache_simulation"].items():
            print(f"\ncache simulation at {sim['threshold']:.2f} ({sim['entries']} entries, exact top-4):")
            for g in ("none", "full"):
                s = sim[g]
                print(f"  guard {g:4s}: hit rate {s['hit_rate']:.1%}, false hits: negatives {s['negative_false_hit_rate']:.1%}, "
                      f"positives served a wrong entry {s.get('positive_wrong_hit', 0)}, different questions "
                      f"{s['distinct_false_hit_rate']:.1%}, hand paraphrases hit {s.get('hand_paraphrase_hit', 0)}/30, "
                      f"hand near misses served {s.get('hand_near_miss_false_hit', 0)}/30")  # fmt: skip
    for label, title in (("latency", "onnxruntime defaults"), ("latency_no_spinning", "intra-op spinning off")):
        if label not in res:
            continue
        lat = res[label]
        print(f"\nLATENCY ({title}) embedding (await score) + SemanticCache.lookup, real Redis 8, {lat['entries']} "
              f"entries, threshold {lat['threshold']:.2f}, guard on; store p50 {lat['store_p50_ms']:.2f} ms; "
              f"lookup alone p50 {lat['lookup_alone_p50_ms']:.2f} p99 {lat['lookup_alone_p99_ms']:.2f} ms")  # fmt: skip
        print(f"  {'':14s}    n | embed p50   p99 | lookup p50   p99 | total p50   p99  (ms)")
        for k in ("all", "hits", "misses", "<=32 tokens", "33-64 tokens", "65-128 tokens"):
            s = lat[k]
            if s["n"]:
                print(f"  {k:14s} {s['n']:4d} |    {s['embed_p50']:6.2f} {s['embed_p99']:6.2f} |    {s['lookup_p50']:6.2f} "
                      f"{s['lookup_p99']:6.2f} |   {s['total_p50']:6.2f} {s['total_p99']:6.2f}")  # fmt: skip
        print(
            f"  hits {lat['hit_share']:.0%}, guard refusals {lat['guard_refusals']}, Redis timeouts {lat['timeouts']}"
        )
    for v in res.get("vsim", []):
        print(f"\nVSIM {v['quant']} at {v['n']:,} vectors: insert {v['insert_s']:.1f} s ({v['insert_per_s']:.0f}/s, "
              f"pipelined VADD), memory {v['memory_mb']:.0f} MB; {v['queries']} queries COUNT 4: client p50 "
              f"{v['vsim_client_p50_ms']:.3f} ms p99 {v['vsim_client_p99_ms']:.3f} ms (PING p50 {v['ping_p50_ms']:.3f} ms), "
              f"server {v['vsim_server_usec_per_call']} us/call; recall@1 {v['recall_at_1']:.3f}, near duplicates "
              f"(cos p50 {v['near_duplicate_cos_p50']:.3f}) {v['recall_at_1_near_duplicates']:.3f}")  # fmt: skip
        if "lookup" in v:
            print(f"  SemanticCache.lookup at {v['n']:,} (no embedding): p50 {v['lookup']['p50_ms']:.3f} ms "
                  f"p99 {v['lookup']['p99_ms']:.3f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--artifacts", default=str(_ROOT / "gateway" / "classifier" / "artifacts"))
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--per-prompt", type=int, default=3)
    parser.add_argument("--distractors", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", default="0.80:0.99:0.01", help="start:stop:step, inclusive")
    parser.add_argument("--max-false-hit", type=float, default=0.01)
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--vsim-queries", type=int, default=2000)
    parser.add_argument("--quant", default="Q8", help="comma-separated: Q8, NOQUANT, BIN")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: quality, latency, vsim")
    parser.add_argument("--embedding-cache", default=None, help="pickle of embeddings to reuse between runs")
    parser.add_argument("--out", default=str(_ROOT / "bench-results"))
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    lo, hi, step = (float(x) for x in args.thresholds.split(":"))
    thresholds = [round(t, 4) for t in np.arange(lo, hi + step / 2, step)]

    from gateway.classifier import load_classifier

    artifacts = Path(args.artifacts)
    config = json.loads((artifacts / "config.json").read_text())
    config_sha = sha256_file(artifacts / "config.json")
    clf = load_classifier(artifacts, prefer_gpu=False)
    if clf is None:
        raise SystemExit(f"no classifier in {artifacts}")
    res: dict[str, Any] = {
        "args": vars(args),
        "machine": machine(),
        "model": {
            "artifacts": str(artifacts),
            "config_sha256": config_sha,
            "version": clf.version,
            "provider": clf.provider,
            "train_command": config.get("train", {}).get("train_command"),
            "intra_op_threads": len(os.sched_getaffinity(0)),
        },
    }
    started = time.perf_counter()
    ts = build_testset(args.data, args.prompts, args.per_prompt, distractors=args.distractors, seed=args.seed)
    res["testset"] = ts.summary()
    texts = ([o.prompt for o in ts.originals] + [v.text for v in ts.variants] + list(ts.distractors)
             + [t for pair in PARAPHRASES + NEAR_MISSES for t in pair])  # fmt: skip
    emb, ms_per_prompt = embed_all(clf, texts, Path(args.embedding_cache) if args.embedding_cache else None, config_sha)
    res["embed_ms_per_prompt"] = ms_per_prompt
    print(f"embedded {len(set(texts))} prompts in {time.perf_counter() - started:.0f} s")
    from tokenizers import Tokenizer

    counter = Tokenizer.from_file(str(artifacts / config["files"].get("tokenizer", "tokenizer.json")))
    counter.no_truncation()
    counter.no_padding()  # tokenizer.json pads to 128: count the real tokens
    tokens = {t: len(counter.encode(t).ids) for t in dict.fromkeys(texts)}
    chosen = 0.92
    if "quality" not in skip:
        res["quality"] = quality(ts, emb, thresholds, args.max_false_hit, tokens, int(config["max_tokens"]))
        chosen = res["quality"]["chosen"]
        res["handwritten"] = handwritten(emb, thresholds)
        window = int(config["max_tokens"])
        res["cache_simulation"] = {
            f"{t:.2f}": cache_simulation(ts, emb, t, tokens, window) for t in sorted({chosen, 0.92})
        }
        res["guard_cost"] = guard_cost(ts)
    from gateway.services.redis_server import start_embedded_redis

    folder = tempfile.mkdtemp(prefix="semantic-bench-")
    server = start_embedded_redis(folder)
    try:
        if "latency" not in skip:
            res["latency"] = asyncio.run(lookup_latency(clf, ts, emb, server.url, chosen, args.lookups, args.seed))
            res["latency"]["threshold"] = chosen
            quiet = load_without_spinning(artifacts)
            if quiet is not None:
                res["latency_no_spinning"] = asyncio.run(
                    lookup_latency(quiet, ts, emb, server.url, chosen, args.lookups, args.seed + 1)
                )
                res["latency_no_spinning"]["threshold"] = chosen
                asyncio.run(quiet.aclose())
        if "vsim" not in skip:
            anchors = np.stack([emb[t] for t in dict.fromkeys(texts)])
            res["vsim"] = []
            for quant in [q.strip().upper() for q in args.quant.split(",") if q.strip()]:
                v = vsim_phase(server.url, anchors, args.vectors, args.vsim_queries, quant, args.seed)
                v["lookup"] = asyncio.run(lookup_at_scale(server.url, v["key"], v.pop("queries_sample"), 1.01))
                import redis

                redis.Redis.from_url(server.url).delete(v["key"])
                res["vsim"].append(v)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    res["elapsed_s"] = time.perf_counter() - started
    asyncio.run(clf.aclose())
    print_report(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"semantic-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1, default=_json_default))
    print(f"\nwrote {path} ({res['elapsed_s']:.0f} s)")


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Counter):
        return dict(x)
    if hasattr(x, "__dataclass_fields__"):
        return {k: getattr(x, k) for k in x.__dataclass_fields__}
    return str(x)


if __name__ == "__main__":
    main()
