"""The classifier over a batch of prompts, for the ``route`` and ``calibrate`` commands (no upstream is called).

route_jsonl: one JSON line in (``prompt`` string or ``messages`` list), one out:
``{"p_large", "decision": "large"|"small"|"unreadable", "model", "text_chars"}`` plus the input's
``id`` when it has one. Lines that are not valid (not UTF-8 text included: the input is decoded
line by line) get ``{"error": ...}``, which names the line (and its ``id``), and the run goes on.
A prompt the router cannot read (no text that shows, an image in the last user turn) gets
``p_large`` 1 and the decision ``unreadable``, as in the gateway (:func:`gateway.classifier.text.unreadable`).

calibrate: the threshold that sends ``target_large_share`` of the sample to the large
model (the (1 - share) quantile of ``p_large``), optionally written into a policy file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from gateway.classifier.runtime import Classifier
from gateway.classifier.text import messages_unreadable, select_from_turns, select_text, unreadable

BATCH = 32


_Source = str | Path | IO[str] | IO[bytes] | None
"""A path, ``-`` or None for stdin, or a file object (bytes are decoded line by line)."""


class WriteFailed(Exception):
    """The output could not be written (:attr:`error`): not the input's fault (t146)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _open_in(src: _Source) -> tuple[IO[str] | IO[bytes], bool]:
    if src is None or src == "-":
        return sys.stdin.buffer, False
    if isinstance(src, (str, Path)):
        return open(src, "rb"), True
    return src, False


def _open_out(dst: str | Path | IO[str] | None) -> tuple[IO[str], bool]:
    if dst is None or dst == "-":
        return sys.stdout, False
    if isinstance(dst, (str, Path)):
        return open(dst, "w", encoding="utf-8"), True
    return dst, False


class _Prompt(NamedTuple):
    """One line: the text the router reads of it and whether it can read it, or why not."""

    record: dict[str, Any] | None
    text: str = ""
    unreadable: bool = False
    error: str | None = None


def _texts(lines: Iterable[str | bytes]) -> Iterator[_Prompt]:
    """One per non-empty line; an error names the line, and its ``id`` where it has one (t200)."""
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if isinstance(raw, str):
            line = raw
        else:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # t146: read as text, the file's first such byte ended the run
                named = _id_of(raw)
                undecoded = f"not UTF-8 text: byte {exc.start + 1} (0x{raw[exc.start]:02x})"
                yield _Prompt(named, error=_on_line(number, named, undecoded))
                continue
        if number == 1:
            line = line.removeprefix("\ufeff")  # the byte-order mark a Windows editor writes
        rec, unread = _decoded(line)
        if unread is not None:
            yield _Prompt(None, error=_on_line(number, None, unread))
            continue
        if not isinstance(rec, dict):
            yield _Prompt(None, error=_on_line(number, None, "not a JSON object"))
            continue
        surrogate = _lone_surrogate(rec)
        if surrogate is not None:  # the tokenizer raised on it, and took the whole batch down (t51)
            named = {"id": rec["id"]} if "id" in rec and _lone_surrogate(rec["id"]) is None else None
            yield _Prompt(named, error=_on_line(number, named, surrogate))
            continue
        messages = rec.get("messages")
        if isinstance(messages, list):
            problem = _messages_problem(messages)
            if problem is not None:
                yield _Prompt(rec, error=_on_line(number, rec, problem))
            else:
                text = select_text(messages)
                yield _Prompt(rec, text, messages_unreadable(messages, text))
        elif isinstance(rec.get("prompt"), str):
            text = select_from_turns([("user", rec["prompt"])])  # as the gateway reads one user turn
            yield _Prompt(rec, text, unreadable(text, image_last=False))
        else:
            yield _Prompt(rec, error=_on_line(number, rec, "needs a 'prompt' string or a 'messages' list"))


_ID_SHOWN = 64
"""Characters of an ``id`` an error quotes: the output line carries it whole."""


def _on_line(number: int, record: dict[str, Any] | None, problem: str) -> str:
    """``line 4 (id "q7"): <problem>``: the output's error lines are found in the input by either."""
    if record is None or "id" not in record:
        return f"line {number}: {problem}"
    shown = json.dumps(record["id"], ensure_ascii=False)
    if len(shown) > _ID_SHOWN:
        shown = shown[: _ID_SHOWN - 3] + "..."
    return f"line {number} (id {shown}): {problem}"


_DEPTH = 64
"""How deep a line's JSON may nest (a prompt's nests a few levels): Python's parser, and its writer
that checks the text, stop at its recursion limit, which a line 50,000 deep reached, ending the run (t201)."""
_TOO_DEEP = f"JSON nested too deeply (more than {_DEPTH} levels)"


def _decoded(line: str) -> tuple[Any, str | None]:
    """The line's JSON value, or why it has none. The line's end is left out: with it, an error at the
    end of a cut line was the parser's line 2, column 1 (t201)."""
    try:
        value = json.loads(line.rstrip("\r\n"))
    except RecursionError:
        return None, _TOO_DEEP
    except ValueError as exc:  # the parser's own "line 1" is within the line: the caller says which line (t162)
        said = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return None, f"invalid JSON: {said}"
    return (None, _TOO_DEEP) if _deeper_than(value, _DEPTH) else (value, None)


def _deeper_than(value: Any, levels: int) -> bool:
    """Whether more than ``levels`` lists and objects nest in ``value``, found level by level, not by recursion."""
    level = [value]
    for _ in range(levels):
        level = [
            item
            for container in level
            if isinstance(container, dict | list)
            for item in (container.values() if isinstance(container, dict) else container)
        ]
        if not level:
            return False
    return any(isinstance(item, dict | list) for item in level)


