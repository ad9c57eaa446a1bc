"""Small in-place edits to policies.yaml and its key file that keep comments and layout.

Each edit splices text at the position PyYAML's node marks give, so every other line
of the file stays byte for byte as written. (ruamel.yaml's round trip was weighed and
not taken: it re-emits the whole file, normalising what it does not model, such as
mixed sequence indentation or an empty ``{}`` turned block, and writes floats such as
``1e-06`` that the YAML 1.1 loader reads back as strings.) The text is read as the gateway
reads it (YAML 1.2's core scalars, ``gateway.config.loader``): an edit checked with PyYAML's
YAML 1.1 reading took a key ``id: on`` for ``True`` (t66).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gateway.config.loader import yaml_loader

__all__ = ["append_key", "remove_key", "set_route_threshold"]

_KEY_FILE_HEADER = "# API keys: sha256 hashes only. Add with `python -m gateway keys new`.\n"


def set_route_threshold(path: str | Path, route: str, threshold: float) -> None:
    """Set ``routes.<route>.threshold``: replace the value where it is written, or add the key.

    The edited text is read back before it is written: it must be the file as it was but for
    that one value. A threshold shared through a YAML anchor (``threshold: &t 0.8`` in one route,
    ``*t`` in another, or a whole route aliased: ``glob: *auto``) is refused (ValueError): the splice wrote the other route's line and
    dropped the anchor, leaving a file the gateway refused, after saying it was written (t88).
    So is one read from the environment (``${THR:-0.8}``): the number would replace the reference.
    """
    with _editing(Path(path)) as target:
        before = target.read_text(encoding="utf-8")
        after = _with_threshold(target, route, threshold)
        _check_only_threshold_moved(target, before, after, route, threshold)
        _write(target, after)


def _check_only_threshold_moved(path: Path, before: str, after: str, route: str, threshold: float) -> None:
    expected = _unshared(yaml.load(before, Loader=yaml_loader()))  # a route aliased whole (``glob: *auto``, t90)
    expected["routes"][route]["threshold"] = float(threshold)
    try:
        edited = yaml.load(after, Loader=yaml_loader())
    except yaml.YAMLError:
        edited = None
    if edited != expected:
        raise ValueError(
            f"{path}: routes.{route}.threshold is not a value of its own (a YAML anchor or alias shares it "
            f"with another route?); nothing written: set it to {threshold!r} by hand"
        )


def _with_threshold(path: Path, route: str, threshold: float) -> str:
    text = path.read_text(encoding="utf-8")
    root = yaml.compose(text, Loader=yaml_loader())
    routes = _child(root, "routes")
    node = _child(routes, route) if routes is not None else None
    if not isinstance(node, yaml.MappingNode):
        raise ValueError(f"{path}: no route {route!r} (a mapping under routes:)")
    value = repr(float(threshold))  # exact: a rounded threshold can fall on the wrong side of a score
    current = _child(node, "threshold")
    if isinstance(current, yaml.ScalarNode) and "${" in current.value:  # t146: the variable went unread, unsaid
        name = _REFERENCE.match(current.value)
        raise ValueError(
            f"{path}: routes.{route}.threshold is {current.value}, read from the environment: nothing written; "
            f"set {name.group(1) if name else 'the variable'} to {threshold!r}, or write that value in its place"
        )
    if current is not None:
        text = text[: current.start_mark.index] + value + text[current.end_mark.index :]
    elif node.flow_style:
        end = node.end_mark.index - 1  # the closing brace
        separator = ", " if node.value else ""
        text = text[:end].rstrip() + f"{separator}threshold: {value}" + text[end:]
    else:
        first_key = node.value[0][0]
        indent = " " * first_key.start_mark.column
        line_start = text.rfind("\n", 0, first_key.start_mark.index) + 1
        text = text[:line_start] + f"{indent}threshold: {value}\n" + text[line_start:]
    return text


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
"""The first variable a ``${VAR}`` or ``${VAR:-default}`` value reads."""


def _unshared(value: Any) -> Any:
    """``value`` with every mapping and list its own: YAML gives an alias its anchor's very object."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _plain_numbers(value: object) -> object:
    """Floats written without an exponent: YAML 1.1 (PyYAML) reads JSON's ``1e-06`` as a string."""
    if isinstance(value, float):
        return msgspec.Raw(format(Decimal(repr(value)), "f").encode())
    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(item) for item in value]
    return value


def append_key(path: str | Path, entry: dict[str, object]) -> None:
    """Add ``entry`` to the key file's ``keys`` list, one line of flow style (JSON is valid YAML).

    A missing or empty file is created with a header. The entry goes after the list's last
    item, at that item's indentation (or inside ``[...]``), whatever the file's layout.
    """
    item = msgspec.json.encode(_plain_numbers(entry)).decode()
    with _editing(Path(path)) as target:
        _write(target, _with_key(target, item))


