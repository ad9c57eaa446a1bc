"""Speculative decoding benchmark: the gateway's draft/verify loop against plain decoding on the large model.

Run: ``python tests/bench/speculative_bench.py`` (about 2-3 minutes on 2 cores;
``--help`` for the options).

Method
------
* Two toy LM servers (``tests/speculative/toy_lm_server.py``) run as separate
  processes on loopback. Their simulated costs stand for a 70B-class large model
  and a 7B-class small one on one GPU each, decode being memory-bound:
  large 30 ms per forward pass + 0.05 ms per uncached prompt token,
  small 4 ms per forward pass + 0.005 ms per uncached prompt token (``--large-ms`` ...).
  Both have a 16-token-block prefix cache, like vLLM's automatic prefix caching.
* The small model's greedy choice agrees with the large one's with probability α,
  independently per position (the textbook assumption), α ∈ ``--alphas``.
* Plain: the same prompts through the large model's ``/v1/chat/completions``.
  Speculative: ``SpeculativeProvider.complete`` with k fixed (k_min = k_max = k)
  or adaptive (k_min 1, k_max 8, start 4). Requests are sequential (one stream:
  the latency-bound case speculation is for); every answer runs to max_tokens.
* Figures: tokens/s and ms per output token; large-model calls per output token;
  acceptance (accepted / drafted) and the per-token α estimate
  (accepted / (accepted + rejections)); tokens per round against the textbook
  (1 - α^(k+1)) / (1 - α) with the nominal α, and the gap; the textbook speed-up
  (1 - α^(k+1)) / ((1 - α)(k c + 1)) with c = small pass / large pass.
* Per round: the draft call and the verification call as the gateway timed them,
  the whole round, and what the simulated costs alone would take (``sim``); the
  difference is HTTP and scheduling overhead.
* Gateway CPU per round: ``time.process_time`` of this process (the gateway side
  only: servers are other processes) over the speculative requests, HTTP client
  and JSON included, divided by rounds; and the loop's own share (``loop_cpu_ms``).

Results: a table on stdout and ``bench-results/speculative-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.config.schema import SpeculationPolicy
from gateway.speculative import SpeculationStats, SpeculativeProvider
from gateway.speculative.adaptive import expected_tokens
from gateway.upstreams.base import Provider
from tests.chat_requests import as_sent
from tests.speculative.servers import start_toy_server, toy_provider, toy_tokenizer_file, write_bench_results

_PROMPTS = [
    "write about the time when we said that she would see him",
    "tell me how it was and what they had to do about it",
    "what would you make of this long word if you can",
    "some of them were there at the way up",
]
_REPETITIVE = "the way it was is the way it is and the way it was is what it is " * 3


def _body(prompt: str, max_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    return {"model": "large", "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature, "max_tokens": max_tokens}  # fmt: skip


async def _plain(target: Provider, prompts: list[str], max_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    await target.complete(*as_sent(_body(prompts[0], 2, temperature)))  # warm the connection
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        completion = await target.complete(*as_sent(_body(prompt, max_tokens, temperature)))
        assert completion.usage is not None
        tokens += completion.usage.completion_tokens
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "ms_per_token": 1000 * elapsed / tokens, "large_calls_per_token": 1.0}  # fmt: skip


async def _speculative(
    target: Provider, draft: Provider | None, policy: SpeculationPolicy, prompts: list[str], max_tokens: int,
    temperature: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    spec = SpeculativeProvider(target, draft, policy)
    await spec.check_pair()
    await spec.complete(*as_sent(_body(prompts[0], 4, temperature)))  # warm: connections, end-of-sequence table
    totals = dict(tokens=0, rounds=0, drafted=0, accepted=0, rejections=0, large_calls=0, draft_calls=0,
                  loop_cpu_ms=0.0, draft_ms=0.0, verify_ms=0.0)  # fmt: skip
    k_seen: list[int] = []
    cpu, started = time.process_time(), time.perf_counter()
    for prompt in prompts:
        completion = await spec.complete(*as_sent(_body(prompt, max_tokens, temperature)))
        stats = completion.speculation
        assert isinstance(stats, SpeculationStats) and not stats.fallback_to_plain, stats
        totals["tokens"] += stats.output_tokens
        for name in (
            "rounds",
            "drafted",
            "accepted",
            "rejections",
            "large_calls",
            "draft_calls",
            "loop_cpu_ms",
            "draft_ms",
            "verify_ms",
        ):
            totals[name] += getattr(stats, name)
        k_seen += stats.k_history
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens, rounds = totals["tokens"], totals["rounds"]
    return {
        **totals, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "ms_per_token": 1000 * elapsed / tokens,
        "large_calls_per_token": totals["large_calls"] / tokens,
        "acceptance": totals["accepted"] / max(1, totals["drafted"]),
        "alpha_hat": totals["accepted"] / max(1, totals["accepted"] + totals["rejections"]),
        "tokens_per_round": tokens / rounds,
        "mean_k": sum(k_seen) / max(1, len(k_seen)),
        "gateway_cpu_ms_per_round": 1000 * cpu / rounds,
        "loop_cpu_ms_per_round": totals["loop_cpu_ms"] / rounds,
        "draft_call_ms": totals["draft_ms"] / max(1, totals["draft_calls"]),
        "verify_call_ms": totals["verify_ms"] / rounds,
        "round_ms": 1000 * elapsed / rounds,
    }  # fmt: skip


def _row_line(row: dict[str, Any], book: float | None, book_speedup: float | None) -> str:
    book_s = "" if book is None else f"{book:5.2f}"
    book_x = "" if book_speedup is None else f"{book_speedup:5.2f}x"
    gap = "" if row["gap"] is None else f"{100 * row['gap']:+5.1f}%"
    return (
        f"{row['alpha']:5.2f} {row['k']!s:>5} {row['tokens_per_s']:7.1f} {row['ms_per_token']:7.2f} "
        f"{row['speedup']:6.2f}x {book_x:>6} {row['large_calls_per_token']:9.3f} {row['acceptance']:6.3f} "
        f"{row['alpha_hat']:6.3f} {row['tokens_per_round']:7.2f} {book_s:>5} {gap:>6} "
        f"{row['gateway_cpu_ms_per_round']:6.2f}ms {row['loop_cpu_ms_per_round']:6.3f} "
        f"{row['draft_call_ms']:6.1f} {row['verify_call_ms']:6.1f} {row['round_ms']:6.1f} {row['simulated_round_ms']:5.1f}"
    )


def _policy(k: int | None, top_logprobs: int = 20) -> SpeculationPolicy:
    if k is None:
        return SpeculationPolicy(
            mode="gateway", draft="small", k_initial=4, k_min=1, k_max=8, top_logprobs=top_logprobs,
            tokenizer=toy_tokenizer_file(), min_speedup=0,  # the curve of speculation itself, losses included
        )  # fmt: skip
    return SpeculationPolicy(mode="gateway", draft="small", k_initial=k, k_min=k, k_max=k, top_logprobs=top_logprobs,
                             tokenizer=toy_tokenizer_file(), min_speedup=0)  # fmt: skip


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    # 100 logprobs per position (vLLM --max-logprobs 100) cover the toy's 74 tokens: exact speculative sampling
    large_server = start_toy_server(
        role="large", pass_ms=args.large_ms, prefill_ms_per_token=args.large_prefill_ms, max_logprobs=100
    )
    servers = [large_server]
    target = toy_provider("large", large_server, "large")
    c = args.small_ms / args.large_ms
    results: dict[str, Any] = {"plain": None, "sweep": [], "prompt_lookup": None, "sampling": None}
    prompts = _PROMPTS[: args.prompts]
    try:
        results["plain"] = await _plain(target, prompts, args.max_tokens)
        base = results["plain"]
        print(f"plain large model: {base['tokens_per_s']:.1f} tok/s, {base['ms_per_token']:.1f} ms/token")
        print(f"{'alpha':>5} {'k':>5} {'tok/s':>7} {'ms/tok':>7} {'speedup':>7} {'(book)':>6} {'calls/tok':>9} "
              f"{'accept':>6} {'a_hat':>6} {'tok/rnd':>7} {'book':>5} {'gap':>6} {'cpu/rnd':>8} {'loop':>6} {'draft':>6} {'verify':>6} {'round':>6} {'sim':>5}")  # fmt: skip
        for alpha in args.alphas:
            small_server = start_toy_server(role="small", agreement=alpha, pass_ms=args.small_ms,
                                            prefill_ms_per_token=args.small_prefill_ms, max_logprobs=100)  # fmt: skip
            servers.append(small_server)
            draft = toy_provider("small", small_server, "small")
            try:
                for k in [*args.ks, None]:
                    row = await _speculative(target, draft, _policy(k), prompts, args.max_tokens)
                    k_eff = k if k is not None else row["mean_k"]
                    row["simulated_round_ms"] = (args.large_ms + args.large_prefill_ms * (k_eff + 1)
                                                 + args.small_ms * k_eff + args.small_prefill_ms * 2)  # fmt: skip
                    book = expected_tokens(alpha, k) if k is not None else None
                    book_speedup = book / (k * c + 1) if book is not None and k is not None else None
                    row.update(alpha=alpha, k=k if k is not None else "adaptive", speedup=row["tokens_per_s"] / base["tokens_per_s"],
                               textbook_tokens_per_round=book, gap=None if book is None else row["tokens_per_round"] / book - 1,
                               textbook_speedup=book_speedup, mean_k=k_eff)  # fmt: skip
                    results["sweep"].append(row)
                    print(_row_line(row, book, book_speedup))
                if alpha == args.sampling_alpha:
                    plain_t = await _plain(target, prompts, args.max_tokens, temperature=1.0)
                    spec_t = await _speculative(
                        target, draft, _policy(None, top_logprobs=80), prompts, args.max_tokens, temperature=1.0
                    )
                    spec_t.update(speedup=spec_t["tokens_per_s"] / plain_t["tokens_per_s"], plain=plain_t, alpha=alpha)
                    results["sampling"] = spec_t
                    print(f"temperature 1, alpha {alpha}: speculative sampling {spec_t['tokens_per_s']:.1f} tok/s vs "
                          f"plain {plain_t['tokens_per_s']:.1f} ({spec_t['speedup']:.2f}x), acceptance "
                          f"{spec_t['acceptance']:.3f}, {spec_t['tokens_per_round']:.2f} tokens/round")  # fmt: skip
            finally:
                await draft.aclose()
        repetitive = [_REPETITIVE + p for p in prompts]
        lookup_policy = SpeculationPolicy(mode="gateway", draft_source="prompt_lookup", k_initial=4, k_min=1, k_max=8,
                                          tokenizer=toy_tokenizer_file())  # fmt: skip
        plain_r = await _plain(target, repetitive, args.max_tokens)
        look = await _speculative(target, None, lookup_policy, repetitive, args.max_tokens)
        look.update(speedup=look["tokens_per_s"] / plain_r["tokens_per_s"], plain=plain_r)
        results["prompt_lookup"] = look
        print(f"prompt lookup (repetitive prompts): {look['tokens_per_s']:.1f} tok/s vs plain {plain_r['tokens_per_s']:.1f} "
              f"({look['speedup']:.2f}x), acceptance {look['acceptance']:.3f}, "
              f"{look['tokens_per_round']:.2f} tokens/round")  # fmt: skip
    finally:
        await target.aclose()
        for server in servers:
            server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--large-ms", type=float, default=30.0)
    parser.add_argument("--large-prefill-ms", type=float, default=0.05)
    parser.add_argument("--small-ms", type=float, default=4.0)
    parser.add_argument("--small-prefill-ms", type=float, default=0.005)
    parser.add_argument("--sampling-alpha", type=float, default=0.8)
    args = parser.parse_args()
    started = time.time()
    results = asyncio.run(_run(args))
    write_bench_results("speculative", args, results, started)


if __name__ == "__main__":
    main()
