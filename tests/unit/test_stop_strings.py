"""Stop strings applied by the gateway, for upstreams that refuse ``stop`` (OpenAI's reasoning models)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.upstreams.stop_strings import StopWatch, cut_blocks, cut_choices, stops_of


def _streamed(pieces: list[str], stops: tuple[str, ...], *, ended: bool = True) -> tuple[str, str | None]:
    watch = StopWatch(stops)
    out = "".join(watch.take(piece) for piece in pieces)
    if ended and watch.matched is None:
        out += watch.flush()
    return out, watch.matched


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (
            ["Thought: look it up\nAct", "ion: search\nObserv", "ation: 42"],
            ("Observation:",),
            "Thought: look it up\nAction: search\n",
        ),
        (["a", "b", "c", "S", "T", "O", "P", "tail"], ("STOP",), "abc"),
        (["no stop here"], ("STOP",), "no stop here"),
        (["ends with ST"], ("STOP",), "ends with ST"),  # a held tail that never completed goes out at the end
        (["x", "ab"], ("ab", "a"), "x"),  # the shorter stop at the same place: seen first
        (["one END two ###"], ("###", "END"), "one "),  # the earliest, whichever stop it is
        (["", "A", "", "B"], ("AB",), ""),
        (["made up\nAc", "tion"], ("up\nAc", "p"), "made u"),  # the one that completes first (t53)
    ],
)
def test_a_stream_is_cut_where_its_first_stop_string_begins(
    pieces: list[str], stops: tuple[str, ...], expected: str
) -> None:
    out, matched = _streamed(pieces, stops)
    assert out == expected
    whole = "".join(pieces)
    # the same cut as the whole text gets, piece by piece or not
    assert cut_choices(data := {"choices": [{"message": {"content": whole}}]}, stops) is (matched is not None)
    assert data["choices"][0]["message"]["content"] == expected


def test_nothing_that_may_still_become_a_stop_string_goes_out_early() -> None:
    watch = StopWatch(("\nObservation:",))
    assert watch.take("Action: x\nObs") == "Action: x"
    assert watch.take("ervation") == ""
    assert watch.take("al notes") == "\nObservational notes"
    assert watch.matched is None
    assert watch.take("\nObservation: y") == ""
    assert watch.matched == "\nObservation:"
    assert watch.take("more") == ""  # nothing after the stop


def test_a_completion_says_which_stop_ended_each_choice() -> None:
    data: dict[str, Any] = {
        "choices": [
            {"index": 0, "message": {"content": "1, 2, 3, 4", "tool_calls": [{"id": "c"}]}, "finish_reason": "length"},
            {"index": 1, "message": {"content": "no match"}, "finish_reason": "stop"},
            {"index": 2, "message": {"content": None, "tool_calls": []}, "finish_reason": "tool_calls"},
        ]
    }
    assert cut_choices(data, (", 3",))
    first, second, third = data["choices"]
    # a call written after the text is past the stop, as a stream cut there never shows it (t53)
    assert first == {"index": 0, "message": {"content": "1, 2"}, "finish_reason": "stop", "stop_reason": ", 3"}
    assert second["message"]["content"] == "no match" and "stop_reason" not in second
    assert third["finish_reason"] == "tool_calls"


def test_stops_of_reads_the_chat_field() -> None:
    assert stops_of("x") == ("x",)
    assert stops_of(["a", "", 3, "b"]) == ("a", "b")
    assert stops_of(None) == () and stops_of("") == ()


_CALL = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}


@pytest.mark.parametrize(
    ("texts", "stops", "kept", "matched"),
    [
        (["Let me check.", None, "Done."], ("\n",), ["Let me check.", None, "Done."], None),  # t58: no joiner seen
        (["Let me check.", None, "Done.\nLater"], ("\n",), ["Let me check.", None, "Done."], "\n"),  # the call stays
        (["Thought\nmore", None, "Done."], ("\n",), ["Thought"], "\n"),  # a call after the cut goes
        (["ab", "cd", None], ("bc",), ["a"], "bc"),  # text blocks in a row are one text
        (["ab", None, "cd"], ("bc",), ["ab", None, "cd"], None),  # not across a call
        (["x", "STOP"], ("STOP",), ["x"], "STOP"),
    ],
)
def test_a_message_is_cut_at_its_first_stop_string_in_the_text_the_model_wrote(
    texts: list[str | None], stops: tuple[str, ...], kept: list[str | None], matched: str | None
) -> None:
    blocks = [_CALL if text is None else {"type": "text", "text": text} for text in texts]
    out, found = cut_blocks(blocks, stops)
    assert [None if block["type"] == "tool_use" else block["text"] for block in out] == kept
    assert found == matched