def _with_key(path: Path, item: str) -> str:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    root = yaml.compose(text, Loader=yaml_loader())
    if root is None:
        text = (text if text.strip() else _KEY_FILE_HEADER) + ("" if text.endswith("\n") or not text else "\n")
        return f"{text}keys:\n  - {item}\n"
    keys = _child(root, "keys")
    if not isinstance(root, yaml.MappingNode) or not isinstance(keys, yaml.SequenceNode | yaml.ScalarNode | None):
        raise ValueError(f"{path}: expected a mapping with a 'keys' list")
    if keys is None:  # other keys only: add the list after them
        text += ("" if text.endswith("\n") else "\n") + f"keys:\n  - {item}\n"
    elif isinstance(keys, yaml.ScalarNode):  # ``keys:`` with nothing (or null) after it
        if keys.tag != "tag:yaml.org,2002:null":
            raise ValueError(f"{path}: 'keys' must be a list")
        start, end = keys.start_mark.index, keys.end_mark.index
        text = text[:start] + ("" if end > start else " ") + f"[{item}]" + text[end:]
    elif keys.flow_style:
        end = keys.end_mark.index - 1  # the closing bracket
        separator = ", " if keys.value else ""
        text = text[:end].rstrip() + f"{separator}{item}" + text[end:]
    else:
        dash = " " * keys.start_mark.column  # a block sequence starts at its first dash
        line_end = text.find("\n", _end(keys.value[-1]))
        at = len(text) if line_end < 0 else line_end + 1
        text = text[:at] + ("" if text[:at].endswith("\n") else "\n") + f"{dash}- {item}\n" + text[at:]
    return text


def remove_key(path: str | Path, key_id: str) -> bool:
    """Take the key ``key_id`` out of the key file's ``keys`` list, under the lock ``append_key``
    takes, every other line as written (t63: revoking meant editing the file by hand). The last
    key leaves ``keys: []``: a list left empty would read as a file cut short, which a running
    gateway refuses. False when the file lists no such key."""
    with _editing(Path(path)) as target:
        text = target.read_text(encoding="utf-8") if target.exists() else ""
        edited = _without_key(target, text, key_id)
        if edited is None:
            return False
        _write(target, edited)
        return True


def _without_key(path: Path, text: str, key_id: str) -> str | None:
    root = yaml.compose(text, Loader=yaml_loader())
    keys = _child(root, "keys")
    if not isinstance(keys, yaml.SequenceNode):
        return None
    found = [i for i, item in enumerate(keys.value) if _scalar(_child(item, "id")) == key_id]
    if not found:
        return None
    at, items = found[-1], keys.value
    item = items[at]
    if len(items) == 1 and keys.flow_style:
        edited = text[: keys.start_mark.index] + "[]" + text[keys.end_mark.index :]
    elif len(items) == 1:  # `keys: []` on the key's line: a block list may start at the key's column
        [name] = [key for key, value in root.value if value is keys] if isinstance(root, yaml.MappingNode) else []
        edited = text[: name.end_mark.index] + ": []" + text[_end(keys) :]
    elif keys.flow_style:  # the item and one comma beside it
        start, end = (
            (item.start_mark.index, items[at + 1].start_mark.index)
            if at + 1 < len(items)
            else (_end(items[at - 1]), _end(item))
        )
        edited = text[:start] + text[end:]
    else:  # the item's lines, from its dash to the end of the line it ends on
        start = text.rfind("\n", 0, item.start_mark.index) + 1
        line_end = text.find("\n", _end(item))
        edited = text[:start] + text[len(text) if line_end < 0 else line_end + 1 :]
    ids = _ids(text)
    if _ids(edited) != ids[:at] + ids[at + 1 :]:  # the other keys, read back as the gateway reads them
        raise ValueError(
            f"the file read back after the edit did not list the other keys as before; it was left as it was: "
            f"delete the entry of {key_id!r} by hand"
        )
    return edited


def _ids(text: str) -> list[object]:
    """The ``id`` of each entry of the ``keys`` list, read as the gateway reads the file."""
    data = yaml.load(text, Loader=yaml_loader())
    keys = data.get("keys") if isinstance(data, dict) else None
    return [entry.get("id") if isinstance(entry, dict) else None for entry in keys or []]


def _scalar(node: yaml.Node | None) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[Path]:
    """One edit of ``path`` at a time, across processes (two ``keys new`` at once each read the
    file and wrote it back, and lost each other's keys): a lock on a file beside it, held while
    the file is read, changed and replaced. The file itself cannot hold the lock, being replaced.
    A symlink (a mounted config) is followed, so the link stays."""
    path = path.resolve() if path.is_symlink() else path
    try:
        lock = open(path.with_name(f".{path.name}.lock"), "a")  # noqa: SIM115 (closed below)
    except PermissionError:  # a folder we may not write in: the file is then written in place, and holds it
        lock = open(path, "a")  # noqa: SIM115
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path


def _write(path: Path, text: str) -> None:
    """Replace ``path`` whole (a reader, such as a reloading gateway, never sees it half written),
    keeping its mode and owner: a 0600 key file of the service's user that became root's after a
    ``sudo gateway keys new`` would lock the gateway out of it. Where we may not (the folder is not
    ours to write, or the owner is another user), the file is written in place, still one edit at a time."""
    try:
        before: os.stat_result | None = path.stat()
    except FileNotFoundError:
        before = None
    if before is not None:
        mode = stat.S_IMODE(before.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except PermissionError:
        path.write_text(text, encoding="utf-8")
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        if before is not None and (before.st_uid, before.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(temporary, before.st_uid, before.st_gid)
            except PermissionError:
                os.unlink(temporary)
                path.write_text(text, encoding="utf-8")
                return
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _end(node: yaml.Node) -> int:
    """Where ``node``'s own text ends (a block collection's end mark is the next token's start)."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _end(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _end(node.value[-1])
    return node.end_mark.index


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node if isinstance(value_node, yaml.Node) else None
    return None
