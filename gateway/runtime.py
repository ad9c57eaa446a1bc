"""The gateway's live state: the policy in force and what is built from it, swapped whole on reload."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple, TextIO

import structlog

from gateway.accounting.metrics import Metrics
from gateway.auth import Authenticator
from gateway.config.guard import refuse_weakening_by_omission
from gateway.config.kept import kept_key_file, write_kept
from gateway.config.loader import (
    LoadedPolicy,
    auth_in_text,
    key_file_path,
    load_policy,
    load_policy_text,
    without_unlisted_keys,
)
from gateway.config.schema import Policy, RequestLogPolicy
from gateway.errors import ConfigError, UpstreamError
from gateway.routing import Router
from gateway.speculative import SpeculativeProvider
from gateway.tokens import encoding_for
from gateway.upstreams.base import Provider
from gateway.upstreams.breaker import Breakers
from gateway.upstreams.registry import Transport, api_key, build_provider

__all__ = [
    "AtStart",
    "Runtime",
    "RuntimeHolder",
    "keep_last_good",
    "load_at_start",
    "loggable_problems",
    "still_written",
]

_log = structlog.get_logger("gateway.policy")


@dataclass(frozen=True, slots=True)
class Runtime:
    """One consistent version of everything the policy decides. Requests take one and keep it."""

    loaded: LoadedPolicy
    providers: Mapping[str, Provider]
    router: Router
    auth: Authenticator

    @property
    def policy(self) -> Policy:
        return self.loaded.policy

    @property
    def version(self) -> str:
        return self.loaded.version


class AtStart(NamedTuple):
    """What a worker starts on (:func:`load_at_start`)."""

    loaded: LoadedPolicy
    rejected: list[str]
    """The policy file's problems (its key file's among them), when it fell back to the policy last accepted."""
    key_file: str | None
    """Then, what a running worker's reload says of the key file (``applied``, ``in force``,
    ``removals only`` or ``pending``: :meth:`RuntimeHolder._key_file_alone`); None when the
    policy names none, or none was kept with it and the key file was read as it is now."""
    key_file_problems: list[str]
    """Why the key file as it is now is not applied whole."""


def load_at_start(
    path: Path, last_good: Path | None, *, auth_required: bool = False, written: list[str] | None = None
) -> AtStart:
    """The policy file; or, when it is invalid (its key file included) or a running worker's
    reload would refuse it (an emptied key file: f90), the last policy a worker of this gateway
    accepted, with the file's problems.

    ``serve`` checks the files before it starts any worker and writes ``last_good``, so only a
    worker started later can fall back: one that replaces a worker that died while ops had
    a broken edit on disk. Its siblings keep the policy in force; without the fallback it
    could not start at all, and the server would stop the whole gateway (uvicorn on a worker
    that fails to start, granian on a crash loop). The siblings apply the key file as it is now
    to the policy in force (t63), or, while it is invalid, only the keys taken out of it (t98):
    so does this worker, to the policy and key file last accepted, kept together
    (:func:`keep_last_good`). With the policy alone kept, it read the key file as it is now,
    and could not start while that held a bad line (f87).

    ``written``: what :func:`still_written` said of the files, waited for before the first read:
    while a writer holds either open, the policy last accepted is started on (t122).
    """
    try:
        if written:
            raise ConfigError(str(path), written)
        try:
            loaded = load_policy(path)
        except ConfigError:
            raise
        except Exception as unforeseen:
            raise ConfigError(str(path), [f"the file could not be read ({type(unforeseen).__name__})"]) from None
        _refuse_weakening_since_kept(loaded, path, last_good)
        _refuse_auth_off(loaded, auth_required)
        return AtStart(loaded, [], None, [])
    except ConfigError as exc:
        if last_good is None:
            raise
        try:
            text = last_good.read_text(encoding="utf-8")
        except OSError:
            raise exc from None
        source = f"{path} (last accepted)"
        kept_keys = _kept_text(kept_key_file(last_good))
        accepted = load_policy_text(text, source=source, base_dir=path.parent, key_file_text=kept_keys)
        if kept_keys is None or not accepted.policy.auth.key_file:  # none kept: read as it is now, as before
            return AtStart(accepted, exc.problems, None, [])
        if written:  # not the key file as it is now: its writer is not done
            return AtStart(accepted, exc.problems, "pending", ["it is still open for writing"])
        now = _with_key_file_now(accepted, path.parent, "start-up")
        return AtStart(now.loaded, exc.problems, now.state, now.problems)


def _refuse_weakening_since_kept(loaded: LoadedPolicy, path: Path, last_good: Path | None) -> None:
    """The rules a running worker's reload holds ``loaded`` to, held against the policy last
    accepted, kept with its key file (ConfigError when they refuse it).

    A policy that loads cleanly may still be one its siblings refuse: an emptied or deleted key
    file loads as "no keys made yet", and a worker started then served no keys while its
    siblings kept theirs, and kept the empty file in place of their keys, so every later
    replacement started keyless too (f90). ``serve`` keeps the files it starts on before any
    worker starts, so a fresh start is held to itself. Nothing to hold it to when nothing can be
    read or loaded, or only the policy was kept (a gateway before f87): as before.
    """
    accepted = _kept_policy(path, last_good) if last_good is not None else None
    if accepted is not None:
        refuse_weakening_by_omission(accepted, loaded)


def _kept_policy(path: Path, last_good: Path) -> LoadedPolicy | None:
    """The policy last accepted by a worker of this gateway, with its key file as kept; None when
    it cannot be read or loaded, or only the policy was kept (a gateway before f87)."""
    text, kept_keys = _kept_text(last_good), _kept_text(kept_key_file(last_good))
    if text is None:
        return None
    try:
        accepted = load_policy_text(
            text, source=f"{path} (last accepted)", base_dir=path.parent, key_file_text=kept_keys
        )
    except Exception:  # the fallback says so when it needs it; here it only cannot refuse anything
        return None
    if kept_keys is None and accepted.policy.auth.key_file:
        return None
    return accepted


def _kept_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class _KeyFileNow(NamedTuple):
    """A policy in force with its key file as it is now (:func:`_with_key_file_now`)."""

    loaded: LoadedPolicy
    state: str
    """What the log says of the key file: ``applied``, ``in force``, ``removals only`` or ``pending``."""
    problems: list[str]
    """Why the key file is not applied whole."""
    dropped: list[str]
    """The ids of the keys taken out while the file is invalid."""
    taken_back: dict[str, list[str]]
    """By field (``engine_fields``, ``models``, ``admin``), the ids of the keys some of it is taken
    back from while the file is invalid."""


def _with_key_file_now(accepted: LoadedPolicy, base_dir: Path, reason: str) -> _KeyFileNow:
    """``accepted`` read again with its key file as it is now, under the rules of any reload (an
    emptied key file is refused: t63); while the key file is invalid, ``accepted`` less the keys
    the file no longer lists (t98: a key revoked while another line was bad kept answering 200)
    and the engine fields (f229), models and admin (f232) it no longer grants.
    The one decision a running worker (:meth:`RuntimeHolder._key_file_alone`) and a worker
    started later (:func:`load_at_start`) both take, so that all workers agree (f87, f90)."""
    try:
        loaded = load_policy_text(accepted.text, source=accepted.source, base_dir=base_dir)
        refuse_weakening_by_omission(accepted, loaded)
    except ConfigError as exc:  # an invalid key file: only the keys taken out of it apply
        try:
            narrowed = without_unlisted_keys(accepted, base_dir)
        except Exception as unread:  # never in the way of the rejection it is part of; named by its type only
            _log.error("key_file_removals_unread", reason=reason, error=type(unread).__name__)
            narrowed = None
        if narrowed is None:  # the file says nothing of its keys
            return _KeyFileNow(accepted, "pending", exc.problems, [], {})
        return _KeyFileNow(narrowed.loaded, _REMOVALS_ONLY, exc.problems, narrowed.dropped, narrowed.taken_back)
    except Exception as exc:  # named by its type only, as in reload
        return _KeyFileNow(accepted, "pending", [f"the key file could not be read ({type(exc).__name__})"], [], {})
    return _KeyFileNow(loaded, "in force" if loaded.version == accepted.version else "applied", [], [], {})


def _judged(path: Path, current: LoadedPolicy, auth_required: bool) -> LoadedPolicy:
    """The file, read and held to the rules of a reload: all in one thread, since a policy of some
    thousand tenants takes seconds of CPU that on the event loop held every request (t164)."""
    loaded = load_policy(path)
    if loaded.version != current.version:  # the same bytes leave out nothing: an unchanged SIGHUP is cheap
        refuse_weakening_by_omission(current, loaded)
    _refuse_auth_off(loaded, auth_required)
    return loaded


def _needs_restart() -> None:
    _log.warning("policy_needs_restart", section="request_log", detail="applies when the gateway restarts")


def keep_last_good(loaded: LoadedPolicy, last_good: Path) -> bool:
    """Write the policy now in force, and its key file as read, where a later worker can fall back
    to them (:func:`~gateway.config.kept.write_kept`: atomically, the owner's alone); whether they were."""
    try:
        write_kept(last_good, loaded.text, loaded.key_file_text)
    except OSError as exc:
        _log.warning("policy_not_kept", path=str(last_good), error=str(exc))
        return False
    return True


class RuntimeHolder:
    """Loads the policy, rebuilds the runtime on change, keeps the old one on a bad edit."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        metrics: Metrics,
        transport: Transport = "http11",
        last_good: str | os.PathLike[str] | None = None,
        auth_required: bool = False,
        request_log: RequestLogPolicy | None = None,
    ) -> None:
        self.path = Path(path)
        self.auth_required = auth_required
        self.last_good = Path(last_good) if last_good else None
        self.metrics = metrics
        self.transport = transport
        self.breakers = Breakers()
        self._runtime: Runtime | None = None
        self._retired: set[asyncio.Task[object]] = set()
        self._reload_lock = asyncio.Lock()
        self._reload_waiting = False
        self._files_read: tuple[object, ...] | None = None
        """The policy's and key file's identities when a reload last read them."""
        self._rejected: tuple[object, ...] | None = None
        """The files and problems of the last rejected reload."""
        self.last_reload_error: str | None = None
        self._written_at_start = False
        """A writer held the files open at start-up: the check once started waits for it too."""
        self._request_log = request_log
        """The request log's settings in force: read once, when ``serve`` started (None: the policy's at :meth:`start`)."""
        self._not_kept = False
        """The policy in force could not be kept: the one kept may be older, and is not held against edits."""

    @property
    def current(self) -> Runtime:
        assert self._runtime is not None, "RuntimeHolder.start() was not called"
        return self._runtime

    @property
    def restart_needed(self) -> list[str]:
        """The sections of the policy in force that differ from what this process read when
        ``serve`` started and apply only once it restarts (``policy_needs_restart``); ``/readyz``
        shows them (t200: only stderr said so)."""
        read = self._request_log
        return ["request_log"] if read is not None and self.current.policy.request_log != read else []

    def start(self, first: AtStart | None = None, *, written: bool = False) -> Runtime:
        """Install what :func:`load_at_start` loaded (loaded here when not given): an invalid
        policy with nothing to fall back to is fatal (raises ConfigError). ``written``: it was
        loaded in place of files a writer held open (:func:`still_written`)."""
        loaded, rejected, state, key_problems = first or load_at_start(self.path, self.last_good)
        self._written_at_start = written
        if written:  # not read yet: the watcher reads them, once their writers are done
            self._files_read = ()
        runtime = self._build(loaded)
        self._install(runtime)
        _log.info("policy_loaded", version=runtime.version, source=loaded.source, models=sorted(runtime.providers))
        if self._request_log is None:
            self._request_log = loaded.policy.request_log
        elif loaded.policy.request_log != self._request_log:  # a dead worker's replacement, started after an edit
            _needs_restart()
        if rejected:
            key_file, state = self._key_file_spoken(state)  # applied as siblings apply it (t63, t98)
            self.last_reload_error = "; ".join(
                [*_shown_to_admins(rejected), *([_key_file_said(key_file, state, key_problems)] if key_file else [])]
            )
            _log.error(
                "policy_rejected", reason="start-up", problems=loggable_problems(rejected), kept=runtime.version,
                **_key_file_logged(state, key_problems),
            )  # fmt: skip
            self._rejected = _said(self._file_identities(), rejected, state, key_problems)  # once (t121)
        elif self.last_good is not None:
            self._not_kept = not keep_last_good(loaded, self.last_good)
        for warning in runtime.loaded.warnings:
            _log.warning("policy_warning", detail=warning)
        return runtime

    async def reload(self, reason: str = "manual", *, settle: bool = True) -> bool:
        """Try the file again; on any problem keep the policy in force and log why.

        The file is read once it has stopped changing and no process holds it open for writing:
        a ``kubectl cp`` that is still writing would otherwise hand over a prefix that may well be
        a valid policy. So is its key file, when it changed since last read: a valid prefix of it
        dropped the keys still to be written (t121).
        """
        async with self._reload_lock:
            self._reload_waiting = False  # a request from now on reads the file after this one
            written = await self._still_written() if settle else []
            if written:
                still = [
                    _still_open_said("the file" if path == self.path else str(self.current.policy.auth.key_file))
                    for path in written
                ]
                key_file_written = any(path != self.path for path in written)
                await self._rejected_edit(
                    reason, still, quiet=reason in _UNASKED_RELOADS, key_file_written=key_file_written
                )
                return False
            async with self._one_worker_at_a_time():
                return await self._read_and_judge(reason)

    async def _read_and_judge(self, reason: str) -> bool:
        """The file read and judged against the policy last accepted by any worker (t164: against
        each worker's own, one that had missed an edit its sibling took refused the next edit its
        sibling accepted), then put in force, or refused with that policy kept in force."""
        kept = await asyncio.to_thread(_kept_policy, self.path, self.last_good) if self.last_good else None
        if kept is not None and (self._not_kept or kept.text == self.current.loaded.text):
            kept = None  # this worker's own (the key file's changes each worker applies alike: f87, f90)
        try:
            files = self._files_read = self._file_identities()
            loaded = await asyncio.to_thread(_judged, self.path, kept or self.current.loaded, self.auth_required)
        except ConfigError as exc:
            await self._adopt(kept, reason)
            await self._rejected_edit(reason, exc.problems, quiet=reason in _UNASKED_RELOADS, files=files)
            return False
        except Exception as exc:
            await self._adopt(kept, reason)
            # Named by its type only: its message may quote the file, which may hold secrets.
            await self._rejected_edit(reason, [f"the file could not be read ({type(exc).__name__})"])
            return False
        if loaded.version == self.current.version:
            if loaded.source != self.current.loaded.source:  # started on the policy last accepted: the file is it
                self._runtime = replace(self.current, loaded=replace(self.current.loaded, source=loaded.source))
            cleared = self._clear_rejection(reason, loaded.version, by="reverted")  # e.g. a rejected edit put back
            # A SIGHUP's sender can tell it arrived (t166); the file's watch stays quiet.
            if not cleared and reason not in _UNASKED_RELOADS:
                _log.info("policy_unchanged", reason=reason, version=loaded.version)
            return True
        old = self.current
        new = self._build(loaded, previous=old)
        if self.last_good is not None:  # kept first: /readyz never shows the new version with the old rejection
            self._not_kept = not await asyncio.to_thread(keep_last_good, loaded, self.last_good)
        self._install(new)
        self._retire(list(old.providers.values()))
        _log.info("policy_reloaded", reason=reason, version=new.version, previous=old.version)
        self._clear_rejection(reason, new.version, by="new_version")
        if new.policy.request_log not in (old.policy.request_log, self._request_log):  # opened at start-up
            _needs_restart()
        for warning in loaded.warnings:
            _log.warning("policy_warning", detail=warning)
        return True

    async def _adopt(self, kept: LoadedPolicy | None, reason: str) -> None:
        """Put in force the policy a sibling accepted in place of this worker's older one, with the
        key file as it is now, as the siblings apply it (:func:`_with_key_file_now`): a worker that
        missed an edit refuses the next one with them, and serves what they serve (t164)."""
        if kept is None:
            return
        old = self.current
        now = await asyncio.to_thread(_with_key_file_now, kept, self.path.parent, reason)
        self._install(self._build(now.loaded, previous=old))
        self._retire(list(old.providers.values()))
        _log.info(
            "policy_reloaded", reason=reason, version=now.loaded.version, previous=old.version, last_accepted=True
        )
        if now.loaded.policy.request_log not in (old.policy.request_log, self._request_log):
            _needs_restart()

    @contextlib.asynccontextmanager
    async def _one_worker_at_a_time(self) -> AsyncIterator[None]:
        """Hold the lock beside the policy kept while a reload reads, judges and keeps the file:
        each worker judges it against what the one before it kept, so all take the same verdict
        (t164). Where no lock can be had, as before: each on its own."""
        lock = await asyncio.to_thread(_open_lock, self.last_good) if self.last_good is not None else None
        try:
            while lock is not None and not _locked(lock):
                await asyncio.sleep(_LOCK_WAIT_S)
            yield
        finally:
            if lock is not None:
                lock.close()  # lets it go

    def _clear_rejection(self, reason: str, version: str, *, by: Literal["reverted", "new_version"]) -> bool:
        """Forget the last rejected edit, and say so when there was one: an alert on
        ``policy_rejected`` resolves on ``policy_rejection_cleared``, whether the edit was put
        back (t66) or fixed in a new version (t69). ``by`` says which. True when it said so."""
        said = self._rejected is not None or self.last_reload_error is not None
        if said:
            _log.info("policy_rejection_cleared", reason=reason, version=version, by=by)
        self._rejected = None
        self.last_reload_error = None
        return said

    async def _rejected_edit(
        self,
        reason: str,
        problems: list[str],
        *,
        quiet: bool = False,
        files: tuple[object, ...] | None = None,
        key_file_written: bool = False,
    ) -> None:
        """Keep the policy in force, with the key file as it is now (t63), and say why.

        ``quiet``: the folder's event and the look both saw the same files (t31), or the start-up
        check the files a worker started on (t121): said once.
        ``key_file_written``: a writer still holds the key file open, so it is not read (t121).
        """
        key_file = self.current.policy.auth.key_file
        state: str | None = None
        key_problems: list[str] = []
        if key_file_written:
            state, key_problems = "pending", ["it is still open for writing"]
        elif key_file:
            state, key_problems = await self._key_file_alone(reason)
        key_file, state = self._key_file_spoken(state)
        said = _said(files, problems, state, key_problems)
        if not quiet or said != self._rejected:
            _log.error(
                "policy_rejected", reason=reason, problems=loggable_problems(problems), kept=self.current.version,
                **_key_file_logged(state, key_problems),
            )  # fmt: skip
        self._rejected = said
        shown = _shown_to_admins(problems)
        if key_file:
            shown.append(_key_file_said(key_file, state, key_problems))
        self.last_reload_error = "; ".join(shown)

    def _key_file_spoken(self, state: str | None) -> tuple[str | None, str | None]:
        """The key file a rejected edit speaks of, and what the log says of it (``state``): none
        where the policy in force names one that does not exist and none of its changes waits
        (t200: the shipped policy's keys.yaml, never made, was said to be "in force")."""
        policy = self.current.policy
        key_file = policy.auth.key_file
        if key_file is None or state in ("pending", _REMOVALS_ONLY):
            return key_file, state
        path = key_file_path(policy, self.path.absolute().parent)
        return (key_file, state) if path is not None and path.exists() else (None, None)

    async def _key_file_alone(self, reason: str) -> tuple[str, list[str]]:
        """The policy in force with its key file as it is now (:func:`_with_key_file_now`),
        installed when it differs: while policies.yaml held a rejected edit, a key deleted from the
        key file kept answering 200 and one made by ``keys new`` 401 (t63). What it applies whole
        is kept for a worker started later, which takes the same decision (:func:`load_at_start`).

        Returns what the log says of the key file (``applied``, ``in force``, ``removals only``
        or ``pending``), and why it is not applied whole.
        """
        old = self.current
        now = await asyncio.to_thread(_with_key_file_now, old.loaded, self.path.parent, reason)
        if now.loaded.version == old.version:
            return now.state, now.problems
        self._install(self._build(now.loaded, previous=old))
        if now.state == "applied" and self.last_good is not None:
            self._not_kept = not await asyncio.to_thread(keep_last_good, now.loaded, self.last_good)
        self._retire(list(old.providers.values()))
        dropped: dict[str, object] = {"keys_dropped": now.dropped} if now.dropped else {}
        dropped.update((f"{name}_taken_back", ids) for name, ids in now.taken_back.items())
        _log.info(
            "policy_reloaded", reason=reason, version=now.loaded.version, previous=old.version,
            key_file_only=True, **dropped,
        )  # fmt: skip
        if now.state == "applied":
            for warning in now.loaded.warnings:
                _log.warning("policy_warning", detail=warning)
        return now.state, now.problems

    async def _still_written(self) -> list[Path]:
        """Wait for writers (:func:`_wait_until_stable`) of the policy file, and of its key file when
        that changed since a reload last read it; the files still held open after the wait."""
        key_file = key_file_path(self.current.policy, self.path.absolute().parent)
        paths = [self.path]
        if key_file is not None and (self._files_read is None or _identity(key_file) not in self._files_read):
            paths.append(key_file)
        stable = await asyncio.gather(*(_wait_until_stable(path) for path in paths))
        return [path for path, done in zip(paths, stable, strict=True) if not done]

    def reload_on_sighup(self) -> None:
        """``kill -HUP`` reloads the policy, whether or not the file is watched.

        ``serve`` starts each worker with SIGHUP blocked (SIGHUP's default action would end a
        worker that has no handler yet); it is unblocked here, once the handler is in place,
        and one that came in meanwhile is delivered then. The file is also checked once more:
        one that changed during start-up without a SIGHUP (no ``serve``) is not missed.
        """
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self.request_reload("SIGHUP"))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        # as fresh as the load it follows, unless that found a writer (t122)
        self._spawn(self.reload("changed during start-up", settle=self._written_at_start))

    def request_reload(self, reason: str) -> bool:
        """Reload soon, unless a reload is already waiting to start: a burst of SIGHUPs (a config
        tool that signals in a loop) reads the file once more, rather than queueing one reload,
        and its settling wait, per signal. False when it joined the one waiting."""
        if self._reload_waiting:
            return False
        self._reload_waiting = True
        self._spawn(self.reload(reason))
        return True

    async def watch(self) -> None:
        """Reload when the policy or its key file changes. Runs until cancelled.

        The policy's folder is watched (inotify, via watchfiles), not the file: editors and
        Kubernetes replace the file rather than write it. It is the folder as named, not its
        resolved target: a ConfigMap's file is a symlink through ``..data`` into a timestamped
        folder that the kubelet deletes on every update. What one folder's events cannot show
        (a key file elsewhere, or another one named by a reload; a symlinked file or folder
        swapped; the folder deleted and made again: t29) a look at both files every
        ``_POLL_S`` finds.
        """
        poll = asyncio.get_running_loop().create_task(self._poll_files())
        try:
            await self._watch_folder()
            await poll  # the folder's watch ended (the folder went): the look goes on
        finally:
            poll.cancel()

    async def _watch_folder(self) -> None:
        import watchfiles

        target = self.path.absolute()
        try:
            async for changes in watchfiles.awatch(target.parent, debounce=200, step=50, recursive=False):
                key_file = key_file_path(self.current.policy, target.parent)
                watched = {target.name, "..data"} | ({key_file.name} if key_file is not None else set())
                if any(Path(changed).name in watched for _, changed in changes):
                    await self.reload("file changed")
        except (OSError, RuntimeError) as exc:  # the folder is gone, or cannot be watched
            _log.warning("policy_watch_degraded", detail=type(exc).__name__, every_s=_POLL_S)

    async def _poll_files(self) -> None:
        if self._files_read is None:
            self._files_read = self._file_identities()
        while True:
            await asyncio.sleep(_POLL_S)
            if self._file_identities() != self._files_read:  # not read since it changed
                await self.reload("file changed")

    def _file_identities(self) -> tuple[object, ...]:
        """What tells the policy and key file apart from their last versions: the file each path
        resolves to, and its inode, size and modification time."""
        target = self.path.absolute()
        key_file = key_file_path(self.current.policy, target.parent)
        return tuple(_identity(path) for path in (target, key_file) if path is not None)

    def _spawn(self, coro: Coroutine[None, None, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._retired.add(task)  # keep a reference until done
        task.add_done_callback(self._retired.discard)

    async def aclose(self) -> None:
        for task in list(self._retired):
            task.cancel()
        if self._runtime is not None:
            pools = {id(_plain(p)): _plain(p) for p in self._runtime.providers.values()}
            await asyncio.gather(*(p.aclose() for p in pools.values()), return_exceptions=True)

    def _build(self, loaded: LoadedPolicy, previous: Runtime | None = None) -> Runtime:
        policy = loaded.policy
        providers: dict[str, Provider] = {}
        for name, config in policy.models.items():
            encoding_for(config.encoding)  # load the tokenizer now, not on a request
            old = _plain(previous.providers[name]) if previous and name in previous.providers else None
            if old is not None and old.config == config and old.api_key == api_key(config):
                providers[name] = old  # unchanged: keep its warm connection pool
            else:
                providers[name] = build_provider(name, config, transport=self.transport)
        self.breakers.configure(policy.models, policy.circuit_breaker)
        for name, config in policy.models.items():
            spec = config.speculative
            if spec.mode == "gateway":  # the draft/verify loop runs here, over both servers' token APIs
                draft = providers.get(spec.draft) if spec.draft else None
                providers[name] = SpeculativeProvider(_plain(providers[name]), draft and _plain(draft), spec)
        return Runtime(loaded, providers, Router(policy), Authenticator(policy.auth))

    def _check_pairs(self, runtime: Runtime) -> None:
        """Compare each speculative pair's tokenizers now rather than on the first request (never fatal)."""
        for provider in runtime.providers.values():
            if isinstance(provider, SpeculativeProvider):
                self._spawn(_check_pair(provider))

    def _install(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.metrics.set_policy_version(runtime.version)
        with contextlib.suppress(RuntimeError):  # no running loop (a synchronous caller): checked on first use
            self._check_pairs(runtime)

    def _retire(self, providers: list[Provider]) -> None:
        """Close replaced providers once requests that still hold them have had time to finish.

        Speculative providers share their target's pool: only pools the new runtime no
        longer uses are closed.
        """
        in_use = {id(_plain(p)) for p in self.current.providers.values()}
        retired = {id(_plain(p)): _plain(p) for p in providers if id(_plain(p)) not in in_use}
        for provider in retired.values():
            task = asyncio.get_running_loop().create_task(_close_later(provider, provider.config.timeouts.total))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)


_UNASKED_RELOADS = ("file changed", "changed during start-up")
"""The reasons of the reloads no one asked for: a rejection they find again, in the same files, is
not said again (t31; t121: a worker started on the policy last accepted said it twice)."""
_REMOVALS_ONLY = "removals only"
"""The key file is invalid, and of its changes only keys taken out of it apply (t98)."""
_SETTLE_S = 1.0
"""How long a changed file must hold still before it is read where no one can tell whether a
writer still holds it open: a writer that paused for 0.25 s mid-file (scp over a slow link, a
pipe) had a prefix that was itself a valid policy put in force (f110)."""
_SETTLE_TOLD_S = 0.25
"""The same where :func:`_open_for_writing` can tell: a writer that pauses holding the file open
is seen as such, so only one that closes it between its parts relies on this wait."""
_POLL_S = 2.0
"""How often the watcher looks at the files themselves, besides the folder's events."""


_LOCK_WAIT_S = 0.05
"""How often a reload looks whether a sibling's is done with the lock (:meth:`RuntimeHolder._one_worker_at_a_time`)."""


def _open_lock(kept: Path) -> TextIO | None:
    try:
        return open(kept.with_name(f"{kept.name}.lock"), "a")
    except OSError:
        return None


def _locked(lock: TextIO) -> bool:
    """Whether the lock was taken; False while a sibling holds it. True where locks are not
    supported: the reload goes on without one."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _identity(path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        stat = path.stat()
        return os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns
    except OSError:
        return None


_STABLE_WAIT_MAX_S = 5.0


async def _wait_until_stable(path: Path) -> bool:
    """Return once the file's size and mtime held still for ``_SETTLE_S`` and no process holds it
    open for writing (where that can be told, :func:`_open_for_writing`). After
    ``_STABLE_WAIT_MAX_S``: False if one still does; a file that only kept changing is read then."""
    steps = _settling(await asyncio.to_thread(_look, path), asyncio.get_running_loop().time)
    try:
        pause = next(steps)
        while True:
            await asyncio.sleep(pause)
            pause = steps.send(await asyncio.to_thread(_look, path))
    except StopIteration as done:
        return bool(done.value)


def _wait_until_stable_now(path: Path) -> bool:
    """:func:`_wait_until_stable`, for code that may block: ``serve`` before its workers start.
    A file no one holds open for writing that has not changed for a settle's time is read at once:
    the start of every worker, and of one replacing a worker that died, waits only for a writer."""
    first = _look(path)
    if _quiet(first):
        return True
    steps = _settling(first, time.monotonic)
    try:
        pause = next(steps)
        while True:
            time.sleep(pause)
            pause = steps.send(_look(path))
    except StopIteration as done:
        return bool(done.value)


_Look = tuple[tuple[int, int] | None, bool | None]


def _quiet(look: _Look) -> bool:
    """Whether the file :func:`_look` saw has held still as long as :func:`_settling` would wait for."""
    signature, open_for_writing = look
    if signature is None or open_for_writing:
        return False
    settle_s = _SETTLE_S if open_for_writing is None else _SETTLE_TOLD_S
    return time.time_ns() - signature[1] >= settle_s * 1e9


def _settling(first: _Look, now: Callable[[], float]) -> Generator[float, _Look, bool]:
    """The wait of :func:`_wait_until_stable`: yields how long to sleep before the next look at
    the file, which it is sent; returns whether no writer holds the file open."""
    give_up = now() + _STABLE_WAIT_MAX_S
    last = first
    while now() < give_up:
        current = yield _SETTLE_S if last[1] is None else _SETTLE_TOLD_S
        if current == last and not current[1]:
            return True
        last = current
    return not last[1]


def still_written(path: Path) -> list[str]:
    """Wait for writers of the policy file, then of the key file it names, as a reload does
    (:func:`_wait_until_stable`), before the first read at start-up; what is said of those still
    open for writing after the wait. A gateway started while its key file was written in place
    served the keys written so far, and kept them as the ones last accepted (t122). Blocks."""
    problems = [] if _wait_until_stable_now(path) else [_still_open_said("the file")]
    try:
        named = auth_in_text(path.read_text(encoding="utf-8"), source=str(path), base_dir=Path())[0]
    except Exception:  # the load says what is wrong with the file
        return problems
    if named is not None and not _wait_until_stable_now(path.absolute().parent / named):
        problems.append(_still_open_said(str(named)))
    return problems


def _still_open_said(name: str) -> str:
    return f"{name} is still open for writing after {_STABLE_WAIT_MAX_S:g} s: it is read once closed"


def _look(path: Path) -> _Look:
    return _signature(path), _open_for_writing(path)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _open_for_writing(path: Path) -> bool | None:
    """Whether a process holds the file open for writing: Linux refuses a read lease (EAGAIN)
    while one does. None where that cannot be told: another OS, a file this user does not own
    (no CAP_LEASE), leases switched off or not supported by the file system.

    The lease is given back at once (a writer opening the file meanwhile waits that long); its
    break is signalled with SIGURG, ignored by default, not SIGIO, whose default ends the process.
    """
    if sys.platform != "linux":
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    finally:
        os.close(fd)  # gives the lease back
    return False


_QUOTED_VALUE = re.compile(
    r"'(?:[^'\\\n]|\\.)*'(?:\.\.\.)?|\"(?:[^\"\\\n]|\\.)*\"(?:\.\.\.)?"
    r"|'[^'\n]*\.\.\.|\"[^\"\n]*\.\.\."  # a long value, cut short: no closing quote
)


def loggable_problems(problems: list[str]) -> list[str]:
    """The problems without the values they quote ('...' or "..."): a value may be a key's secret
    pasted where its hash goes, or an upstream's key from ``${VAR}`` in the wrong field. Names the
    gateway itself writes (fields, sections, what to write instead) are in backticks and stay.
    The operational log is shipped elsewhere (``policy_rejected``, and what ``serve`` says of a file
    it refuses at start-up); ``/readyz`` shows an admin key :func:`_shown_to_admins`, ``gateway check``
    ops the whole text. A YAML syntax error keeps the parser's own tokens (t200: ``expected ',' or
    ']'`` read ``expected '…' or '…'``)."""
    return [_QUOTED_VALUE.sub(_parsers_own if _SYNTAX in problem else "'…'", problem) for problem in problems]


_SYNTAX = "not valid YAML: "
"""What each problem the YAML parser finds says (``gateway.config.loader``)."""
_PARSER_TOKEN = re.compile(r"'(?:[^\w\s'\\]{1,2}|<[a-z ]{1,24}>)'")
"""What a YAML parser quotes of its own: the punctuation it expected (``','``, ``']'``) or a token's
name (``'<block end>'``). A value from the file (an alias's or tag's name) holds a letter or a digit."""


def _parsers_own(match: re.Match[str]) -> str:
    quoted = match.group(0)
    return quoted if _PARSER_TOKEN.fullmatch(quoted) else "'…'"


def _shown_to_admins(problems: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The problems with the values found where another belongs (``got '...'``) hidden: a secret
    pasted into the wrong field, or an upstream's key from ``${VAR}`` there, reached an HTTP
    answer (t46). The names a problem quotes (an unknown model, a mode) stay, for ops to read,
    unless one is the value of an environment variable (t48: ``model: ${AN_KEY}`` showed the key
    as an unknown model's name)."""
    values = {value for value in (os.environ if environ is None else environ).values() if len(value) >= 8}

    def hidden(match: re.Match[str]) -> str:
        quoted = match.group(0)
        value = quoted.strip("'\"")
        return "'…'" if value in values or _LOOKS_LIKE_A_KEY.match(value) else quoted

    return [_QUOTED_VALUE.sub(hidden, _GOT_VALUE.sub(r"\1'…'", problem)) for problem in problems]


_LOOKS_LIKE_A_KEY = re.compile(r"(?i)(?:sk|rk|pk)[-_]|(?:ghp|gho|xox[abpr])[-_]|AKIA[0-9A-Z]{12}")
"""A name that reads as an API key's secret (t111: ``model: sk-live-...`` typed as a route's model
showed in an admin's /readyz as an unknown model's name)."""
_GOT_VALUE = re.compile(r"(got (?:the string )?|`: )(?:" + _QUOTED_VALUE.pattern + ")")
"""A value where another belongs: "must be ..., got 'x'", "expected a number, got the string 'x'"
(t107: a secret typed into a number field reached an admin's /readyz), or msgspec's
"Expected `int`, got `str`: 'x'"."""


def _said(
    files: tuple[object, ...] | None, problems: list[str], state: str | None, key_problems: list[str]
) -> tuple[object, ...]:
    """What tells a rejection apart from the last one: the files read, the problems, and whether
    the key file's changes wait and why."""
    waits = state if state in ("pending", _REMOVALS_ONLY) else None
    return files, "; ".join(problems), waits, "; ".join(key_problems)


def _key_file_said(key_file: str, state: str | None, problems: list[str]) -> str:
    """What ``/readyz`` adds to a rejected edit's problems of the key file, by what the log says of
    it (``state``, see :meth:`RuntimeHolder._key_file_alone`; None: as it is now)."""
    why = "; ".join(_shown_to_admins(problems))
    if state == "pending":
        return f"{key_file}: its changes wait too ({why})"
    if state == _REMOVALS_ONLY:
        return (
            f"{key_file}: a key taken out of it is refused and models, admin or engine_fields taken back from a "
            f"key apply; its other changes wait ({why})"
        )
    return _key_file_in_force(key_file)


def _key_file_logged(state: str | None, problems: list[str]) -> dict[str, object]:
    """What ``policy_rejected`` says of the key file."""
    logged: dict[str, object] = {"key_file": state} if state else {}
    if problems:
        logged["key_file_problems"] = loggable_problems(problems)
    return logged


def _key_file_in_force(key_file: str) -> str:
    """What ``/readyz`` adds to a rejected edit's problems when the key file still applies (t63)."""
    return (
        f"{key_file} as it is now is in force, on the policy kept: key changes apply, "
        "only the edit of the policy file waits"
    )


def _refuse_auth_off(loaded: LoadedPolicy, auth_required: bool) -> None:
    """``serve`` on a public address refuses auth off at start-up; an edit must not turn it off later."""
    if auth_required and loaded.policy.auth.mode == "none":
        raise ConfigError(
            loaded.source,
            [
                "auth.mode 'none' is refused: the gateway listens on a public address, where anyone who "
                "reaches it could spend the upstreams' keys (restart it with --allow-no-auth, or "
                "GATEWAY_ALLOW_NO_AUTH=1, when a proxy in front authenticates)"
            ],
        )


def _plain(provider: Provider) -> Provider:
    """The provider that owns the connection pool (a speculative one borrows its target's)."""
    return provider.target if isinstance(provider, SpeculativeProvider) else provider


async def _check_pair(provider: SpeculativeProvider) -> None:
    try:
        await provider.check_pair()
        _log.info("speculation_pair_ok", model=provider.name, draft=provider.policy.draft)
    except ConfigError as exc:
        _log.error("speculation_refused", model=provider.name, problems=exc.problems)
    except UpstreamError as exc:
        _log.warning("speculation_pair_unchecked", model=provider.name, detail=exc.message)


async def _close_later(provider: Provider, delay_s: float) -> None:
    try:
        await asyncio.sleep(delay_s)
    finally:
        await provider.aclose()
