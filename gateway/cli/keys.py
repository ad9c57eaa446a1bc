"""``python -m gateway keys new`` makes an API key, prints its secret once and stores only its hash;
``keys revoke`` takes one out of the key file; ``keys list`` shows them all (``gateway.cli.keys_list``)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

import yaml

from gateway.auth import hash_key
from gateway.cli._parsers import Subcommands
from gateway.cli.check import report_invalid
from gateway.cli.keys_list import listing, table
from gateway.config.edit import append_key, remove_key
from gateway.config.kept import KEPT_POLICY, KeptForAnother, read_kept_policy
from gateway.config.loader import KeyRing, auth_in_text, keys_in_text, load_keys, load_policy
from gateway.config.schema import AuthKey, TenantName
from gateway.config.validate import ENGINE_FIELDS_TAKEN, Problems, convert
from gateway.errors import ConfigError
from gateway.protocols.engine_fields import ENGINE_FIELDS

__all__ = ["register", "run"]

_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PICKS_UP = "picks it up"
NOT_CONFIRMED = 3
"""The exit status when the key file was edited but a running gateway may not apply it: the
policy file holds an edit the gateway rejects, and the policy it keeps in force reads another
key file, or one this command cannot find out (t66: a revoked key kept answering 200)."""
_DATA_DIR_HELP = (
    "serve's --data-dir (default .gateway): its policy.last-accepted.yaml, kept for --policies, tells which "
    "key file a running gateway reads while policies.yaml holds an edit it rejects"
)


def register(commands: Subcommands) -> None:
    keys = commands.add_parser("keys", help="manage API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    new = actions.add_parser("new", help="create a key: prints the secret once, writes its hash to the key file")
    new.add_argument("--tenant", required=True)
    new.add_argument("--id", type=_given_id, help="key id (default: made from the tenant, <tenant>-<random>)")
    new.add_argument("--models", default="*", help="comma-separated routes/models it may call (default: all)")
    new.add_argument("--rpm", type=int)
    new.add_argument("--tpm", type=int)
    new.add_argument("--usd-per-day", type=float)
    new.add_argument("--usd-per-month", type=float)
    new.add_argument("--max-concurrent", type=int, help="requests in flight at once, in each gateway process")
    new.add_argument(
        "--admin",
        action="store_true",
        help="an operator's key: reads every tenant's usage (/v1/usage) and the policy's reload problems (/readyz)",
    )
    new.add_argument(
        "--engine-fields",
        type=_engine_fields,
        metavar="NAME[,NAME]",
        help="vLLM/SGLang engine fields the key's requests may send on (e.g. priority,vllm_xargs); "
        "every other key's are taken out",
    )
    new.add_argument("--policies", default="policies.yaml")
    new.add_argument("--data-dir", default=".gateway", help=_DATA_DIR_HELP)
    new.set_defaults(run=run)
    revoke = actions.add_parser("revoke", help="delete a key from the key file: a running gateway refuses it then")
    revoke.add_argument("--id", required=True, help="the key's id")
    revoke.add_argument("--policies", default="policies.yaml")
    revoke.add_argument("--data-dir", default=".gateway", help=_DATA_DIR_HELP)
    revoke.set_defaults(run=run_revoke)
    shown = actions.add_parser(
        "list", help="the keys of policies.yaml's auth.keys and its key file: no secret, no whole hash"
    )
    shown.add_argument("--json", action="store_true", help="one JSON document, for machines")
    shown.add_argument("--policies", default="policies.yaml")
    shown.add_argument("--data-dir", default=".gateway", help=_DATA_DIR_HELP)
    shown.set_defaults(run=run_list)


def _given_id(text: str) -> str:
    """t166: ``--id ''`` made an id from the tenant, as if --id had been left out."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: leave --id out for one made from the tenant")
    return text


