"""Router classifier benchmark: latency of one 128-token prompt and prompts/s under
concurrent load with micro-batching, per artifact variant, next to routing quality.

Run (after the artifacts exist; takes ~1-2 minutes per variant on 2 cores):

    nice -n 19 python -m tests.bench.classifier_bench
    python -m tests.bench.classifier_bench --artifacts gateway/classifier/artifacts \
        --extra fp32=router_models/build/router.fp32.onnx

Method
------
* Prompt: a GSM8K-style word problem repeated and cut to ``--tokens`` tokens (128); the
  graph's window (96) reads a longer prompt at both ends, so the pass sees a full window.
* Single: ``score_batch_sync([prompt])`` (tokenize + one ONNX run) ``--single-n`` times
  after a warm-up; p50/p99. Also ``await score(...)`` from one sequential caller, which
  adds the executor hop and the bounded batching wait.
* Load: ``--concurrency`` asyncio callers each loop ``await score(...)`` for ``--duration``
  seconds on one event loop; prompts/s = completed / elapsed; mean batch size reported.
* Real prompts (when ``../shared/data/routing`` is there): the same load phase, each caller
  cycling through the routing data's MMLU and GSM8K prompts (mixed lengths, so batches are
  padded to their longest prompt, as in production).
* onnxruntime's intra-op threads = the cores this process may use (printed); the CPU
  provider unless ``--gpu`` (then CUDA when it can start, as in the gateway; the
  provider is in each result).
Figures come from one run on a shared machine; compare only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gateway.classifier import Classifier, load_classifier

REPO = Path(__file__).resolve().parents[2]
BASE = (
    "A bakery sells 3 kinds of bread. On Monday it sold 45 loaves of rye at $4.25 each, twice as many "
    "sourdough loaves at $5.50 each, and 12 fewer baguettes than sourdough at $2.75 each. Flour costs "
    "$0.80 per loaf and the staff are paid $96 per day. How much profit did the bakery make on Monday? "
)


def prompt_of(clf: Classifier, tokens: int) -> str:
    """A prompt that encodes to exactly ``tokens`` tokens ([CLS] and [SEP] included) before the
    window cuts it: one longer than the window is read as the gateway reads it (both ends)."""
    tok = Tokenizer.from_str(clf._tokenizer.to_str())
    tok.no_truncation()
    text = BASE * (tokens // 20 + 2)
    end = tok.encode(text).offsets[tokens - 2][1]  # last kept word piece (before [SEP])
    text = text[:end]
    while len(tok.encode(text).ids) > tokens:
        text = text[:-1]
    assert len(tok.encode(text).ids) == tokens
    return text


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


DATA = REPO.parent / "shared" / "data" / "routing"


def real_prompts(limit: int = 2000) -> list[str]:
    """MMLU and GSM8K prompts from the routing data, interleaved (empty when it is absent)."""
    out: list[str] = []
    for name in ("mmlu_dev.jsonl", "gsm8k_dev.jsonl"):
        path = DATA / name
        if path.is_file():
            rows = path.read_text().splitlines()
            step = max(1, len(rows) // (limit // 2))
            out += [json.loads(line)["prompt"] for line in rows[::step][: limit // 2]]
    np.random.default_rng(0).shuffle(out)
    return out


async def load_phase(clf: Classifier, texts: str | list[str], concurrency: int, duration: float) -> dict[str, float]:
    stop = time.perf_counter() + duration
    done = 0
    lat: list[float] = []
    texts = [texts] if isinstance(texts, str) else texts

    async def caller(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop:
            text = texts[i % len(texts)]
            i += concurrency
            t = time.perf_counter()
            await clf.score(text)
            lat.append(time.perf_counter() - t)
            done += 1

    b0 = clf.batches_run
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    el = time.perf_counter() - t0
    batches = clf.batches_run - b0
    return {
        "prompts_per_s": round(done / el, 1),
        "mean_batch": round(done / max(1, batches), 1),
        "latency_p50_ms": round(pct(lat, 50) * 1e3, 1),
        "latency_p99_ms": round(pct(lat, 99) * 1e3, 1),
    }


async def seq_async(clf: Classifier, text: str, n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        await clf.score(text)
        out.append(time.perf_counter() - t)
    return out


def bench_variant(name: str, art: Path, variant: str | None, args: argparse.Namespace) -> dict[str, Any]:
    clf = load_classifier(
        art,
        prefer_gpu=args.gpu,
        variant=variant,
        max_batch=args.max_batch,
        max_wait_s=args.max_wait_ms / 1e3,
        intra_op_threads=args.threads,
    )
    if clf is None:
        return {"variant": name, "error": "failed to load"}
    text = prompt_of(clf, args.tokens)
    for _ in range(20):
        clf.score_batch_sync([text])
    lat: list[float] = []
    for _ in range(args.single_n):
        t = time.perf_counter()
        clf.score_batch_sync([text])
        lat.append(time.perf_counter() - t)
    res: dict[str, Any] = {
        "variant": name,
        "file": clf.model_file,
        "provider": clf.provider,
        "prompt_tokens": args.tokens,
        "window_tokens": min(args.tokens, clf.max_tokens),
        "single_p50_ms": round(pct(lat, 50) * 1e3, 2),
        "single_p99_ms": round(pct(lat, 99) * 1e3, 2),
    }
    # batch of 32 straight through the session (upper bound on throughput)
    t = time.perf_counter()
    reps = max(3, args.single_n // 40)
    for _ in range(reps):
        clf.score_batch_sync([text] * 32)
    res["batch32_prompts_per_s"] = round(reps * 32 / (time.perf_counter() - t), 1)

    async def run() -> None:
        sa = await seq_async(clf, text, max(50, args.single_n // 2))
        res["score_async_single_p50_ms"] = round(pct(sa, 50) * 1e3, 2)
        res["score_async_single_p99_ms"] = round(pct(sa, 99) * 1e3, 2)
        res["load"] = {"concurrency": args.concurrency} | await load_phase(clf, text, args.concurrency, args.duration)
        real = real_prompts()
        if real:
            res["load_real_prompts"] = {"concurrency": args.concurrency, "prompts": len(real)} | await load_phase(
                clf, real, args.concurrency, args.duration
            )
        await clf.aclose()

    asyncio.run(run())
    metrics = clf.config.get("metrics", {})
    # The graph's validation split guided its layer count and window: a development figure,
    # named so, never a test result (router_models/README.md has the test figures).
    res["quality_development"] = {
        f"{k.split('_')[0]}_graph_validation": {
            "router_apgr": metrics[k]["router"]["apgr"],
            "knn_apgr": metrics[k]["knn"]["apgr"],
        }
        for k in ("mmlu_heldout", "gsm8k_heldout")
        if k in metrics
    }
    if "speedonly" in name:  # a different (untrained) graph: the shipped quality does not apply
        res["quality_development"] = None
    res["encoder_layers"] = clf.config.get("encoder_layers")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default=str(REPO / "gateway" / "classifier" / "artifacts"))
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="NAME=PATH.onnx: another graph with the same tokenizer/config (e.g. the fp32 build); "
        "a NAME containing 'speedonly' marks a graph measured for speed only (no quality shown)",
    )
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--single-n", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: cores)")
    ap.add_argument("--gpu", action="store_true", help="use the CUDA provider when it can start (as the gateway does)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores} (os.cpu_count()={os.cpu_count()}); onnxruntime threads: {args.threads or cores}")
    art = Path(args.artifacts)
    cfg = json.loads((art / "config.json").read_text())
    results = [bench_variant(cfg["cpu_variant"], art, None, args)]
    for spec in args.extra:
        name, path = spec.split("=", 1)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            for f in ("config.json", "tokenizer.json"):
                shutil.copy(art / f, d / f)
            shutil.copy(path, d / Path(path).name)
            c = json.loads((d / "config.json").read_text())
            c["files"][name] = Path(path).name
            c.get("sha256", {}).pop(Path(path).name, None)
            (d / "config.json").write_text(json.dumps(c))
            results.append(bench_variant(name, d, name, args))
    for r in results:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
