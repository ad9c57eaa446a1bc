"""plan_cache: when a request may use the cache, and which key and namespace it gets."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.cache.plan import SEMANTIC_MAX_CHARS, CachePlan, plan_cache
from gateway.config.schema import CachePolicy, ExactCachePolicy, SemanticCachePolicy
from gateway.protocols import anthropic_messages
from gateway.protocols.chat_request import parse_chat_request
from gateway.protocols.openai_chat import read_chat_request

_POLICY = CachePolicy(
    exact=ExactCachePolicy(max_temperature=1.0), semantic=SemanticCachePolicy(enabled=True, max_temperature=0.5)
)


def _plan(
    body: dict[str, Any], *, tenant: str = "t", header: str | None = None, policy: CachePolicy = _POLICY
) -> CachePlan | None:
    parsed = parse_chat_request(msgspec.json.encode(body))
    field = parsed.pop("gateway_cache", None)  # as the pipeline takes it out of the body
    return plan_cache(policy, tenant, "fast", read_chat_request(parsed), header, field)


def _ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": text}], **extra}


def test_the_key_ignores_layout_and_fields_that_do_not_change_the_answer() -> None:
    a = _plan(_ask("hi", temperature=0, stream=True, user="u1"))
    b = _plan({"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "other"})
    assert a is not None and b is not None and a.exact_key == b.exact_key


def test_fields_that_change_the_answer_change_the_key() -> None:
    base = _plan(_ask("hi", temperature=0))
    assert base is not None
    for changed in (_ask("hi", temperature=0.2), _ask("hi", temperature=0, max_tokens=5), _ask("hi!", temperature=0),
                    _ask("hi", temperature=0, seed=3)):  # fmt: skip
        plan = _plan(changed)
        assert plan is not None and plan.exact_key != base.exact_key, changed


def test_tenants_never_share_a_key_or_a_namespace() -> None:
    a, b = _plan(_ask("hi", temperature=0), tenant="a"), _plan(_ask("hi", temperature=0), tenant="b")
    assert a is not None and b is not None
    assert a.exact_key != b.exact_key and a.semantic_set != b.semantic_set


def test_directives_from_the_header_or_the_body() -> None:
    plan = _plan(_ask("hi"), header="no-cache")
    assert plan is not None and (plan.read, plan.write) == (False, True)
    plan = _plan(_ask("hi", gateway_cache="no-store"))
    assert plan is not None and (plan.read, plan.write) == (True, False)
    assert _plan(_ask("hi"), header="no-cache, no-store") is None


def test_several_choices_or_a_hot_temperature_skip_the_cache() -> None:
    assert _plan(_ask("hi", n=2)) is None
    assert _plan(_ask("hi", temperature=1.5)) is None
    warm = _plan(_ask("hi", temperature=0.8))
    assert warm is not None and warm.semantic_set is None  # exact only above the semantic limit


def test_the_semantic_namespace_is_specific_to_the_system_prompt_and_earlier_turns() -> None:
    def with_system(system: str) -> CachePlan | None:
        return _plan({"model": "fast", "temperature": 0,
                      "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]})  # fmt: skip

    pirate, lawyer = with_system("Talk like a pirate."), with_system("Answer as a lawyer.")
    assert pirate is not None and lawyer is not None and pirate.semantic_set != lawyer.semantic_set
    assert pirate.prompt == "hi"


def test_where_system_messages_sit_and_how_they_are_split_is_part_of_the_semantic_namespace() -> None:
    """t42: [user Q, system S] was served [system S, user Q]'s answer, and one system message
    "A\nB" two messages' "A" and "B", labelled exact hits: another template input upstream."""
    question = {"role": "user", "content": "What is the capital of France?"}

    def laid_out(*systems: str, after: bool = False) -> str | None:
        messages = [{"role": "system", "content": text} for text in systems]
        plan = _plan({"model": "fast", "temperature": 0, "messages": [*messages, question] if not after
                      else [question, *messages]})  # fmt: skip
        assert plan is not None and plan.prompt == question["content"]
        return plan.semantic_set

    first, last = laid_out("Answer in French."), laid_out("Answer in French.", after=True)
    joined, split = laid_out("Be brief.\nAnswer in French."), laid_out("Be brief.", "Answer in French.")
    assert len({first, last, joined, split}) == 4 and None not in {first, last, joined, split}
    assert laid_out("Answer in French.") == first  # the same layout, the same namespace


