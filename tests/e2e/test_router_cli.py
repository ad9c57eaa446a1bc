"""``python -m gateway route`` and ``calibrate`` on the committed classifier, as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config.edit import set_route_threshold

PROMPTS = [
    {"prompt": "hi there"},
    {"prompt": "A train leaves at 3pm going 60 mph; another leaves at 4pm going 80 mph. When does it catch up?"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}]},
    {"prompt": "Which of the following is a prime number? A) 21 B) 27 C) 29 D) 33"},
] * 5

POLICY = """\
# policies.yaml: what ops edit (laid out as the shipped one, which is the user's to edit: t96).
version: 1
pair:
  small: small
  large: large
models:
  small:
    base_url: ${SMALL_MODEL_URL}
    price: {input: 0.20, output: 0.20}
    tier: small
  large:
    base_url: ${LARGE_MODEL_URL}
    price: {input: 2.50, output: 10.00}
    tier: large
routes:
  auto:
    strategy: classifier
    model: small
    fallbacks: [large]
    # p_large at or above this goes to large; calibrate writes it
    threshold: 0.80
    # the route's other settings follow
    target_large_share: 0.3
  fast:
    model: small
    fallbacks: [large]
auth:
  mode: none
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """The tests' own policy file: the checkout's policies.yaml is the user's (t96)."""
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY)
    return path


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_route_writes_one_decision_per_prompt(tmp_path: Path, policy: Path) -> None:
    sample = tmp_path / "prompts.jsonl"
    sample.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    result = _run("route", "--jsonl", str(sample), "--policies", str(policy), "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(PROMPTS)
    for line in lines:
        assert 0 <= line["p_large"] <= 1 and line["decision"] in ("small", "large")
        assert line["model"] == line["decision"]  # the pair is named small / large
        assert (line["p_large"] >= 0.5) == (line["decision"] == "large")


def test_calibrate_hits_the_share_and_writes_the_threshold_keeping_comments(policy: Path) -> None:
    sample = "".join(json.dumps({"prompt": f"question number {i} about {topic}"}) + "\n"
                     for i, topic in enumerate(["maths", "history", "chemistry", "law", "poetry"] * 8))  # fmt: skip
    result = _run(
        "calibrate", "--target-large-share", "0.25", "--jsonl", "-", "--policies", str(policy), "--write", stdin=sample
    )
    assert result.returncode == 0, result.stderr
    threshold = float(result.stdout.strip())
    routed = _run("route", "--jsonl", "-", "--policies", str(policy), stdin=sample)
    decisions = [json.loads(line)["decision"] for line in routed.stdout.splitlines()]
    assert decisions.count("large") == 10  # 25 % of 40: the threshold is written exactly, not rounded
    everything = _run(
        "calibrate", "--target-large-share", "1", "--jsonl", "-", "--policies", str(policy), "--write", stdin=sample
    )
    assert everything.returncode == 0, everything.stderr
    routed_all = _run("route", "--jsonl", "-", "--policies", str(policy), stdin=sample)
    assert [json.loads(line)["decision"] for line in routed_all.stdout.splitlines()] == ["large"] * 40
    # a threshold just above a score (share 0; a prompt repeated at the cut) stays above it once written
    repeated = sample + "".join(json.dumps({"prompt": "question number 7 about law"}) + "\n" for _ in range(9))
    for share, most in ((0.0, 0), (0.3, 14)):
        assert _run(
            "calibrate", "--target-large-share", str(share), "--jsonl", "-", "--policies", str(policy), "--write",
            stdin=repeated,
        ).returncode == 0  # fmt: skip
        routed_now = _run("route", "--jsonl", "-", "--policies", str(policy), stdin=repeated)
        assert [json.loads(line)["decision"] for line in routed_now.stdout.splitlines()].count("large") <= most
    _run(
        "calibrate", "--target-large-share", "0.25", "--jsonl", "-", "--policies", str(policy), "--write", stdin=sample
    )
    text = policy.read_text()
    assert f"threshold: {threshold!r}" in text
    assert "# p_large at or above this goes to large; calibrate writes it\n" in text  # comments survive
    assert text == POLICY.replace("threshold: 0.80", f"threshold: {threshold!r}")  # and every other line


def test_calibrate_writing_for_another_share_than_the_routes_target_says_so(policy: Path) -> None:
    """t178: the route keeps its own target_large_share, and the threshold written for another
    share is only where it starts: said in one line, the threshold still written."""
    sample = "".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20))
    result = _run("calibrate", "--target-large-share", "0.25", "--jsonl", "-", "--policies", str(policy), "--write",
                  stdin=sample)  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = [line for line in _said(result.stderr) if line.startswith("note: ")]
    assert notes == [
        "note: routes.auto has target_large_share 0.3, not 0.25: its threshold moves to keep that share on the "
        "large model, and the one written is only where it starts (before its first shared value for that target)"
    ]
    assert f"threshold: {float(result.stdout)!r}" in policy.read_text()
    same = _run("calibrate", "--target-large-share", "0.3", "--jsonl", "-", "--policies", str(policy), "--write",
                stdin=sample)  # fmt: skip
    assert same.returncode == 0 and not [line for line in _said(same.stderr) if line.startswith("note: ")]


