"""The router classifier, loaded from the COMMITTED artifacts (gateway/classifier/artifacts, package data).

Training is never run here. Everything runs on the CPU provider so results are
deterministic on any machine.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from gateway.classifier import Classifier, RouterScore, load_classifier, select_text
from gateway.classifier.batch import calibrate, route_jsonl, threshold_for_share
from gateway.classifier.text import messages_unreadable, request_text, request_unreadable
from gateway.protocols.openai_chat import read_chat_request
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
        # on the CPU provider every prompt gets its own forward pass: what else is in the
        # batch (another tenant's prompt) cannot move its score
        assert clf.row_by_row
        assert x.p_large == pytest.approx(z.p_large, abs=1e-5)  # only the head's float sums differ
        np.testing.assert_array_equal(x.embedding, z.embedding)


def test_one_shared_pass_moves_scores_with_company_which_is_why_cpu_runs_rows_alone() -> None:
    shared = load_classifier(ARTIFACTS, prefer_gpu=False, row_by_row=False, use_head=False)
    assert shared is not None and not shared.row_by_row
    texts = [EASY, HARD, "Explain quantum entanglement to a physicist.", "2+2?"]
    together = shared.score_batch_sync(texts)
    alone = [shared.score_batch_sync([t])[0] for t in texts]
    for x, z in zip(together, alone, strict=True):
        # int8 dynamic quantization scales activations per batch tensor (not beyond this)
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
    for blank in (" \n", "\u200b", "\u0000"):  # no visible text is no turn, whatever it is made of (t55)
        assert select_text([*msgs[:2], {"role": "user", "content": blank}]) == msgs[1]["content"]
        assert select_text([msgs[0], {"role": "user", "content": blank}]) == "You are helpful."


async def test_microbatching_matches_one_by_one(clf: Classifier) -> None:
    texts = [f"Question {i}: what is {i} times {i + 3}? Explain." for i in range(48)] + [EASY, HARD]
    expected = clf.score_batch_sync([t for t in texts])
    batches_before = clf.batches_run
    got = await asyncio.gather(*(clf.score(t) for t in texts))
    batches = clf.batches_run - batches_before
    assert batches < len(texts), "concurrent callers were not batched"
    assert clf.max_batch_seen > 1
    for g, e in zip(got, expected, strict=False):
        assert g.p_large == pytest.approx(e.p_large, abs=1e-5)
        np.testing.assert_array_equal(g.embedding, e.embedding)
    # sequential callers still work (batch of one after the bounded wait)
    one = await clf.score(EASY)
    assert one.p_large == pytest.approx(expected[-2].p_large, abs=1e-5)
    alone = clf.score_batch_sync([EASY])[0]
    assert abs(one.p_large - alone.p_large) < 1e-6


def test_scores_say_when_the_text_ran_past_the_window(clf: Classifier) -> None:
    window = clf.max_tokens
    short, long_ = clf.score_batch_sync([EASY, "word " * (2 * window)])
    assert not short.truncated and long_.truncated
    assert clf.score_batch_sync([" " * 100_000])[0].truncated  # cut by characters before tokenizing


def test_a_long_prompt_is_read_at_both_ends(clf: Classifier) -> None:
    """A pasted document's request usually comes after it: the window's start alone could not
    tell 'what day is rent due?' from a legal analysis under the same lease."""
    lease = "The Tenant shall pay rent monthly in advance on the first day of each month. " * 12
    easy, hard = (
        lease + "\nWhat day is rent due?",
        lease + "\nIf the landlord accepted late rent three times, has he waived the right to evict for late "
        "payment, and how does the non-waiver clause interact with that under common law?",
    )
    [read_easy, read_hard] = clf.score_batch_sync([easy, hard])
    assert read_easy.truncated and read_hard.truncated
    assert not np.array_equal(read_easy.embedding, read_hard.embedding)
    clf.read_ends = False
    try:
        [start_easy, start_hard] = clf.score_batch_sync([easy, hard])
        [short] = clf.score_batch_sync(["What day is rent due?"])
    finally:
        clf.read_ends = True
    assert np.array_equal(start_easy.embedding, start_hard.embedding)  # the same first 94 tokens
    assert clf.score_batch_sync(["What day is rent due?"])[0].p_large == short.p_large  # short text: as before


async def test_a_lone_request_does_not_wait_for_peers() -> None:
    """The batching wait applies under load only: with a (deliberately absurd) 60 s wait,
    sequential requests must still be answered, each in its own batch."""
    lazy = load_classifier(ARTIFACTS, prefer_gpu=False, max_wait_s=60.0)
    assert lazy is not None
    try:
        for text in (EASY, HARD, EASY):
            await asyncio.wait_for(lazy.score(text), timeout=20)
        assert lazy.batches_run == 3
        # a burst is still batched, and the request after it may wait: it is not alone
        await asyncio.gather(*(lazy.score(f"question {i}") for i in range(8)))
        assert lazy.max_batch_seen > 1
    finally:
        await lazy.aclose()


async def test_another_tenants_prompt_is_scored_before_the_rest_of_a_burst() -> None:
    """The queue takes one prompt of each waiting tenant in turn: one tenant's burst of long
    prompts queued in front of everyone added ~180 ms to each of another tenant's requests (t51)."""
    one_at_a_time = load_classifier(ARTIFACTS, prefer_gpu=False, max_batch=1)
    assert one_at_a_time is not None
    scored: list[str] = []

    async def ask(tenant: str, text: str) -> None:
        await one_at_a_time.score(text, tenant)
        scored.append(f"{tenant}:{text}")

    try:
        burst = [asyncio.create_task(ask("a", f"Review this code, part {i}: x = f(x) + {i}")) for i in range(6)]
        late = asyncio.create_task(ask("b", EASY))
        await asyncio.gather(*burst, late)
    finally:
        await one_at_a_time.aclose()
    assert scored[1] == f"b:{EASY}"  # first in line after the prompt at work, not behind all six
    assert [s for s in scored if s.startswith("a:")] == [
        f"a:Review this code, part {i}: x = f(x) + {i}" for i in range(6)
    ]


