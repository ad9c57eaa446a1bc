"""LlamaIndex's ``OpenAILike`` against the gateway, with its defaults (legacy ``/v1/completions``)."""

from __future__ import annotations

import time

from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from gateway.simulated import SimulatedUpstream
from tests.conftest import upstream_stats
from tests.gateway_process import GatewayProcess


def _llm(gateway: GatewayProcess, **options: object) -> OpenAILike:
    return OpenAILike(model="fast", api_base=gateway.base_url, api_key="sk-unused", timeout=15, max_retries=0,
                      **options)  # fmt: skip


def _completion_records(gateway: GatewayProcess, at_least: int) -> list[dict[str, object]]:
    """The log lines of ``/v1/completions`` requests, once ``at_least`` are written (the last may lag its answer)."""
    deadline = time.monotonic() + 30
    while True:
        records = [r for r in gateway.log_records() if r.get("protocol") == "openai.completions"]
        if len(records) >= at_least or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_openailike_with_its_defaults_completes_streams_and_chats(
    gateway: GatewayProcess, small_upstream: SimulatedUpstream
) -> None:
    before = len(_completion_records(gateway, at_least=0))  # the shared gateway's earlier lines
    llm = _llm(gateway)  # is_chat_model=False: every call is a text completion
    done = llm.complete("Say hello in one word.")
    assert done.text.strip()
    assert upstream_stats(small_upstream)["last_request"]["path"] == "/v1/chat/completions"  # translated upstream
    pieces = [chunk.delta or "" for chunk in llm.stream_complete("Count to three.")]
    assert len(pieces) > 1 and "".join(pieces).strip()
    said = llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi there")])
    assert said.message.role == "assistant" and str(said.message.content).strip()
    records = _completion_records(gateway, at_least=before + 3)[before:]
    assert len(records) == 3 and all(r["status"] == 200 for r in records)


def test_openailike_as_a_chat_model(gateway: GatewayProcess) -> None:
    llm = _llm(gateway, is_chat_model=True)
    said = llm.chat([ChatMessage(role="user", content="Hi there")])
    assert said.message.role == "assistant" and str(said.message.content).strip()
    streamed = "".join(chunk.delta or "" for chunk in llm.stream_chat([ChatMessage(role="user", content="Hi")]))
    assert streamed.strip()