def test_the_name_of_who_asks_is_part_of_the_semantic_namespace() -> None:
    """An answer written for name 'mallory' under "greet the user by name" was served to 'alice'
    (found by an outside tester), and labelled an exact hit."""

    def named(name: str | None) -> CachePlan | None:
        turn: dict[str, Any] = {"role": "user", "content": "Hello!", **({"name": name} if name else {})}
        system = {"role": "system", "content": "Greet the user by name."}
        return _plan({"model": "fast", "temperature": 0, "messages": [system, turn]})

    alice, mallory, nobody = named("alice"), named("mallory"), named(None)
    assert alice is not None and mallory is not None and nobody is not None
    assert len({alice.semantic_set, mallory.semantic_set, nobody.semantic_set}) == 3
    assert alice.exact_key != mallory.exact_key


def test_tool_requests_skip_the_semantic_cache_unless_allowed() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    plan = _plan(_ask("hi", temperature=0, tools=tools))
    assert plan is not None and plan.semantic_set is None
    allowed = CachePolicy(semantic=SemanticCachePolicy(enabled=True, tools=True))
    plan = _plan(_ask("hi", temperature=0, tools=tools), policy=allowed)
    assert plan is not None and plan.semantic_set is not None


def test_tool_loops_share_a_semantic_namespace_only_when_their_calls_match() -> None:
    """An agent that asked the weather in London must not get the answer the Paris loop got."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    allowed = CachePolicy(semantic=SemanticCachePolicy(enabled=True, tools=True, multi_turn=True))

    def loop(city: str, call_id: str, *then: dict[str, Any]) -> CachePlan | None:
        call = {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": f'{{"city":"{city}"}}'}}
        messages = [
            {"role": "user", "content": "What is the weather like?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "18 degrees and sunny"},
            *then,
        ]
        return _plan({"model": "fast", "temperature": 0, "tools": tools, "messages": messages}, policy=allowed)

    assert all(plan is not None and plan.semantic_set is None for plan in (loop("Paris", "c1"), loop("London", "c2")))
    umbrella = {"role": "user", "content": "Should I pack an umbrella?"}
    paris, london = loop("Paris", "c1", umbrella), loop("London", "c2", umbrella)
    again = loop("Paris", "call_other_id", umbrella)
    assert paris is not None and london is not None and again is not None
    assert paris.semantic_set is not None and paris.semantic_set != london.semantic_set
    assert again.semantic_set == paris.semantic_set  # the ids only link a call to its result


def test_images_and_very_long_prompts_use_the_exact_cache_alone() -> None:
    # The embedding and the verifier read text only: another image under the same words got
    # the first image's answer (p 1.0, found by an outside tester).
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    seen = {"model": "fast", "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What color is this?"}, image]}]}  # fmt: skip
    plan = _plan(seen)
    assert plan is not None and plan.semantic_set is None
    assert plan.exact_key != _plan(_ask("What color is this?", temperature=0)).exact_key  # type: ignore[union-attr]
    long = _plan(_ask("word " * (SEMANTIC_MAX_CHARS // 5 + 1), temperature=0))
    assert long is not None and long.semantic_set is None
    assert _plan(_ask("word " * 100, temperature=0)).semantic_set is not None  # type: ignore[union-attr]


def test_what_the_internal_model_cannot_hold_is_not_cached() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    heard = {"model": "fast", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio]}]}
    assert _plan(heard) is None  # the key would not see the audio: two recordings would share one answer
    assert _plan(_ask("hi", logprobs=True)) is None


def test_one_question_through_the_codecs_of_two_apis_has_one_key() -> None:
    asked = {"model": "fast", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    messages = anthropic_messages.decode_request(msgspec.json.encode(asked))
    chat = _plan(_ask("hi", temperature=0, max_completion_tokens=8))
    translated = plan_cache(_POLICY, "t", "fast", messages, None)
    assert chat is not None and translated is not None and chat.exact_key == translated.exact_key