async def test_a_run_at_work_on_a_burst_stops_for_another_tenants_prompt(clf: Classifier) -> None:
    """On the CPU a run of one tenant's burst stops after its current prompt when another
    tenant's arrives, which goes next: it waited for the whole run of up to 32 passes (t51)."""
    scored: list[str] = []

    async def ask(tenant: str, text: str) -> None:
        await clf.score(text, tenant)
        scored.append(f"{tenant}:{text}")

    burst = [f"Review this code, part {i}: x = f(x) + {i}" for i in range(12)]
    before = clf.batches_run
    with clf._lock:  # the run taken stays at its start until the other tenant's prompt is queued
        asks = [asyncio.create_task(ask("a", text)) for text in burst]
        while clf.batches_run == before:  # the batcher took the burst and handed it to its thread
            await asyncio.sleep(0)
        asks.append(asyncio.create_task(ask("b", EASY)))
        await asyncio.sleep(0)
    await asyncio.gather(*asks)
    assert scored[:3] == [f"a:{burst[0]}", f"b:{EASY}", f"a:{burst[1]}"]
    assert [s for s in scored if s.startswith("a:")] == [f"a:{text}" for text in burst]


def _capture() -> Any:
    return structlog.testing.capture_logs()


def test_loading_writes_nothing_under_home(tmp_path: Path) -> None:
    """t117: onnxruntime 1.31's telemetry wrote a device id and an event database under
    $HOME/.cache/Microsoft at import: a gateway loads its models with it off. In a fresh
    interpreter: this one may have imported onnxruntime already."""
    home = tmp_path / "home"
    home.mkdir()
    load = "from gateway.classifier import load_classifier as l; import sys; assert l(sys.argv[1], prefer_gpu=False)"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    done = subprocess.run(
        [sys.executable, "-c", load, str(ARTIFACTS)],
        env={**env, "HOME": str(home)},
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert not [str(p.relative_to(home)) for p in home.rglob("*")]


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


def test_messages_the_gateway_would_refuse_are_reported_not_scored(clf: Classifier) -> None:
    lines = [
        {"messages": ["hi"]},
        {"messages": [None]},
        {"messages": [{"role": "user", "content": {"text": "hi"}}]},
        {"prompt": "   what is 2+2   \n\n"},
        {"messages": [{"role": "user", "content": "what is 2+2"}]},
    ]
    out = io.StringIO()
    counts = route_jsonl(clf, io.StringIO("".join(json.dumps(x) + "\n" for x in lines)), out, 0.5, "s", "l")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert counts["errors"] == 3
    assert [r.get("error") for r in rows[:3]] == [
        "line 1: messages[0] is not an object",
        "line 2: messages[0] is not an object",
        "line 3: messages[0].content must be a string or a list of parts",
    ]
    assert rows[3]["p_large"] == rows[4]["p_large"]  # a prompt is read as the gateway reads a user turn


_IMAGE_URL = "data:image/png;base64,iVBORw0KGgo="
UNREADABLE: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _IMAGE_URL}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                               {"type": "image_url", "image_url": {"url": _IMAGE_URL}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "xx"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_image", "image_url": _IMAGE_URL}]}]},
    {"messages": []},
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": "\u200b\u200b\u200b"}]},
    {"prompt": ""},
    {"prompt": "   \n\t"},
    {"prompt": "\u0000" * 50},
]  # fmt: skip


