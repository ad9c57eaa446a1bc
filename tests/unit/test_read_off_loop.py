"""Large bodies are read into the internal model off the event loop, one at a time."""

from __future__ import annotations

import asyncio
import threading

from gateway.protocols.body import LARGE_BODY_BYTES, read_off_loop


async def test_a_large_body_is_read_in_the_large_body_thread_and_a_small_one_in_place() -> None:
    """t51: ten bodies of 100,000 short messages, read on the event loop, held /healthz for 3-4 s;
    read in ten threads at once, the loop still waited its turn behind all of them."""
    loop_thread = threading.current_thread().name

    def where() -> str:
        return threading.current_thread().name

    assert await read_off_loop(b"{}", where) == loop_thread
    large = b" " * LARGE_BODY_BYTES
    names = await asyncio.gather(*(read_off_loop(large, where) for _ in range(4)))
    assert len(set(names)) == 1 and names[0].startswith("large-body") and names[0] != loop_thread
