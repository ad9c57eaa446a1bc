"""What translating a large Anthropic Messages request costs, step by step, on the CPU.

A request shaped like Claude Code's (a long system prompt with a cache breakpoint, 20 tools,
40 tool-using turns: about 160 KiB of JSON) is taken the way a Messages request to an
Anthropic route goes when it is translated (``gateway/api/messages.py``):

* edge: the Messages codec decodes it, and the body is read once more for fields the codec
  does not read (what decides between translating and passing through);
* the pipeline's own steps on the internal request the edge hands over: counting the prompt's
  tokens and the exact-cache key. Beside them, what the hop to the pipeline cost while its
  steps read a chat body: the internal model written as chat (and then checked, not timed here;
  until this change), or that body sent as JSON bytes and parsed again (until the morning of
  2026-12-01);
* provider: the internal model written as Anthropic's request; beside it, a chat client's body
  checked and read into the internal model first (what every chat request now pays once).

Beside them, one plain JSON decode of the body (about what a passed-through request costs).

Then a streamed answer of 400 text events from Anthropic to a Messages client, per event:
as the pipeline passes it now (the upstream's deltas straight to the client's encoder) and
as it did through chat chunks (each delta written as a chunk, framed, parsed again and read
back into deltas) until 2026-12-01. Medians of 30 runs after 5 warm-ups, in one process;
compare only within one run.

    python -m tests.bench.translation_bench
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.cache.keys import exact_key
from gateway.protocols import anthropic_messages as anthropic
from gateway.protocols import openai_chat
from gateway.protocols.chat_request import parse_chat_request
from gateway.tokens import count_prompt

RUNS = 30


def claude_code_shaped() -> bytes:
    system = "You are Claude Code. " + "Follow the project's conventions carefully. " * 800
    properties = {f"p{j}": {"type": "string", "description": "a parameter"} for j in range(8)}
    tools = [
        {"name": f"tool_{i}", "description": "Does a thing. " * 30,
         "input_schema": {"type": "object", "properties": properties}}
        for i in range(20)
    ]  # fmt: skip
    messages: list[dict[str, Any]] = []
    for turn in range(40):
        ask = f"Please look at file number {turn} and fix the bug in it. " * 20
        messages += [
            {"role": "user", "content": [{"type": "text", "text": ask}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Looking at it now. " * 30},
                {"type": "tool_use", "id": f"toolu_{turn}", "name": "tool_1", "input": {"p0": "x" * 200}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": f"toolu_{turn}", "content": "result line\n" * 60}
            ]},
        ]  # fmt: skip
    messages.append({"role": "user", "content": "Now summarise."})
    body = {
        "model": "claude",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": messages,
        "tools": tools,
        "stream": True,
    }
    return msgspec.json.encode(body)


def _anthropic_text_events(count: int) -> list[dict[str, Any]]:
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 10}}}
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    texts = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"word{i} "}}
        for i in range(count)
    ]
    end: list[dict[str, Any]] = [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": count}},
        {"type": "message_stop"},
    ]
    return [start, block, *texts, *end]


def _median_ms(step: Callable[[], object]) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    raw = claude_code_shaped()
    decoded = anthropic.decode_request(raw)
    chat = msgspec.json.encode(openai_chat.to_chat_body(decoded))

    def edge() -> object:
        return anthropic.decode_request(raw), anthropic.fields_not_read(msgspec.json.decode(raw))

    def chat_hop_as_bytes() -> object:
        return parse_chat_request(msgspec.json.encode(openai_chat.to_chat_body(decoded)))

    def provider() -> object:
        return msgspec.json.encode(anthropic.encode_request(decoded, "claude-sim", stream=True))

    def provider_from_chat() -> object:
        request = openai_chat.read_chat_request(parse_chat_request(chat))
        return msgspec.json.encode(anthropic.encode_request(request, "claude-sim", stream=True))

    events = _anthropic_text_events(400)

    def stream_as_deltas() -> object:
        decoder, encoder = anthropic.StreamDecoder(), anthropic.StreamEncoder("msg_1", "claude", 0)
        return [encoder.feed(decoder.feed(event)) for event in events]

    def stream_through_chunks() -> object:
        decoder, encoder = anthropic.StreamDecoder(), anthropic.StreamEncoder("msg_1", "claude", 0)
        reader, writer, out = openai_chat.ChunkReader(), openai_chat.ChunkDeltas(), []
        for event in events:
            for delta in decoder.feed(event):
                chunk = writer.delta(delta)
                if chunk is not None:
                    frame = b"data: " + openai_chat.chunk_body("c", 1, "claude", chunk) + b"\n\n"
                    out.append(encoder.feed(reader.read(msgspec.json.decode(frame[6:-2]))))
        return out

    print(f"request: {len(raw) / 1024:.0f} KiB")
    for name, step in (("edge", edge), ("count prompt tokens", lambda: count_prompt(decoded, "cl100k_base")),
                       ("exact-cache key", lambda: exact_key("t", "r", decoded)),
                       ("old hop: chat body written", lambda: openai_chat.to_chat_body(decoded)), ("old hop: as JSON bytes", chat_hop_as_bytes),
                       ("provider", provider), ("provider from a chat body", provider_from_chat),
                       ("one plain JSON decode", lambda: msgspec.json.decode(raw))):  # fmt: skip
        print(f"{name:28s} {_median_ms(step):6.2f} ms")
    for name, step in (("stream, as deltas", stream_as_deltas), ("stream, through chat chunks", stream_through_chunks)):
        print(f"{name:28s} {_median_ms(step) * 1000 / len(events):6.2f} us per event")


if __name__ == "__main__":
    main()