def test_prompts_the_router_cannot_read_go_large_as_in_the_gateway(clf: Classifier) -> None:
    """route printed p_large 0.001 and small for image-only, empty and blank prompts, which the
    gateway sends large at p_large 1, and calibrate fitted on those scores (t51)."""
    readable: list[dict[str, Any]] = [
        {"prompt": "what is 2+2"},
        {"messages": [{"role": "user", "content": "a\u0000b \u200bwhat is 2+2"}]},
    ]
    out = io.StringIO()
    lines = "".join(json.dumps(x) + "\n" for x in UNREADABLE + readable)
    counts = route_jsonl(clf, io.StringIO(lines), out, 0.99, "s", "l")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert counts == {"lines": len(rows), "large": len(UNREADABLE), "small": 2, "errors": 0}
    assert [(r["p_large"], r["decision"]) for r in rows[: len(UNREADABLE)]] == [(1.0, "unreadable")] * len(UNREADABLE)
    assert all(r["p_large"] < 1.0 for r in rows[len(UNREADABLE) :])
    # the rule is the gateway's: the same verdict on the request the gateway reads of those messages
    for case in UNREADABLE[:2] + UNREADABLE[4:7] + readable[1:]:
        messages = case["messages"]
        request = read_chat_request({"model": "auto", "messages": messages})
        text = request_text(request.messages)
        assert messages_unreadable(messages, select_text(messages)) == request_unreadable(request.messages, text)


def test_a_lone_surrogate_is_an_error_for_its_line_and_the_run_goes_on(clf: Classifier) -> None:
    """Python's json writes half an emoji as a \\ud83d escape and reads it back: the tokenizer
    raised on it, and route and calibrate died with a traceback, the batch's good lines unprinted (t51)."""
    lines = '{"id": 1, "prompt": "hello"}\n{"id": 2, "prompt": "x \\ud83d y"}\n{"id": "\\udc00"}\n{"id": 3, "prompt": "after"}\n'
    out = io.StringIO()
    counts = route_jsonl(clf, io.StringIO(lines), out, 0.5, "s", "l")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert counts["lines"] == 4 and counts["errors"] == 2
    assert [r.get("id") for r in rows] == [1, 2, None, 3]
    assert "lone surrogate (\\ud83d)" in rows[1]["error"] and "lone surrogate (\\udc00)" in rows[2]["error"]
    assert "p_large" in rows[0] and "p_large" in rows[3]
    threshold, unreadable = calibrate(clf, io.StringIO(lines), 0.5)
    assert unreadable == 2 and 0.0 <= threshold <= 1.0 + 1e-6


def test_a_line_that_is_not_utf8_is_an_error_for_that_line_and_the_run_goes_on(clf: Classifier) -> None:
    """t146: the input was read as text, and its first such byte ended the run, nothing scored."""
    lines = (
        b'{"id": 1, "prompt": "hi"}\n{"id": 2, "prompt": "caf\xe9"}\n{"id": "\xff"}\nnot json \xe9\n{"prompt": "bye"}\n'
    )
    out = io.StringIO()
    counts = route_jsonl(clf, io.BytesIO(lines), out, 0.5, "s", "l")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert counts["lines"] == 5 and counts["errors"] == 3
    assert [r.get("id") for r in rows] == [1, 2, None, None, None]  # an id that is not text itself is left out
    assert [r.get("error") for r in rows[1:4]] == [
        "line 2 (id 2): not UTF-8 text: byte 25 (0xe9)",
        "line 3: not UTF-8 text: byte 9 (0xff)",
        "line 4: not UTF-8 text: byte 10 (0xe9)",
    ]
    assert "p_large" in rows[0] and "p_large" in rows[4]
    threshold, unreadable = calibrate(clf, io.BytesIO(lines), 0.5)
    assert unreadable == 3 and 0.0 <= threshold <= 1.0 + 1e-6