def _engine_fields(text: str) -> list[str]:
    """``--engine-fields priority,vllm_xargs``: names of ENGINE_FIELDS only, as the policy takes them."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no engine field (leave it out for none)")
    for name in names:
        if name not in ENGINE_FIELDS:
            raise argparse.ArgumentTypeError(f"{name!r} is no engine field; it takes {ENGINE_FIELDS_TAKEN}")
    return names


def run(args: argparse.Namespace) -> int:
    """``keys new``."""
    ring = _key_ring(args.policies, args.data_dir, _NONE_ADDED)
    if ring is None:
        return 1
    if ring.key_file is None:
        print(f"{args.policies} names no auth.key_file; add e.g. 'key_file: keys.yaml' under auth:", file=sys.stderr)
        return 1
    tenant = Problems()
    if convert(args.tenant, TenantName, ("tenant",), tenant) is None:  # t69: blamed the key id made from it
        report_invalid(ConfigError("the new key", tenant.messages))
        return 1
    key_id = args.id or _id_for(args.tenant, {key.id for key in ring.keys})
    if not _ID.fullmatch(key_id):
        print("key ids are 1-64 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 1
    if key_id in {key.id for key in ring.keys}:
        print(f"a key with id {key_id!r} exists already", file=sys.stderr)
        return 1
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:  # t134: written as `models: []`, a key that can call nothing
        print(f"--models {args.models!r} names no route or model (leave it out for all of them)", file=sys.stderr)
        return 1
    secret = "gw-" + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"id": key_id, "tenant": args.tenant, "hash": hash_key(secret)}
    if models != ["*"]:
        entry["models"] = models
    limits = {
        name: value
        for name, value in (
            ("rpm", args.rpm),
            ("tpm", args.tpm),
            ("usd_per_day", args.usd_per_day),
            ("usd_per_month", args.usd_per_month),
            ("max_concurrent", args.max_concurrent),
        )
        if value is not None
    }
    if limits:
        entry["limits"] = limits
    if args.admin:
        entry["admin"] = True
    if args.engine_fields:
        entry["engine_fields"] = args.engine_fields
    problems = Problems()
    if convert(entry, AuthKey, (), problems) is None:  # the checks the gateway will make when it loads the key
        report_invalid(ConfigError("the new key", problems.messages))
        return 1
    try:
        append_key(ring.key_file, entry)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cannot add the key to {ring.key_file}: {exc}", file=sys.stderr)
        return 1
    print(f"key id:  {key_id}\ntenant:  {args.tenant}\nsecret:  {secret}", flush=True)
    print(f"The secret is shown only now; {ring.key_file} holds its sha256.", file=sys.stderr)
    return _say_when_it_applies(args, ring, key_id, _PICKS_UP)


def _id_for(tenant: str, taken: set[str]) -> str:
    """``<tenant>-<random>`` for any valid tenant (t200: ``--tenant "a b"`` made an invalid id): the
    tenant's letters (accents taken off), digits, ``.`` and ``_``, each run of anything else one ``-``,
    ``key`` where nothing is left."""
    ascii_only = unicodedata.normalize("NFKD", tenant).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", ascii_only).strip("-._")[: 64 - 7].strip("-._") or "key"
    while True:
        key_id = f"{slug}-{secrets.token_hex(3)}"
        if key_id not in taken:
            return key_id


def run_list(args: argparse.Namespace) -> int:
    """``keys list``: the keys the policy gives, those of ``auth.keys`` first, each with where it is
    written (``--json``: one document). Found as ``keys new`` finds them."""
    ring = _key_ring(args.policies, args.data_dir, _NONE_LISTED)
    if ring is None:
        return 1
    document = listing(ring)
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n" if args.json else table(document))
    in_file = f", {len(ring.keys) - ring.inline} in {ring.key_file}" if ring.key_file is not None else ""
    count = f"{len(ring.keys)} key{'' if len(ring.keys) == 1 else 's'}"
    print(f"{count}: {ring.inline} in {ring.source} (auth.keys){in_file}", file=sys.stderr)
    if not ring.enabled:
        note = "has auth mode none: no key is asked for, so none of these has any effect"
        print(f"note: {ring.source} {note}", file=sys.stderr)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    """``keys revoke --id ID``: the key's entry out of the key file, under the lock ``keys new`` takes (t63),
    every other line as written, valid or not (t98)."""
    ring = _key_ring(args.policies, args.data_dir, None)
    if ring is None:
        return 1
    if ring.key_file is None:  # t146: it said to add a key file, which revokes nothing
        inline = any(key.id == args.id for key in ring.keys)
        where = (
            f"key {args.id} is written in {args.policies} under auth.keys: delete it there"
            if inline
            else f"{args.policies} names no auth.key_file and lists no key {args.id!r} under auth.keys: no such key"
        )
        print(where, file=sys.stderr)
        return 1
    try:
        removed = remove_key(ring.key_file, args.id)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        unread = (
            ": it is not YAML as it is now (see above), and no running gateway applies a change to it, this one "
            "included, until that is fixed; fix it, then run this again"
            if isinstance(exc, yaml.YAMLError)
            else f": {exc}"
        )
        print(f"cannot take the key out of {ring.key_file}{unread}", file=sys.stderr)
        return 1
    if not removed and (moved := _moved_from_the_key_file_in_force(args, ring)) is not None:
        try:  # t82: "no such key", exit 1, and the key stayed live in the file the gateway reads
            removed = remove_key(moved[0], args.id)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"cannot take the key out of {moved[0]}: {exc}", file=sys.stderr)
            return 1
        if removed:
            print(
                f"{ring.key_file} lists no key {args.id!r}; key {args.id} removed from {moved[0]}, the key file "
                f"of the policy a running gateway keeps in force (as {moved[1]} has it): it stops accepting it "
                "by itself.",
                file=sys.stderr,
            )
            return 0
    if not removed:
        inline = any(key.id == args.id for key in ring.keys)
        where = f"it is written in {args.policies} under auth.keys: delete it there" if inline else "no such key"
        print(f"{ring.key_file} lists no key {args.id!r}: {where}", file=sys.stderr)
        return 1
    print(f"key {args.id} removed from {ring.key_file}.", file=sys.stderr)
    return _say_when_it_applies(args, ring, args.id, _STOPS)


_NONE_ADDED = "a running gateway takes no new key from it until they are fixed, so none is added"
_NONE_LISTED = "its keys are not listed until they are fixed"


def _key_ring(policies: str, data_dir: str, refused: str | None) -> KeyRing | None:
    """The policy's keys and key file (None, said on stderr, when the auth section or key file is
    invalid). While policies.yaml cannot be read at all (a YAML slip), the keys of the policy a
    running gateway keeps in force: a key must be revocable mid-incident, whatever else the file
    holds (t81: revoke exited 1 on a tab, and the key stayed live). While only the key file is
    invalid, its problems are said, then ``refused`` why the command stops there (None: it goes on
    with the auth section's own keys, as ``revoke`` does: a running gateway drops a key taken out
    of it all the same; t98: one bad line kept a leaked key live, and the tool blamed the kept
    policy)."""
    try:
        ring, invalid = _ring_of(functools.partial(load_keys, policies))
    except ConfigError as exc:
        try:
            kept, text, base_dir = read_kept_policy(data_dir, policies)
            ring, invalid = _ring_of(functools.partial(keys_in_text, text, source=str(kept), base_dir=base_dir))
        except (OSError, UnicodeDecodeError, ConfigError, KeptForAnother) as unread:
            report_invalid(exc)
            print(
                f"no policy in force found ({_why_not_kept(data_dir, unread)}): give serve's --data-dir, and this "
                "command uses the key file of the policy a running gateway keeps in force",
                file=sys.stderr,
            )
            return None
        print(
            f"note: {policies} cannot be read ({exc.problems[0] if exc.problems else exc}); using the key "
            f"file of the policy in force as {kept} has it",
            file=sys.stderr,
        )
    if ring.key_file is not None and invalid is not None:
        report_invalid(ConfigError(str(ring.key_file), invalid.problems))
        if refused is not None:
            print(
                f"{ring.key_file} is invalid as it is now (the problems above): {refused}; fix them "
                f"(`gateway check {policies}`), then run this again",
                file=sys.stderr,
            )
            return None
    return ring


def _ring_of(read: Callable[..., KeyRing]) -> tuple[KeyRing, ConfigError | None]:
    """What ``read`` (:func:`load_keys` or :func:`keys_in_text`) reads; when only the key file is
    invalid, the auth section's own keys, with the key file's problems. A ConfigError when the
    auth section itself is invalid."""
    try:
        return read(), None
    except ConfigError as exc:
        try:
            return read(read_key_file=False), exc
        except ConfigError:
            raise exc from None


def _say_when_it_applies(args: argparse.Namespace, ring: KeyRing, key_id: str, effect: str) -> int:
    """What a running gateway does with the edited key file, and what ``check`` would note of the
    key; the exit status (:data:`NOT_CONFIRMED` when a running gateway may not apply it).

    The whole policy is read as ``check`` reads it (t63: ``keys new`` read only ``auth`` and said
    nothing of a misspelt model or a tenant not under ``tenants:``, which ``check`` and serve warn
    about; and it promised the key would work while the file was one the gateway rejects).
    """
    policies = args.policies
    if not ring.enabled:  # t66: it went on to say a running gateway picks the key up
        print(
            f"warning: {policies} has auth mode none: no key is asked for, so "
            + (
                "this one (and its limits) has no effect until auth: {mode: keys}"
                if effect == _PICKS_UP
                else "every request is served with or without this key until auth: {mode: keys}"
            ),
            file=sys.stderr,
        )
    try:
        loaded = load_policy(policies, unset_ok=True)
    except ConfigError as exc:
        count = len(exc.problems)
        bad_key_file = _key_file_invalid(policies)  # t98: the key file alone, named as what is invalid
        alone = bad_key_file is not None and len(bad_key_file.problems) == count
        invalid = (
            f"{ring.key_file if alone else policies} is invalid as it is now ({count} problem"
            f"{'s' if count > 1 else ''}: `gateway check {policies}` lists them); `gateway serve` started now "
            f"exits 2, unless its --data-dir keeps a policy last accepted for {policies} that it can start on, "
            "which it then serves until the file is fixed"
        )
        return _while_rejected(args, ring, effect, invalid, key_file_invalid=bad_key_file is not None)
    moved = _moved_from_the_key_file_in_force(args, ring)
    if ring.enabled and moved is not None:
        print(
            f"WARNING: {policies} names the key file {ring.key_file}, but the policy a running gateway keeps "
            f"in force (as {moved[1]} has it) reads {moved[0]}, so it {_NOT_DONE[effect]} until it takes "
            f"{policies} up (it rejected the edit that moved the key file, or has not read it yet: "
            f"`touch {policies}` or SIGHUP makes it try again).",
            file=sys.stderr,
        )
        return NOT_CONFIRMED
    if ring.enabled:
        print(f"A running gateway {effect} by itself.", file=sys.stderr)
    for warning in loaded.warnings:
        if warning.startswith(f"key {key_id}:"):
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _key_file_invalid(policies: str) -> ConfigError | None:
    """The key file's problems, when its auth section reads but its key file does not."""
    try:
        return _ring_of(functools.partial(load_keys, policies))[1]
    except ConfigError:
        return None


