"""Small in-place edits to policies.yaml that keep its comments and layout."""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["set_route_threshold"]


def set_route_threshold(path: str | Path, route: str, threshold: float) -> None:
    """Set ``routes.<route>.threshold``: replace the value where it is written, or add the key."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    routes = _child(root, "routes")
    node = _child(routes, route) if routes is not None else None
    if not isinstance(node, yaml.MappingNode):
        raise ValueError(f"{path}: no route {route!r} (a mapping under routes:)")
    value = f"{threshold:.6f}".rstrip("0").rstrip(".")
    current = _child(node, "threshold")
    if current is not None:
        text = text[: current.start_mark.index] + value + text[current.end_mark.index :]
    elif node.flow_style:
        end = node.end_mark.index - 1  # the closing brace
        text = text[:end].rstrip() + f", threshold: {value}" + text[end:]
    else:
        first_key = node.value[0][0]
        indent = " " * first_key.start_mark.column
        line_start = text.rfind("\n", 0, first_key.start_mark.index) + 1
        text = text[:line_start] + f"{indent}threshold: {value}\n" + text[line_start:]
    path.write_text(text, encoding="utf-8")


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node if isinstance(value_node, yaml.Node) else None
    return None
