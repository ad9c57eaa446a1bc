"""Semantic cache lookup latency, every check included, through a real Redis 8.

Run: ``python -m tests.bench.semantic_cache_bench [--pairs FILE]`` (about a minute on 2 cores).

The sources of the pairs file (default: the shared development pairs) are stored with
``SemanticCache.store`` in one vector set, each with the router embedding the gateway
would compute. Then every variant is looked up as the pipeline does it, sequentially:
``await classifier.score(...)`` (the router's forward pass, which also gives the
embedding), then ``await SemanticCache.lookup(...)`` at the policy defaults: VSIM, the
answers' GETs, the rules, and the verifier on the surviving candidates. Reported: p50
and p99 of the embedding, of the lookup and of both, over all lookups, over those where
the verifier ran and over those where it did not; the share of lookups that were hits;
the machine's core count and load. Answer quality is ``router_models.cache_eval``'s job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.accounting.metrics import Metrics
from gateway.cache.entries import CachedAnswer
from gateway.cache.semantic import SemanticCache, ServeBar
from gateway.cache.verifier import load_verifier
from gateway.classifier import load_classifier
from gateway.config.schema import SemanticCachePolicy
from gateway.core.model import Answer
from gateway.services.redis_server import start_embedded_redis
from gateway.store import keyspace
from gateway.store.redis import RedisVectorIndex, SharedRedis, connect
from router_models.cache_pairs import load_pairs

DEV_PAIRS = Path(__file__).parents[3] / "shared" / "data" / "semantic-cache" / "dev_pairs.jsonl"
ROUTER = Path(__file__).parents[2] / "gateway" / "classifier" / "artifacts"


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {"n": 0}
    out: dict[str, float] = {"n": len(rows)}
    for key in ("embed_ms", "lookup_ms", "total_ms"):
        values = [r[key] for r in rows]
        out[f"{key}_p50"] = round(float(np.percentile(values, 50)), 3)
        out[f"{key}_p99"] = round(float(np.percentile(values, 99)), 3)
    return out


async def _run(pairs_path: Path, redis_url: str) -> dict[str, Any]:
    policy = SemanticCachePolicy()
    classifier = load_classifier(ROUTER, prefer_gpu=False)
    verifier = load_verifier(prefer_gpu=False)
    assert classifier is not None and verifier is not None
    cache = SemanticCache(RedisVectorIndex(SharedRedis(connect(redis_url, timeout_s=1.0), Metrics())), verifier)
    index = keyspace.semantic_index("bench", "latency")
    pairs = load_pairs([pairs_path])
    answer = Answer(id="", model="m", text="x" * 400, finish_reason="stop")
    for source in sorted({p.source for p in pairs}):
        score = await classifier.score(source)
        entry = CachedAnswer(
            answer=answer, model="m", provider="p", prompt_tokens=1, completion_tokens=1, cost_usd=0.0,
            created_at=time.time(), prompt=source,
        )  # fmt: skip
        await cache.store(index, score.embedding, entry, 3600, 100_000, 1.0)
    for p in pairs[:20]:  # warm-up
        await classifier.score(p.variant)
    rows = []
    for p in pairs:
        t0 = time.perf_counter()
        score = await classifier.score(p.variant)
        t1 = time.perf_counter()
        found = await cache.lookup(
            index,
            score.embedding,
            p.variant,
            policy.threshold,
            ServeBar.of(policy),
            policy.guard,
            1.0,
        )
        t2 = time.perf_counter()
        verified = found.hit is not None or found.refused > 0
        rows.append({
            "embed_ms": (t1 - t0) * 1000, "lookup_ms": (t2 - t1) * 1000, "total_ms": (t2 - t0) * 1000,
            "verified": verified, "hit": found.hit is not None,
        })  # fmt: skip
    await classifier.aclose()
    await verifier.aclose()
    return {
        "pairs": str(pairs_path),
        "cores": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
        "verifier_provider": verifier.provider,
        "all": _summary(rows),
        "verifier_ran": _summary([r for r in rows if r["verified"]]),
        "verifier_not_needed": _summary([r for r in rows if not r["verified"]]),
        "hit_share": round(sum(r["hit"] for r in rows) / len(rows), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=DEV_PAIRS)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    server = start_embedded_redis(tempfile.mkdtemp(prefix="semantic-bench-"))
    try:
        result = asyncio.run(_run(args.pairs, server.url))
    finally:
        server.stop()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
