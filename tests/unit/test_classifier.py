"""The router classifier, loaded from the COMMITTED artifacts (gateway/classifier/artifacts, package data).

Training is never run here. Everything runs on the CPU provider so results are
deterministic on any machine.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from gateway.classifier import Classifier, RouterScore, load_classifier, select_text
from gateway.classifier.batch import calibrate, route_jsonl, threshold_for_share
from gateway.settings import DEFAULT_ROUTER_ARTIFACTS
from tests.prompts import EASY, HARD

BATCH_TOL = 0.04  # p_large difference allowed between batch compositions (int8 dynamic quantization)
ARTIFACTS = Path(DEFAULT_ROUTER_ARTIFACTS)


@pytest.fixture(scope="module")
def clf() -> Classifier:
    c = load_classifier(ARTIFACTS, prefer_gpu=False)
    assert c is not None, "committed artifacts failed to load"
    return c


def test_outputs_shape_norm_range(clf: Classifier) -> None:
    texts = [EASY, HARD, "hi", "x " * 2000]
    scores = clf.score_batch_sync(texts)
    assert len(scores) == 4
    dim = clf.config["embedding_dim"]
    for s in scores:
        assert isinstance(s, RouterScore)
        assert s.embedding.dtype == np.float32 and s.embedding.shape == (dim,)
        assert abs(float(np.linalg.norm(s.embedding)) - 1.0) < 1e-3
        assert 0.0 <= s.p_large <= 1.0
    assert clf.provider == "CPUExecutionProvider"
    assert len(clf.version) == 16 and clf.version == clf.config["sha256"][clf.model_file][:16]


def test_deterministic_and_batch_invariant(clf: Classifier) -> None:
    texts = [EASY, HARD, "Explain quantum entanglement to a physicist.", "2+2?"]
    a = clf.score_batch_sync(texts)
    b = clf.score_batch_sync(texts)
    single = [clf.score_batch_sync([t])[0] for t in texts]
    for x, y, z in zip(a, b, single, strict=False):
        assert x.p_large == y.p_large
        np.testing.assert_array_equal(x.embedding, y.embedding)
        # int8 dynamic quantization scales activations per batch tensor, so batch
        # composition moves the result slightly (not beyond this)
        assert abs(x.p_large - z.p_large) < BATCH_TOL
        assert float(x.embedding @ z.embedding) > 0.98


def test_scores_depend_on_text_and_embedding_is_semantic(clf: Classifier) -> None:
    # No hard-vs-trivial ordering assertion: on out-of-distribution one-liners the router's
    # order is not robust (GSM8K held-out APGR is ~0.51, see router_models/README.md).
    hard, easy = clf.score_batch_sync([HARD, EASY])
    assert hard.p_large != easy.p_large
    # similar prompts are closer than unrelated ones (the embedding serves the cache)
    para = clf.score_batch_sync(["Which city is the capital of France?"])[0]
    assert float(para.embedding @ easy.embedding) > float(para.embedding @ hard.embedding)


def test_select_text() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Prove that there are infinitely many primes."},
        {"role": "assistant", "content": "Suppose finitely many..."},
        {"role": "user", "content": [{"type": "text", "text": "Now explain it for a child, step by step."}]},
    ]
    assert select_text(msgs) == "Now explain it for a child, step by step."
    short = [*msgs[:3], {"role": "user", "content": "why?"}]
    assert select_text(short) == "Prove that there are infinitely many primes.\nwhy?"
    assert select_text([{"role": "system", "content": "only a system prompt"}]) == "only a system prompt"
    assert select_text([]) == ""


async def test_microbatching_matches_one_by_one(clf: Classifier) -> None:
    texts = [f"Question {i}: what is {i} times {i + 3}? Explain." for i in range(48)] + [EASY, HARD]
    expected = clf.score_batch_sync([t for t in texts])
    batches_before = clf.batches_run
    got = await asyncio.gather(*(clf.score([{"role": "user", "content": t}]) for t in texts))
    batches = clf.batches_run - batches_before
    assert batches < len(texts), "concurrent callers were not batched"
    assert clf.max_batch_seen > 1
    for g, e in zip(got, expected, strict=False):
        assert abs(g.p_large - e.p_large) < BATCH_TOL
        assert float(g.embedding @ e.embedding) > 0.98
    # sequential callers still work (batch of one after the bounded wait)
    one = await clf.score([{"role": "user", "content": EASY}])
    assert abs(one.p_large - expected[-2].p_large) < BATCH_TOL
    alone = clf.score_batch_sync([EASY])[0]
    assert abs(one.p_large - alone.p_large) < 1e-6


def test_scores_say_when_the_text_ran_past_the_window(clf: Classifier) -> None:
    window = clf.max_tokens
    short, long_ = clf.score_batch_sync([EASY, "word " * (2 * window)])
    assert not short.truncated and long_.truncated
    assert clf.score_batch_sync([" " * 100_000])[0].truncated  # cut by characters before tokenizing


async def test_a_lone_request_does_not_wait_for_peers() -> None:
    """The batching wait applies under load only: with a (deliberately absurd) 60 s wait,
    sequential requests must still be answered, each in its own batch."""
    lazy = load_classifier(ARTIFACTS, prefer_gpu=False, max_wait_s=60.0)
    assert lazy is not None
    try:
        for text in (EASY, HARD, EASY):
            await asyncio.wait_for(lazy.score_text(text), timeout=20)
        assert lazy.batches_run == 3
        # a burst is still batched, and the request after it may wait: it is not alone
        await asyncio.gather(*(lazy.score_text(f"question {i}") for i in range(8)))
        assert lazy.max_batch_seen > 1
    finally:
        await lazy.aclose()


def _capture() -> Any:
    return structlog.testing.capture_logs()


def test_missing_artifacts_give_none_and_log(tmp_path: Path) -> None:
    with _capture() as logs:
        assert load_classifier(tmp_path / "nowhere") is None
    assert any(e["event"] == "classifier_unavailable" and e["reason"] == "missing" for e in logs)


def test_corrupt_model_gives_none_and_log(tmp_path: Path) -> None:
    d = tmp_path / "art"
    shutil.copytree(ARTIFACTS, d, ignore=shutil.ignore_patterns("*.fp32.onnx", "*.fp16.onnx"))
    cfg = json.loads((d / "config.json").read_text())
    model = d / cfg["files"][cfg["cpu_variant"]]
    model.write_bytes(model.read_bytes()[:1000])  # truncated file
    with _capture() as logs:
        assert load_classifier(d, prefer_gpu=False) is None
    assert any(e["event"] == "classifier_unavailable" and e["reason"] == "sha256_mismatch" for e in logs)
    # without the recorded hash the load itself fails, still no exception
    cfg["sha256"].pop(model.name)
    (d / "config.json").write_text(json.dumps(cfg))
    with _capture() as logs:
        assert load_classifier(d, prefer_gpu=False) is None
    assert any(e["event"] == "classifier_unavailable" and e["reason"] == "load_failed" for e in logs)
    (d / "config.json").write_text("{not json")
    with _capture() as logs:
        assert load_classifier(d, prefer_gpu=False) is None
    assert any(e.get("reason") == "bad_config" for e in logs)


def _sample_jsonl(path: Path, n: int = 40) -> None:
    with path.open("w") as f:
        for i in range(n):
            if i % 2:
                f.write(
                    json.dumps(
                        {
                            "id": i,
                            "prompt": f"A train leaves at {i}:00 going {30 + i} km/h; a second leaves "
                            f"an hour later at {45 + i} km/h. When does it catch up, and how far out?",
                        }
                    )
                    + "\n"
                )
            else:
                f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"Say hello #{i}."}]}) + "\n")
        f.write("not json\n")
        f.write(json.dumps({"nothing": 1}) + "\n")


def test_route_jsonl_and_calibrate(clf: Classifier, tmp_path: Path) -> None:
    src = tmp_path / "prompts.jsonl"
    _sample_jsonl(src)
    t, unreadable = calibrate(clf, src, 0.25)
    assert 0.0 <= t <= 1.0 + 1e-6 and unreadable == 2
    out = io.StringIO()
    counts = route_jsonl(clf, src, out, t, "small-model", "large-model")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(rows) == 42 and counts["errors"] == 2
    ok = [r for r in rows if "error" not in r]
    assert len(ok) == 40
    large = [r for r in ok if r["decision"] == "large"]
    assert len(large) == 10  # exactly the calibrated share (no ties in 40 distinct prompts)
    for r in ok:
        assert r["model"] == ("large-model" if r["p_large"] >= t else "small-model")
    assert [r["id"] for r in rows[:40]] == list(range(40))
    # file output works too
    dst = tmp_path / "out.jsonl"
    route_jsonl(clf, src, dst, 0.0, "s", "l")
    assert all(json.loads(x).get("model", "l") == "l" for x in dst.read_text().splitlines())


def test_threshold_for_share_edges() -> None:
    p = np.array([0.1, 0.2, 0.2, 0.2, 0.9])
    assert threshold_for_share(p, 0.2) == 0.9
    t = threshold_for_share(p, 0.4)  # ties at 0.2 must not overshoot 40%
    assert np.mean(p >= t) <= 0.4
    assert np.mean(p >= threshold_for_share(p, 0.0)) == 0.0
    assert np.mean(p >= threshold_for_share(p, 1.0)) == 1.0
    with pytest.raises(ValueError):
        threshold_for_share([], 0.5)