def _id_of(raw: bytes) -> dict[str, Any] | None:
    """The ``id`` of a line that is not UTF-8, where the line is JSON and the id itself is text."""
    rec, _ = _decoded(raw.decode("utf-8", "surrogateescape"))
    if isinstance(rec, dict) and "id" in rec and _lone_surrogate(rec["id"]) is None:
        return {"id": rec["id"]}
    return None


def _lone_surrogate(value: Any) -> str | None:
    """Why a value that JSON decodes is not text (a ``\\ud83d`` escape alone, which Python's
    ``json`` writes for half an emoji): the gateway refuses such a body too."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        half = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        return f"not valid Unicode: a lone surrogate ({half}), half of a character"
    return None


def _messages_problem(messages: list[Any]) -> str | None:
    """What the gateway would refuse in chat ``messages`` (so they are not scored as something else)."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] is not an object"
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            return f"messages[{index}].content must be a string or a list of parts"
    return None


_Scored = tuple[dict[str, Any] | None, str | None, float | None, str | None, bool]
"""A line's record, its text, ``p_large``, the error that kept it from being scored, and whether
the router could not read it (then ``p_large`` is 1, as the gateway sends it)."""


def _scores(classifier: Classifier, src: Iterable[str | bytes]) -> Iterator[_Scored]:
    pending: list[_Prompt] = []

    def flush() -> Iterator[_Scored]:
        scored = iter(classifier.score_batch_sync([p.text for p in pending if not p.unreadable]))
        for p in pending:
            yield p.record, p.text, 1.0 if p.unreadable else next(scored).p_large, None, p.unreadable
        pending.clear()

    for prompt in _texts(src):
        if prompt.error is not None:
            yield from flush()
            yield prompt.record, None, None, prompt.error, False
            continue
        pending.append(prompt)
        if len(pending) >= BATCH:
            yield from flush()
    yield from flush()


def route_jsonl(
    classifier: Classifier,
    input_path: _Source,
    output: str | Path | IO[str] | None,
    threshold: float,
    small_model: str,
    large_model: str,
) -> dict[str, int]:
    """Score every line of ``input_path`` (path, ``-``/None for stdin, or a file object)
    and write one decision line per input to ``output``. Returns counts; :class:`WriteFailed`
    when the output cannot be written."""
    src, close_src = _open_in(input_path)
    dst, close_dst = _open_out(output)
    counts = {"lines": 0, "large": 0, "small": 0, "errors": 0}
    try:
        for rec, text, p, err, unseen in _scores(classifier, src):
            counts["lines"] += 1
            out: dict[str, Any] = {}
            if rec is not None and "id" in rec:
                out["id"] = rec["id"]
            if err is not None:
                counts["errors"] += 1
                out["error"] = err
            else:
                assert p is not None and text is not None
                large = p >= threshold
                counts["large" if large else "small"] += 1
                out |= {
                    "p_large": p,
                    "decision": "unreadable" if unseen else "large" if large else "small",  # as the gateway logs
                    "model": large_model if large else small_model,
                    "threshold": threshold,
                    "text_chars": len(text),
                }
            try:
                dst.write(json.dumps(out, ensure_ascii=False) + "\n")
            except OSError as exc:
                raise WriteFailed(exc) from exc
        try:
            dst.flush()
        except OSError as exc:
            raise WriteFailed(exc) from exc
    finally:
        if close_src:
            src.close()
        if close_dst:
            dst.close()
    return counts


def threshold_for_share(p_large: np.ndarray | list[float], target_large_share: float) -> float:
    """Smallest threshold t with mean(p >= t) <= target (ties never overshoot the share)."""
    if not 0.0 <= target_large_share <= 1.0:
        raise ValueError("target_large_share must be in [0, 1]")
    p = np.sort(np.asarray(p_large, dtype=np.float64))[::-1]
    n = len(p)
    if n == 0:
        raise ValueError("no prompts to calibrate on")
    k = int(np.floor(target_large_share * n + 1e-9))  # number of prompts sent to large
    if k <= 0:  # above every score, within [0, 1]: a policy takes no other threshold (t55)
        return float(np.nextafter(p[0], np.inf)) if p[0] < 1.0 else 1.0
    if k >= n:
        return float(p[-1])
    # p[k-1] is the k-th largest; if it ties with p[k], move up to the next distinct value
    t = p[k - 1]
    if p[k] == t:
        higher = p[:k][p[:k] > t]
        return float(higher[-1]) if len(higher) else float(np.nextafter(t, np.inf))
    return float(t)


def calibrate(classifier: Classifier, jsonl_path: _Source, target_large_share: float) -> tuple[float, int]:
    """Threshold on ``p_large`` that sends ``target_large_share`` of the sample to the large model,
    and how many lines could not be read (the caller decides whether that is fatal). Prompts the
    router cannot read go large outside the share, as the gateway's target share counts them (t55:
    counted in, they filled it and the threshold came out above 1)."""
    src, close = _open_in(jsonl_path)
    unreadable = outside = 0
    ps: list[float] = []
    try:
        for _, _, p, err, unseen in _scores(classifier, src):
            if err is not None or p is None:
                unreadable += 1
            elif not unseen:
                ps.append(p)
            else:
                outside += 1
    finally:
        if close:
            src.close()
    if not ps and outside:
        raise ValueError("every prompt is one the router cannot read (they go large outside the share)")
    return threshold_for_share(ps, target_large_share), unreadable
