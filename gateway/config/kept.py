"""The policy a gateway keeps in force, as ``serve`` leaves it in its ``--data-dir``, its key file
as last accepted, and which policy file it was kept for: the key tools read it to learn which key
file a running gateway applies while the policy file holds an edit it rejects (``gateway.cli.keys``);
a worker started while the policy or key file is invalid starts on it (``gateway.runtime.load_at_start``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "KEPT_POLICY",
    "KeptForAnother",
    "keep_policy",
    "kept_for",
    "kept_key_file",
    "read_kept_policy",
    "write_kept",
]

KEPT_POLICY = "policy.last-accepted.yaml"
_KEPT_FOR = "policy.last-accepted.source"
"""Beside it: the path of the policy file it was read from. Not a comment in the kept text,
which is the file byte for byte (its sha256 is the version a worker falling back to it shows)."""


class KeptForAnother(Exception):
    """The kept policy is no copy of this policy file: a data folder holds one gateway's state,
    and the one found may be an unrelated run's (t96: a stopped ``make run`` in the current
    folder lent its policy to ``keys new --policies /elsewhere/policies.yaml``)."""


def keep_policy(
    folder: str | os.PathLike[str], text: str, policies: str | os.PathLike[str], key_file_text: str | None = None
) -> Path:
    """Write ``text``, read from ``policies``, as the policy kept in force in ``folder``, with
    the file it was kept for and its key file's content (:func:`write_kept`); its path. The
    file first: a reader that finds the new policy finds what it belongs to."""
    kept = Path(folder).absolute() / KEPT_POLICY
    kept.with_name(_KEPT_FOR).write_text(os.path.abspath(policies) + "\n", encoding="utf-8")
    write_kept(kept, text, key_file_text)
    return kept


def kept_for(kept: Path) -> Path | None:
    """The policy file the policy at ``kept`` was kept for (its relative paths, the key file's
    among them, are read beside it); None when the folder does not say (not written by ``serve``)."""
    try:
        source = kept.with_name(_KEPT_FOR).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(source) if source else None


def kept_key_file(kept: Path) -> Path:
    """Where the key file's content is kept beside the policy kept at ``kept``
    (``policy.last-accepted.keys.yaml``)."""
    return kept.with_name(f"{kept.stem}.keys{kept.suffix}")


def write_kept(kept: Path, text: str, key_file_text: str | None) -> None:
    """The policy's ``text`` at ``kept`` and its key file's content beside it (removed when None:
    the policy names no key file), each atomically and the owner's alone: a policy may hold
    secrets in headers (t56: its copy was 0644 beside a 0600 file), and a key file holds keys'
    hashes, or their secrets pasted by mistake. The key file first: a worker that reads the new
    policy finds its keys. OSError when either cannot be written."""
    keys = kept_key_file(kept)
    if key_file_text is None:
        keys.unlink(missing_ok=True)
    else:
        _write_owner_only(keys, key_file_text)
    _write_owner_only(kept, text)


def _write_owner_only(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(temporary, 0o600)  # an old temporary file keeps its mode through O_TRUNC
    os.replace(temporary, path)


def read_kept_policy(data_dir: str | os.PathLike[str], policies: str | os.PathLike[str]) -> tuple[Path, str, Path]:
    """The kept policy's path, its text and the folder its relative paths are read from, when
    it was kept for ``policies`` (the same file, through any symlinks). OSError or
    UnicodeDecodeError when it cannot be read; :class:`KeptForAnother` when it was kept for
    another file, or does not say which (a folder not written by ``serve``)."""
    kept = Path(data_dir) / KEPT_POLICY
    text = kept.read_text(encoding="utf-8")
    source = kept_for(kept)
    if source is None:
        raise KeptForAnother(f"{kept} does not say which policy file it was kept for")
    if os.path.realpath(source) != os.path.realpath(policies):
        raise KeptForAnother(f"{kept} was kept for {source}, not for {policies}")
    return kept, text, source.parent