def test_a_files_byte_order_mark_is_read_past_and_a_json_error_names_the_files_line(clf: Classifier) -> None:
    """t162: a file saved with a BOM failed on its first line, and a JSON error said the parser's
    "line 1" of the one line, not the file's line."""
    lines = b'\xef\xbb\xbf{"id": 1, "prompt": "hi"}\n{"id": 2, "prompt": "x"}\n\xef\xbb\xbf{"id": 3}\n'
    out = io.StringIO()
    route_jsonl(clf, io.BytesIO(lines), out, 0.5, "s", "l")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert "p_large" in rows[0] and rows[0]["id"] == 1 and "p_large" in rows[1]
    assert rows[2]["error"] == "line 3: invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (column 1)"


def test_a_line_nested_too_deep_is_an_error_for_that_line_and_the_run_goes_on(clf: Classifier) -> None:
    """t201: one line 50,000 deep raised RecursionError out of the parser, and the lines after it
    were never scored; one just inside the parser's reach raised it when its text was checked."""
    deep = [f'{{"id": {"[" * depth}{"]" * depth}, "prompt": "hi"}}\n' for depth in (50_000, 990, 65)]
    lines = '{"id": 1, "prompt": "hi"}\n' + "".join(deep) + '{"id": [[1]], "prompt": "bye"}\n'
    not_utf8 = b'{"id": ' + b"[" * 990 + b"]" * 990 + b', "prompt": "caf\xe9"}\n'  # its id looked for all the same
    for source in (io.StringIO(lines), io.BytesIO(lines.encode()), io.BytesIO(lines.encode() + not_utf8)):
        out = io.StringIO()
        counts = route_jsonl(clf, source, out, 0.5, "s", "l")
        rows = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [r.get("error") for r in rows[1:4]] == [
            f"line {n}: JSON nested too deeply (more than 64 levels)" for n in (2, 3, 4)
        ]
        assert "p_large" in rows[0] and "p_large" in rows[4] and rows[4]["id"] == [[1]]
        assert rows[5:] in ([], [{"error": "line 6: not UTF-8 text: byte 2004 (0xe9)"}])
        assert counts["errors"] == len(rows) - 2
    threshold, unreadable = calibrate(clf, io.StringIO(lines), 0.5)
    assert unreadable == 3 and 0.0 <= threshold <= 1.0 + 1e-6


def test_a_json_error_names_its_column_in_the_line(clf: Classifier) -> None:
    """t201: a line cut short was "Expecting ',' delimiter (column 1)": the parser's line 2, past the newline."""
    lines = '{"id":"f","prompt":"x"\n{"id":"g","prompt":"x"}}\r\n{"id":"h","prompt":"x"'
    for source in (io.StringIO(lines), io.BytesIO(lines.encode())):
        out = io.StringIO()
        route_jsonl(clf, source, out, 0.5, "s", "l")
        assert [json.loads(x)["error"] for x in out.getvalue().splitlines()] == [
            "line 1: invalid JSON: Expecting ',' delimiter (column 23)",
            "line 2: invalid JSON: Extra data (column 24)",
            "line 3: invalid JSON: Expecting ',' delimiter (column 23)",
        ]


def test_calibrate_leaves_prompts_it_cannot_read_out_of_the_share(clf: Classifier) -> None:
    """They go large outside the gateway's target share; counted in, blank prompts filled a 30 %
    share and calibrate wrote a threshold above 1, which the gateway refuses (t55)."""
    readable = [f"Question number {n}: what is {n} times {n + 3}?" for n in range(7)]
    lines = "".join(json.dumps({"prompt": text}) + "\n" for text in [*readable, " ", "\u200b", "\u0000"])
    threshold, unreadable = calibrate(clf, io.StringIO(lines), 0.3)
    assert unreadable == 0 and 0.0 <= threshold <= 1.0
    scores = [score.p_large for score in clf.score_batch_sync(readable)]
    assert sum(score >= threshold for score in scores) == 2  # 30 % of the seven it reads
    with pytest.raises(ValueError, match="cannot read"):
        calibrate(clf, io.StringIO(json.dumps({"prompt": " "}) + "\n"), 0.3)