def _moved_from_the_key_file_in_force(args: argparse.Namespace, ring: KeyRing) -> tuple[Path, Path] | None:
    """The key file of the policy a running gateway keeps in force, and where that policy is kept,
    when it is another file than the one policies.yaml now names (t82: an edit naming a key file
    that did not exist yet was rejected; the tool then created that file, so the edit loaded, and
    it promised a running gateway would pick the key up). None when they agree or it cannot tell."""
    try:
        kept, text, base_dir = read_kept_policy(args.data_dir, args.policies)
        in_force, _ = auth_in_text(text, source=str(kept), base_dir=base_dir)
    except (OSError, UnicodeDecodeError, ConfigError, KeptForAnother):
        return None
    if in_force is None or ring.key_file is None or _same_file(in_force, ring.key_file):
        return None
    return in_force, kept


_STOPS = "stops accepting it"
_NOT_DONE = {_PICKS_UP: "does not pick it up (the key gets 401)", _STOPS: "still accepts it"}


def _while_rejected(
    args: argparse.Namespace, ring: KeyRing, effect: str, invalid: str, *, key_file_invalid: bool = False
) -> int:
    """While policies.yaml holds an edit a running gateway rejects, it keeps the policy in force
    and applies only that policy's key file as it is now (``gateway.runtime``). The edit may have
    moved ``auth.key_file``: the key then changed in a file no running gateway reads (t66), which
    is said on a WARNING line, with :data:`NOT_CONFIRMED` as the exit status. ``key_file_invalid``:
    the key file is what is invalid, of which a running gateway applies only keys taken out (t98)."""
    try:
        kept, text, base_dir = read_kept_policy(args.data_dir, args.policies)
        in_force, enabled = auth_in_text(text, source=str(kept), base_dir=base_dir)
    except (OSError, UnicodeDecodeError, ConfigError, KeptForAnother) as exc:
        print(
            f"WARNING: {invalid}. A running gateway keeps the policy it has in force and applies only that "
            f"policy's key file; this command cannot confirm that it is {ring.key_file} "
            f"({_why_not_kept(args.data_dir, exc)}: give serve's --data-dir), so a running gateway may not see "
            + (
                f"this change, unless the policy it keeps in force reads {ring.key_file} too."
                if key_file_invalid
                else f"this change until {args.policies} is fixed."
            ),
            file=sys.stderr,
        )
        return NOT_CONFIRMED
    if in_force is None or ring.key_file is None or not _same_file(in_force, ring.key_file):
        print(
            f"WARNING: {invalid}. The policy a running gateway keeps in force (as {kept} has it) reads "
            f"{in_force or 'no key file'}, not {ring.key_file}, so it {_NOT_DONE[effect]} until "
            f"{args.policies} is fixed"
            + (f" (or the key is taken out of {in_force} too)." if effect == _STOPS and in_force else "."),
            file=sys.stderr,
        )
        return NOT_CONFIRMED
    if not enabled:
        print(
            f"note: {invalid}. The policy in force (as {kept} has it) asks for no key (auth mode none).",
            file=sys.stderr,
        )
        return 0
    applies = (
        "drops the keys taken out of it even so, and takes back the models, admin or engine_fields it takes from "
        "a key (its other changes wait until it is valid)"
        if key_file_invalid
        else "applies that file as it is now"
    )
    print(
        f"note: {invalid}. A running gateway keeps the policy it has in force (as {kept} has it), which reads "
        f"{ring.key_file} too, and {applies}, so it {effect} all the same.",
        file=sys.stderr,
    )
    return 0


def _why_not_kept(data_dir: str, exc: Exception) -> str:
    """Why the policy kept in ``data_dir`` was not read: which file, and what was wrong with it."""
    kept = Path(data_dir) / KEPT_POLICY
    if isinstance(exc, FileNotFoundError):
        return f"there is no {kept}"
    if isinstance(exc, KeptForAnother):
        return str(exc)
    if isinstance(exc, ConfigError):  # t98: said "cannot be read" of a file read, for its key file's problem
        return f"the auth section of {kept} is invalid: {exc.problems[0] if exc.problems else exc}"
    return f"{kept} cannot be read ({type(exc).__name__})"


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
