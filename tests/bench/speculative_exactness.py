"""The exactness matrix: every speculative answer compared with the large model's own plain answer.

Run: ``python -m tests.bench.speculative_exactness`` (about 2 minutes on 2 cores).

Toy LM servers (``tests/speculative/toy_lm_server.py``) stand for vLLM servers in four
set-ups; for each, greedy requests over prompts × ``max_tokens`` × draft agreement ×
stream × stop strings go through ``SpeculativeProvider`` and straight to the large
server's ``/v1/chat/completions``; text, finish reason and completion tokens must be equal.

* ``llama``: ``/detokenize`` cleans up spaces (Llama-3.1's tokenizer) and the model emits
  special tokens other than EOS; the policy names the pair's ``tokenizer.json``.
* ``llama-no-tokenizer``: the same servers without the file: the pair is refused and
  every request is decoded plainly (``text_unfaithful``).
* ``qwen-defaults``: a tokenizer that does not clean up (no file needed) and a generation
  config that makes an unset temperature greedy (``--generation-config auto``), declared
  as ``server_defaults``; requests leave ``temperature`` unset.
* ``penalty-default``: the server's generation config sets ``repetition_penalty`` 1.05,
  declared: requests go plain (``unsupported_penalties``).

Results: a table on stdout and ``bench-results/speculative-exactness-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec

from gateway.config.schema import SpeculationPolicy
from gateway.speculative import PairMismatchError, SpeculativeProvider
from gateway.upstreams.base import Provider
from tests.chat_requests import as_sent
from tests.speculative.servers import start_toy_server, toy_provider, toy_tokenizer_file, write_bench_results

_PROMPTS = [
    f"tell me {i} things about the way it was when {w}"
    for i, w in enumerate(["we", "said", "that", "she", "would", "write", "some", "long", "word", "and", "then"])
] + ["the the the the", "a", "write about them if you can", "it is what it is and it was what it was"]
_SETUPS: dict[str, dict[str, Any]] = {
    "llama": {"server": {"cleanup": 1, "special_rate": 0.03}, "policy": {"tokenizer": True}, "body": {}},
    "llama-no-tokenizer": {"server": {"cleanup": 1, "special_rate": 0.03}, "policy": {}, "body": {}},
    "qwen-defaults": {
        "server": {"cleanup": 0, "default_temperature": 0.0},
        "policy": {"server_defaults": {"temperature": 0.0}},
        "body": {"temperature": None},
    },
    "penalty-default": {
        "server": {"cleanup": 0, "default_repetition_penalty": 1.05},
        "policy": {"server_defaults": {"repetition_penalty": 1.05}},
        "body": {},
    },
}


async def _answer(provider: Provider, body: dict[str, Any]) -> tuple[tuple[str, str, int], bool]:
    if not body.get("stream"):
        completion = await provider.complete(*as_sent(body))
        choice = msgspec.json.decode(completion.body)["choices"][0]
        stats = getattr(completion, "speculation", None)
        assert completion.usage is not None
        answer = (choice["message"]["content"], choice["finish_reason"], completion.usage.completion_tokens)
        return answer, stats is not None and not stats.fallback_to_plain
    stream = await provider.open_stream(*as_sent({**body, "stream_options": {"include_usage": True}}))
    text, finish = [], None
    try:
        async for raw in stream:
            chunk = msgspec.json.decode(raw)
            for choice in chunk.get("choices") or []:
                text.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    finally:
        await stream.aclose()
    stats = getattr(stream, "speculation", None)
    usage = stream.tally.usage
    return ("".join(text), str(finish), usage.completion_tokens if usage else -1), (
        stats is not None and not stats.fallback_to_plain
    )


async def _setup(name: str, setup: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    large = start_toy_server(role="large", eos_rate=0.03, **setup["server"])
    equal = total = speculated = 0
    failures: list[str] = []
    try:
        target = toy_provider("large", large, "large")
        for agreement in args.agreements:
            small = start_toy_server(role="small", agreement=agreement)
            draft = toy_provider("small", small, "small")
            options = {**setup["policy"]}
            if options.pop("tokenizer", False):
                options["tokenizer"] = toy_tokenizer_file()
            # min_speedup 0: every request speculates (the guard would send toy pairs near break-even plain)
            policy = SpeculationPolicy(mode="gateway", draft="small", min_speedup=0, **options)
            spec = SpeculativeProvider(target, draft, policy)
            try:
                try:
                    await spec.check_pair()
                except PairMismatchError:
                    pass  # requests go plain; still compared
                for prompt in _PROMPTS:
                    for max_tokens in args.max_tokens:
                        for stream in (False, True):
                            for stop in ([], [" ."], ["the way", "n't"]):
                                body: dict[str, Any] = {
                                    "model": "large", "messages": [{"role": "user", "content": prompt}],
                                    "temperature": 0, "max_tokens": max_tokens, "stop": stop, "stream": stream,
                                }  # fmt: skip
                                body.update(setup["body"])
                                body = {k: v for k, v in body.items() if v is not None}
                                got, spoke = await _answer(spec, body)
                                want, _ = await _answer(target, body)
                                total += 1
                                equal += got == want
                                speculated += spoke
                                if got != want and len(failures) < 5:
                                    failures.append(f"{prompt!r} max_tokens={max_tokens} stream={stream} stop={stop}")
            finally:
                await draft.aclose()
                small.stop()
        await target.aclose()
    finally:
        large.stop()
    return {"setup": name, "equal": equal, "total": total, "speculated_share": speculated / total, "failures": failures}


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.setups:
        row = await _setup(name, _SETUPS[name], args)
        rows.append(row)
        print(f"{name:20s} {row['equal']:5d} / {row['total']:5d} equal, speculated {100 * row['speculated_share']:5.1f} %"
              + (f"  first failures: {row['failures']}" if row["failures"] else ""))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(_SETUPS), choices=list(_SETUPS))
    parser.add_argument("--agreements", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 7, 80, 400])
    args = parser.parse_args()
    started = time.time()
    rows = asyncio.run(_run(args))
    write_bench_results("speculative-exactness", args, {"rows": rows}, started)


if __name__ == "__main__":
    main()