def test_threshold_for_share_edges() -> None:
    p = np.array([0.1, 0.2, 0.2, 0.2, 0.9])
    assert threshold_for_share(p, 0.2) == 0.9
    t = threshold_for_share(p, 0.4)  # ties at 0.2 must not overshoot 40%
    assert np.mean(p >= t) <= 0.4
    assert np.mean(p >= threshold_for_share(p, 0.0)) == 0.0
    assert np.mean(p >= threshold_for_share(p, 1.0)) == 1.0
    with pytest.raises(ValueError):
        threshold_for_share([], 0.5)


# Ten everyday requests and ten that need a frontier model, written for this test (in no
# training file): the shipped router once scored both groups alike (mean p_large 0.137 vs 0.129).
TRIVIAL = (
    "what is 2+2",
    "hi! how are you doing today?",
    "Translate 'good morning' into Spanish.",
    "What's the capital of Italy?",
    "Give me a synonym for 'happy'.",
    "Convert 5 km to meters.",
    "Fix the typos: 'I recieved your mesage yesturday.'",
    "What colour do you get when you mix blue and yellow?",
    "Write a one-line thank-you note to my neighbour for the cake.",
    "How many days are there in a week?",
)
DEMANDING = (
    "Prove that there are infinitely many primes congruent to 3 mod 4.",
    "Is a non-compete signed in California in 2019 by a software engineer enforceable after she moves "
    "to Texas? Walk through the choice-of-law analysis and the relevant statutes.",
    "Write a lock-free multi-producer multi-consumer queue in C++ with correct memory orderings and "
    "explain why ABA cannot happen.",
    "Prove that every finite group of order p^2 is abelian.",
    "A patient on warfarin starts amiodarone and fluconazole; estimate the INR effect and give a dose "
    "adjustment plan with monitoring intervals.",
    "Derive the closed form of sum_{k=1}^n k^3 binom(n,k) and prove it.",
    "Explain the tax treatment of a Section 1031 exchange with boot and a related-party seller, and "
    "compute the recognized gain: relinquished FMV 900k, basis 400k, replacement 850k, cash boot 50k.",
    "Find all integer solutions of x^2 - 7y^2 = 1 with x < 10^4 and prove your list is complete.",
    "Write a sestina about grief in which every line has exactly ten syllables.",
    "Design a consensus protocol for 5 replicas that tolerates 1 Byzantine fault and prove safety.",
)


def test_everyday_requests_score_below_demanding_ones(clf: Classifier) -> None:
    easy = np.array([s.p_large for s in clf.score_batch_sync(list(TRIVIAL))])
    hard = np.array([s.p_large for s in clf.score_batch_sync(list(DEMANDING))])
    assert hard.mean() - easy.mean() > 0.3, (easy.round(2), hard.round(2))
    pairs_ordered = (hard[:, None] > easy[None, :]).mean()  # the AUC of this little set
    assert pairs_ordered >= 0.85


def test_the_head_is_what_serves_and_the_graph_score_stays_reachable(clf: Classifier) -> None:
    graph = load_classifier(ARTIFACTS, prefer_gpu=False, use_head=False)
    assert graph is not None and clf.head_version is not None and graph.head_version is None
    served = clf.score_batch_sync(list(DEMANDING))
    raw = graph.score_batch_sync(list(DEMANDING))
    assert [s.p_large for s in served] != [s.p_large for s in raw]
    for s, r in zip(served, raw, strict=True):  # the head never touches the cache's embedding
        assert np.array_equal(s.embedding, r.embedding)


def test_a_prompt_unlike_any_training_data_leans_large(clf: Classifier) -> None:
    from dataclasses import replace

    from gateway.classifier.features import surface_features
    from gateway.classifier.head import RoutingHead

    assert isinstance(clf._head, RoutingHead)
    texts = ["What's the capital of Italy?", "lorem ipsum dolor sit amet consectetur adipiscing elit"]
    emb = np.stack([s.embedding for s in clf.score_batch_sync(texts)])
    # references: the first prompt only, so the second is as far from them as it can be
    head = replace(clf._head, reference=emb[:1], novelty_low=0.3, novelty_high=0.6, novelty_lift=0.5)
    feats = np.stack([surface_features(t) for t in texts])
    parts = head.parts(emb, np.full(2, 0.1, dtype=np.float32), feats)
    assert parts["nearest"][0] == pytest.approx(1.0, abs=1e-5) and parts["unfamiliar"][0] == 0.0
    assert parts["p_large"][0] == pytest.approx(parts["mixed"][0])
    assert parts["nearest"][1] < 0.6 and parts["unfamiliar"][1] > 0.0
    expected = parts["mixed"][1] + 0.5 * parts["unfamiliar"][1] * (1 - parts["mixed"][1])
    assert parts["p_large"][1] == pytest.approx(expected, abs=1e-6) and expected > parts["mixed"][1]
    # the shipped head's own reference and bounds: a prompt of the training kind is familiar
    shipped = clf._head.parts(emb[:1], np.full(1, 0.1, dtype=np.float32), feats[:1])
    assert shipped["unfamiliar"][0] == 0.0 and clf._head.novelty_low < clf._head.novelty_high


