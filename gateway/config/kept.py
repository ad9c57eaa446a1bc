"""The policy a gateway keeps in force, as ``serve`` leaves it in its ``--data-dir``, and which
policy file it was kept for: the key tools read it to learn which key file a running gateway
applies while the policy file holds an edit it rejects (``gateway.cli.keys``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["KEPT_POLICY", "KeptForAnother", "keep_policy", "read_kept_policy"]

KEPT_POLICY = "policy.last-accepted.yaml"
_KEPT_FOR = "policy.last-accepted.source"
"""Beside it: the path of the policy file it was read from. Not a comment in the kept text,
which is the file byte for byte (its sha256 is the version a worker falling back to it shows)."""


class KeptForAnother(Exception):
    """The kept policy is no copy of this policy file: a data folder holds one gateway's state,
    and the one found may be an unrelated run's (t96: a stopped ``make run`` in the current
    folder lent its policy to ``keys new --policies /elsewhere/policies.yaml``)."""


def keep_policy(folder: str | os.PathLike[str], text: str, policies: str | os.PathLike[str]) -> Path:
    """Write ``text``, read from ``policies``, as the policy kept in force in ``folder``, with
    the file it was kept for; its path. The file first: a reader that finds the new policy
    finds what it belongs to."""
    kept = Path(folder).absolute() / KEPT_POLICY
    kept.with_name(_KEPT_FOR).write_text(os.path.abspath(policies) + "\n", encoding="utf-8")
    kept.write_text(text, encoding="utf-8")
    return kept


def read_kept_policy(data_dir: str | os.PathLike[str], policies: str | os.PathLike[str]) -> tuple[Path, str, Path]:
    """The kept policy's path, its text and the folder its relative paths are read from, when
    it was kept for ``policies`` (the same file, through any symlinks). OSError or
    UnicodeDecodeError when it cannot be read; :class:`KeptForAnother` when it was kept for
    another file, or does not say which (a folder not written by ``serve``)."""
    kept = Path(data_dir) / KEPT_POLICY
    text = kept.read_text(encoding="utf-8")
    try:
        source = kept.with_name(_KEPT_FOR).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise KeptForAnother(f"{kept} does not say which policy file it was kept for") from None
    if os.path.realpath(source) != os.path.realpath(policies):
        raise KeptForAnother(f"{kept} was kept for {source}, not for {policies}")
    return kept, text, Path(source).parent
