"""Where speculation stops paying: gateway-mode speculative decoding against plain decoding under load.

Run: ``python -m tests.bench.speculative_load_bench`` (about 3 minutes on 2 cores;
``--help`` for the options).

Method
------
* Two toy LM servers (``tests/speculative/toy_lm_server.py``) with continuous batching
  (``--batch-knee``): a step of the large server costs ``--large-ms`` (30) for up to
  ``--knee`` (64) tokens in the batch, memory-bound, and grows in proportion beyond,
  compute-bound; the small server likewise at ``--small-ms`` (4). Decoding adds one token
  per sequence to a step; a verification call adds the drafted tokens plus the context's
  tail outside the prefix cache's full 16-token blocks (what vLLM recomputes for a new
  request), and its prompt logprobs.
* ``c`` clients each send ``--requests`` requests one after another (greedy, every answer
  runs to ``--max-tokens``): plain decoding on the large server, then the same through
  ``SpeculativeProvider`` (adaptive k), then speculation with ``max_inflight`` set to the
  crossover the sweep found (``--max-inflight``, 0: the measured one).
* Figures per c: output tokens per second over all clients, per-request latency p50,
  the speed-up, and the large server's mean tokens per batched step.

Results: a table on stdout and ``bench-results/speculative-load-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from gateway.config.schema import SpeculationPolicy
from gateway.speculative import SpeculativeProvider
from gateway.upstreams.base import Provider
from tests.chat_requests import as_sent
from tests.speculative.servers import ToyServer, start_toy_server, toy_provider, toy_tokenizer_file, write_bench_results

_WORDS = ["the", "way", "it", "was", "when", "we", "said", "that", "she", "would", "see", "him", "at", "some", "time"]


def _body(client: int, request: int, max_tokens: int) -> dict[str, Any]:
    words = [_WORDS[(client * 7 + request * 3 + i) % len(_WORDS)] for i in range(12)]
    prompt = f"tell me {client} things about " + " ".join(words)
    return {"model": "large", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip


async def _load(provider: Provider, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = 0
    spoke = 0

    async def client(index: int) -> None:
        nonlocal tokens, spoke
        for request in range(requests):
            started = time.perf_counter()
            completion = await provider.complete(*as_sent(_body(index, request, max_tokens)))
            latencies.append(time.perf_counter() - started)
            assert completion.usage is not None
            tokens += completion.usage.completion_tokens
            stats = getattr(completion, "speculation", None)
            spoke += stats is not None and not stats.fallback_to_plain

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "p50_s": statistics.median(latencies), "seconds": elapsed,
            "speculated": spoke / len(latencies)}  # fmt: skip


def _step_tokens(server: ToyServer) -> float:
    stats = server.stats()
    return float(stats.get("step_tokens", 0)) / max(1, int(stats.get("steps", 0)))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    large = start_toy_server(role="large", pass_ms=args.large_ms, batch_knee=args.knee)
    small = start_toy_server(role="small", agreement=args.alpha, pass_ms=args.small_ms, batch_knee=args.knee)
    target, draft = toy_provider("large", large, "large"), toy_provider("small", small, "small")
    # min_speedup 0: the curve of speculation itself, where it stops paying included
    policy = SpeculationPolicy(mode="gateway", draft="small", tokenizer=toy_tokenizer_file(), min_speedup=0)
    rows: list[dict[str, Any]] = []
    try:
        spec = SpeculativeProvider(target, draft, policy)
        await spec.check_pair()
        await _load(spec, 2, 1, 8)  # warm: connections, end-of-sequence table
        await _load(target, 2, 1, 8)
        print(f"{'c':>3} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} {'plain p50':>9} {'spec p50':>8} "
              f"{'large step tokens (plain/spec)':>30}")  # fmt: skip
        for clients in args.clients:
            large.reset()
            plain = await _load(target, clients, args.requests, args.max_tokens)
            plain_step = _step_tokens(large)
            large.reset()
            fast = await _load(spec, clients, args.requests, args.max_tokens)
            spec_step = _step_tokens(large)
            row = {"clients": clients, "plain": plain, "speculative": fast,
                   "speedup": fast["tokens_per_s"] / plain["tokens_per_s"],
                   "large_step_tokens": {"plain": plain_step, "speculative": spec_step}}  # fmt: skip
            rows.append(row)
            print(f"{clients:3d} {plain['tokens_per_s']:11.1f} {fast['tokens_per_s']:10.1f} {row['speedup']:6.2f}x "
                  f"{plain['p50_s'] * 1000:7.0f}ms {fast['p50_s'] * 1000:6.0f}ms {plain_step:14.1f} / {spec_step:5.1f}")  # fmt: skip
        crossover = next((r["clients"] for r in rows if r["speedup"] < 1.0), None)
        bound = args.max_inflight or (max(1, crossover // 2) if crossover else None)
        guarded: list[dict[str, Any]] = []
        if bound is not None:
            capped = SpeculativeProvider(
                target, draft, SpeculationPolicy(mode="gateway", draft="small", tokenizer=toy_tokenizer_file(),
                                                 max_inflight=bound, min_speedup=0),
            )  # fmt: skip
            await capped.check_pair()
            print(f"max_inflight {bound}:")
            for row in rows:
                result = await _load(capped, row["clients"], args.requests, args.max_tokens)
                result["speedup"] = result["tokens_per_s"] / row["plain"]["tokens_per_s"]
                guarded.append({"clients": row["clients"], **result})
                print(f"{row['clients']:3d} {result['tokens_per_s']:10.1f} tok/s {result['speedup']:6.2f}x "
                      f"(speculated {100 * result['speculated']:.0f} % of requests)")  # fmt: skip
    finally:
        await target.aclose()
        await draft.aclose()
        large.stop()
        small.stop()
    return {"rows": rows, "crossover_clients": crossover, "max_inflight": bound, "with_max_inflight": guarded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--large-ms", type=float, default=30.0)
    parser.add_argument("--small-ms", type=float, default=4.0)
    parser.add_argument("--knee", type=int, default=64)
    parser.add_argument("--max-inflight", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    results = asyncio.run(_run(args))
    write_bench_results("speculative-load", args, results, started)


if __name__ == "__main__":
    main()