def test_threshold_edit_handles_flow_and_block_routes(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("routes:\n  auto: {strategy: classifier, model: s}  # keep me\n  blocky:\n    model: s\n")
    set_route_threshold(policy, "auto", 0.25)
    set_route_threshold(policy, "blocky", 0.5)
    set_route_threshold(policy, "auto", 0.3)
    assert policy.read_text() == (
        "routes:\n  auto: {strategy: classifier, model: s, threshold: 0.3}  # keep me\n  blocky:\n    threshold: 0.5\n    model: s\n"
    )
    policy.write_text("routes:\n  empty: {}\n")
    set_route_threshold(policy, "empty", 0.4)  # no ", " before the first key of an empty flow mapping
    assert policy.read_text() == "routes:\n  empty: {threshold: 0.4}\n"


def test_a_threshold_shared_through_a_yaml_anchor_is_refused_not_spliced(tmp_path: Path) -> None:
    """t88: with ``threshold: &t 0.8`` in one route and ``*t`` in another, writing the second's
    rewrote the first's line and dropped the anchor: said written (exit 0), the file no longer
    YAML, and the gateway kept the old policy."""
    policy = tmp_path / "p.yaml"
    shared = "routes:\n  auto:\n    model: s\n    threshold: &t 0.8\n  glob:\n    model: s\n    threshold: *t\n"
    whole = "routes:\n  auto: &r\n    model: s\n    threshold: 0.8\n  glob: *r\n"  # t90: a route aliased whole
    for text in (shared, whole):
        for route in ("glob", "auto"):  # the alias, and the anchored value the alias reads
            policy.write_text(text)
            with pytest.raises(ValueError, match="by hand"):
                set_route_threshold(policy, route, 0.25)
            assert policy.read_text() == text
    sample = "".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20))
    full = tmp_path / "policies.yaml"
    text = POLICY.replace("threshold: 0.80", "threshold: &shared 0.80", 1)
    assert "&shared" in text
    full.write_text(text + "\n# a later edit\n")
    result = _run("calibrate", "--target-large-share", "0.25", "--jsonl", "-", "--policies", str(full), "--write",
                  stdin=sample)  # fmt: skip
    assert result.returncode == 0, result.stderr  # an anchor nothing else reads: the value is its own


def test_calibrate_exits_1_when_lines_were_unreadable_as_route_does(policy: Path) -> None:
    sample = "".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20)) + 'not json\n{"x": 1}\n'
    result = _run(
        "calibrate", "--target-large-share", "0.25", "--jsonl", "-", "--policies", str(policy), "--write", stdin=sample
    )
    assert result.returncode == 1 and "2 line(s) could not be read" in result.stderr
    assert policy.read_text() == POLICY  # nothing written


def test_route_and_calibrate_go_on_past_a_lone_surrogate(policy: Path) -> None:
    """A \\ud83d escape alone (Python's json writes half an emoji so) took the whole run down
    with a traceback, the good lines before it never printed (t51)."""
    sample = '{"id": 1, "prompt": "hello"}\n{"id": 2, "prompt": "x \\ud83d y"}\n{"id": 3, "prompt": "after"}\n'
    routed = _run("route", "--jsonl", "-", "--policies", str(policy), stdin=sample)
    assert routed.returncode == 1 and "Traceback" not in routed.stderr
    rows = [json.loads(line) for line in routed.stdout.splitlines()]
    assert [row["id"] for row in rows] == [1, 2, 3]
    assert "p_large" in rows[0] and "lone surrogate" in rows[1]["error"] and "p_large" in rows[2]
    calibrated = _run("calibrate", "--target-large-share", "0.5", "--jsonl", "-", "--policies", str(policy),
                      stdin=sample)  # fmt: skip
    assert calibrated.returncode == 1 and "Traceback" not in calibrated.stderr
    assert "1 line(s) could not be read" in calibrated.stderr


