"""docs/request-log.md against a real line: the schema finance dashboards are built from (t119)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import openai

from tests.gateway_process import GatewayProcess

_DOC = Path(__file__).resolve().parents[2] / "docs" / "request-log.md"
_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "object": dict,
}


def _documented_fields() -> dict[str, str]:
    """The field table's rows: field name to its type, in the table's order."""
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", _DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {name: kind for name, kind in rows if kind in _TYPES}


def _example_lines() -> list[dict[str, Any]]:
    blocks = re.findall(r"```json\n(.*?)```", _DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [msgspec.json.decode(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_the_field_table_and_the_example_lines_are_a_real_lines_fields(
    gateway: GatewayProcess, client: openai.OpenAI
) -> None:
    """The examples lacked the fields added since (speed, service_tier, started_at, ...)."""
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "Name the schema."}], max_tokens=5
    )
    line = gateway.wait_for_record(raw.headers["x-request-id"])
    documented = _documented_fields()
    assert list(documented) == list(line)  # every field, in the order lines have them
    examples = _example_lines()
    assert examples
    for example in examples:
        assert list(example) == list(line)
        wrong = {name: value for name, value in example.items() if value is not None}
        wrong = {name: value for name, value in wrong.items() if not isinstance(value, _TYPES[documented[name]])}
        assert wrong == {}, "example values not of their documented type"
