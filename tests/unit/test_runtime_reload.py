"""Reloads asked by signal: a burst reads the file once more, not once per signal."""

from __future__ import annotations

import asyncio

from tests.unit.conftest import POLICY, MakeHarness


async def test_a_burst_of_reload_requests_reads_the_file_once_more(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    holder = harness.holder
    assert [holder.request_reload("SIGHUP") for _ in range(50)].count(True) == 1  # the rest join it
    holder.path.write_text(POLICY.replace("fast: {model: small, fallbacks: [large]}", "fast: {model: large}"))
    for _ in range(200):  # the waiting reload settles (0.25 s) and reads the edit
        await asyncio.sleep(0.05)
        if holder.current.policy.routes["fast"].model == "large":
            break
    assert holder.current.policy.routes["fast"].model == "large"
    assert holder.request_reload("SIGHUP")  # nothing waits now: a new request reads the file again