def test_route_and_calibrate_go_on_past_a_line_that_is_not_utf8(tmp_path: Path, policy: Path) -> None:
    """t146: one Latin-1 byte and nothing was scored, not even the lines before it ("cannot read
    ...: not UTF-8 text", exit 1): the line gets its error, with its number and id, as an invalid line does."""
    sample = tmp_path / "latin1.jsonl"
    sample.write_bytes(b'{"id": 1, "prompt": "hi"}\n\n{"id": 2, "prompt": "caf\xe9"}\n{"id": 3, "prompt": "bye"}\n')
    for source, stdin in ((str(sample), None), ("-", sample.read_bytes())):
        routed = subprocess.run(
            [sys.executable, "-m", "gateway", "route", "--jsonl", source, "--policies", str(policy)],
            input=stdin, capture_output=True, timeout=120,
        )  # fmt: skip
        assert routed.returncode == 1 and b"Traceback" not in routed.stderr, routed.stderr
        rows = [json.loads(line) for line in routed.stdout.splitlines()]
        assert [row["id"] for row in rows] == [1, 2, 3]
        assert "p_large" in rows[0] and "p_large" in rows[2]
        assert rows[1]["error"] == "line 3 (id 2): not UTF-8 text: byte 25 (0xe9)"
        assert b"3 prompts: " in routed.stderr and b"1 line(s) could not be read" in routed.stderr
    calibrated = subprocess.run(
        [sys.executable, "-m", "gateway", "calibrate", "--target-large-share", "0.5", "--jsonl", str(sample),
         "--policies", str(policy), "--write"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert calibrated.returncode == 1 and "Traceback" not in calibrated.stderr
    assert "1 line(s) could not be read; nothing written" in calibrated.stderr and float(calibrated.stdout)
    assert policy.read_text() == POLICY


def test_every_line_route_cannot_read_is_named_by_its_line_and_id(policy: Path) -> None:
    """t200: "invalid JSON on line 3" named its line, but a line of the wrong shape, such as
    `{"prompt": 5}`, got an error naming neither its line nor its id."""
    sample = (
        '{"id": "ok", "prompt": "hi"}\n'
        '{"prompt": 5}\n'
        "\n"
        '{"id": "q7", "prompt": 5}\n'
        "[1, 2]\n"
        '{"id": 9, "messages": ["hi"]}\n'
        '{"id": "x", "prompt": "a \\ud83d b"}\n'
        "not json\n"
        '{"id": "ok2", "messages": [{"role": "user", "content": "hello"}]}\n'
    )
    routed = _run("route", "--jsonl", "-", "--policies", str(policy), stdin=sample)
    assert routed.returncode == 1 and "Traceback" not in routed.stderr, routed.stderr
    rows = [json.loads(line) for line in routed.stdout.splitlines()]
    assert [row.get("error") for row in rows] == [
        None,
        "line 2: needs a 'prompt' string or a 'messages' list",
        "line 4 (id \"q7\"): needs a 'prompt' string or a 'messages' list",
        "line 5: not a JSON object",
        "line 6 (id 9): messages[0] is not an object",
        'line 7 (id "x"): not valid Unicode: a lone surrogate (\\ud83d), half of a character',
        "line 8: invalid JSON: Expecting value (column 1)",
        None,
    ]
    assert [row.get("id") for row in rows] == ["ok", None, "q7", None, 9, "x", None, "ok2"]
    assert "8 prompts: " in routed.stderr and "6 line(s) could not be read" in routed.stderr


def test_route_and_calibrate_go_on_past_a_line_nested_too_deep(policy: Path) -> None:
    """t201: one line 50,000 deep ended the run with a RecursionError traceback, the lines after it unscored."""
    sample = (
        '{"id": 1, "prompt": "hi"}\n'
        + '{"id": ' + "[" * 50_000 + "]" * 50_000 + ', "prompt": "hi"}\n'
        + '{"id":"f","prompt":"x"\n'
        + '{"id": 3, "prompt": "after"}\n'
    )  # fmt: skip
    routed = _run("route", "--jsonl", "-", "--policies", str(policy), stdin=sample)
    assert routed.returncode == 1 and "Traceback" not in routed.stderr, routed.stderr
    rows = [json.loads(line) for line in routed.stdout.splitlines()]
    assert [row.get("error") for row in rows] == [
        None,
        "line 2: JSON nested too deeply (more than 64 levels)",
        "line 3: invalid JSON: Expecting ',' delimiter (column 23)",
        None,
    ]
    assert rows[3]["id"] == 3 and "p_large" in rows[3]
    calibrated = _run("calibrate", "--target-large-share", "0.5", "--jsonl", "-", "--policies", str(policy),
                      stdin=sample)  # fmt: skip
    assert calibrated.returncode == 1 and "Traceback" not in calibrated.stderr, calibrated.stderr
    assert "2 line(s) could not be read" in calibrated.stderr


def _into_a_closed_pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ... | head -1`` where head has already gone: every write to stdout fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args], stdout=write, stderr=subprocess.PIPE, text=True, env=env,
            timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)