def test_a_prompt_longer_than_the_window_is_scored_by_the_long_head(clf: Classifier, tmp_path: Path) -> None:
    """Pasted material and a request: read at both ends and scored by the head fitted for such
    prompts; a head file from before there was one still loads and scores every prompt alike."""
    from dataclasses import replace

    from gateway.classifier.head import load_head

    assert clf._head is not None and clf._head.long_weight is not None
    material = "Row {i}: order {i} shipped on day {i} to warehouse {i}.\n"
    long_text = "".join(material.format(i=i) for i in range(60)) + "Which warehouse got order 7?"
    short_text = "Which warehouse got order 7?"
    long_score, short_score = clf.score_batch_sync([long_text, short_text])
    assert long_score.truncated and not short_score.truncated and long_score.features is not None
    parts = clf._head.parts(
        long_score.embedding[None, :], np.full(1, 0.1, dtype=np.float32), long_score.features[None, :], np.array([True])
    )
    general_only = clf._head.parts(
        long_score.embedding[None, :], np.full(1, 0.1, dtype=np.float32), long_score.features[None, :]
    )
    assert parts["p_general"][0] != general_only["p_general"][0]
    older = replace(clf._head, long_weight=None)
    older.save(tmp_path / "older.npz")
    loaded = load_head(tmp_path / "older.npz", clf.embedding_dim)
    assert loaded.long_weight is None
    assert loaded.parts(
        long_score.embedding[None, :], np.full(1, 0.1, dtype=np.float32), long_score.features[None, :], np.array([True])
    )["p_general"][0] == pytest.approx(general_only["p_general"][0])


def test_a_tampered_or_foreign_head_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "art"
    shutil.copytree(ARTIFACTS, d)
    cfg = json.loads((d / "config.json").read_text())
    head_file = d / cfg["files"]["head"]
    original = head_file.read_bytes()
    head_file.write_bytes(original[:-10] + b"0123456789")
    with _capture() as logs:
        assert load_classifier(d, prefer_gpu=False) is None
    assert any(e.get("reason") == "bad_routing_head" and "sha256" in e["error"] for e in logs)
    # a head fitted on other features: refused even when its hash is recorded
    with np.load(ARTIFACTS / cfg["files"]["head"]) as z:
        arrays = dict(z)
    arrays["feature_names"] = np.array(["something_else"] * len(arrays["feature_names"]))
    np.savez(head_file, **arrays)
    from gateway.inference import sha256_file

    cfg["sha256"][head_file.name] = sha256_file(head_file)
    (d / "config.json").write_text(json.dumps(cfg))
    with _capture() as logs:
        assert load_classifier(d, prefer_gpu=False) is None
    assert any(e.get("reason") == "bad_routing_head" and "features" in e["error"] for e in logs)
    # head file gone: refused, not silently served by the graph's benchmark-only score
    head_file.unlink()
    with _capture() as logs:
        assert load_classifier(d, prefer_gpu=False) is None
    assert any(e.get("reason") == "bad_routing_head" and "missing" in e["error"] for e in logs)


@pytest.mark.parametrize("text", ["", " ", "\n\n\n", "é" * 50_000, "1" * 10_000, "```\n" * 3000, "?" * 100])
def test_surface_features_are_finite_for_any_text(text: str) -> None:
    from gateway.classifier.features import NAMES, surface_features

    f = surface_features(text)
    assert f.shape == (len(NAMES),) and np.isfinite(f).all()


def test_surface_features_count_what_they_say() -> None:
    from gateway.classifier.features import NAMES, surface_features

    f = dict(zip(NAMES, surface_features("Rules:\n- must be exactly 3 lines\n- avoid 'the'\n2. x = 4^2?"), strict=True))
    assert f["log_list_items"] == pytest.approx(np.log1p(3))
    assert f["log_numbers"] == pytest.approx(np.log1p(4))
    assert f["question_marks"] == 1
    assert f["non_ascii_share"] == 0.0