def _said(stderr: str) -> list[str]:
    """What a command says on stderr, less the classifier's log line."""
    return [line for line in stderr.splitlines() if "classifier_loaded" not in line]


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path, policy: Path) -> None:
    """t146: `check p.yaml | head -1` ended in a BrokenPipeError traceback, and `route ... | head -1`
    said "cannot read many.jsonl: Broken pipe", blaming the input for the output."""
    sample = tmp_path / "many.jsonl"
    sample.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS * 20))
    for buffered in (True, False):  # the same either way: not left to when the buffer fills
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
            {} if buffered else {"PYTHONUNBUFFERED": "1"}
        )
        checked = _into_a_closed_pipe("check", str(policy), "--data-dir", str(tmp_path / "no-data"), env=env)
        assert (checked.returncode, checked.stderr) == (0, "")  # its verdict was made: the file is valid
        routed = _into_a_closed_pipe("route", "--jsonl", str(sample), "--policies", str(policy), env=env)
        assert (routed.returncode, _said(routed.stderr)) == (1, [])  # cut short: not every prompt was scored
        calibrated = _into_a_closed_pipe("calibrate", "--target-large-share", "0.5", "--jsonl", str(sample),
                                         "--policies", str(policy), "--write", env=env)  # fmt: skip
        assert (calibrated.returncode, _said(calibrated.stderr)) == (1, []) and policy.read_text() == POLICY


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_route_names_the_output_it_cannot_finish_writing(tmp_path: Path, policy: Path) -> None:
    """t146: a write that failed was said as "cannot read" of the input."""
    sample = tmp_path / "prompts.jsonl"
    sample.write_text(json.dumps({"prompt": "hi"}) + "\n")
    result = _run("route", "--jsonl", str(sample), "--policies", str(policy), "--output", "/dev/full")
    assert (result.returncode, _said(result.stderr)) == (1, ["cannot write /dev/full: No space left on device"])


def test_calibrate_does_not_write_over_a_threshold_read_from_the_environment(policy: Path) -> None:
    """t146: `threshold: ${THR:-0.8}` was replaced by a number, the variable silently no longer read."""
    text = POLICY.replace("threshold: 0.80", "threshold: ${THR:-0.8}")
    policy.write_text(text)
    sample = "".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20))
    result = _run(
        "calibrate", "--target-large-share", "0.25", "--jsonl", "-", "--policies", str(policy), "--write", stdin=sample
    )
    threshold = float(result.stdout)
    assert result.returncode == 1 and policy.read_text() == text
    assert (
        f"routes.auto.threshold is ${{THR:-0.8}}, read from the environment: nothing written; set THR to {threshold!r}"
        in result.stderr
    )
    with pytest.raises(ValueError, match="nothing written"):
        set_route_threshold(policy, "auto", 0.5)
    assert policy.read_text() == text


def test_route_names_the_output_it_cannot_write(tmp_path: Path, policy: Path) -> None:
    """It said 'cannot read prompts.jsonl' of an input that was there (t51)."""
    sample = tmp_path / "prompts.jsonl"
    sample.write_text(json.dumps({"prompt": "hi"}) + "\n")
    out = tmp_path / "missing" / "out.jsonl"
    result = _run("route", "--jsonl", str(sample), "--policies", str(policy), "--output", str(out))
    assert result.returncode == 1
    assert result.stderr.strip() == f"cannot write {out}: No such file or directory"


def test_route_never_empties_its_input_or_an_output_it_then_fails_to_write(tmp_path: Path, policy: Path) -> None:
    """--output set to the input emptied it and said '0 prompts'; an existing output was emptied
    before the classifier loaded, and lost when that failed (t55)."""
    sample = tmp_path / "prompts.jsonl"
    sample.write_text(json.dumps({"prompt": "hi"}) + "\n")
    same = _run("route", "--jsonl", str(sample), "--policies", str(policy), "--output", str(sample))
    assert same.returncode == 1 and "is the input" in same.stderr
    assert sample.read_text() == json.dumps({"prompt": "hi"}) + "\n"
    kept = tmp_path / "earlier.jsonl"
    kept.write_text("an earlier run's decisions\n")
    failed = _run("route", "--jsonl", str(sample), "--policies", str(policy), "--output", str(kept),
                  "--artifacts", str(tmp_path / "no-artifacts"))  # fmt: skip
    assert failed.returncode != 0 and kept.read_text() == "an earlier run's decisions\n"
