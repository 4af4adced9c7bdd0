"""Durable sessions on disk: versioned snapshots and an atomically replaced pointer.

Layout under ``root``::

    <namespace>/<session id>/CURRENT      "v00000007\\n" — the committed version
    <namespace>/<session id>/v00000007/   a session snapshot (session.json, arrays.npz)
                                          + info.json (the caller's bookkeeping)

A commit writes the next version directory completely (atomically, under a
temporary name, fsync'ed), then replaces ``CURRENT`` atomically, then deletes
older versions. Whenever the process dies — SIGKILL included — ``CURRENT`` names
a complete version: the previous commit or this one, never a mixture. A session
whose first commit did not reach ``CURRENT`` does not exist. Leftovers of an
interrupted commit (temporary directories, versions ``CURRENT`` does not name,
deleted sessions' tombstones) are removed by :meth:`SessionStore.recover`.

Idle sessions live here only: nothing of them stays on the device. With a
:class:`~deltamem_jax.inference.host_cache.HostCache`, the committed versions of
recently used sessions are also kept in host memory, so that their next load
skips reading the files back; an entry is used only for the version ``CURRENT``
names, and only once that version is on disk (a commit fills the cache after
replacing ``CURRENT``), so what is acknowledged is still what is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deltamem_jax.inference.host_cache import HostCache
from deltamem_jax.inference.session import Session
from deltamem_jax.inference.snapshot import (
    SessionState,
    SnapshotError,
    parts_digests,
    read_parts,
    read_snapshot,
    snapshot_parts,
    state_from_parts,
    write_parts,
)
from deltamem_jax.models.functional import Runner
from deltamem_jax.utils.atomic import atomic_directory, atomic_write_text, fsync_dir

__all__ = ["INFO_FILE", "POINTER_FILE", "SessionStore", "StoredSession", "valid_name"]

POINTER_FILE = "CURRENT"
INFO_FILE = "info.json"
_VERSION = re.compile(r"^v(\d{8})$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
#: Testing hook (fault injection): ``DELTAMEM_STORE_CRASH_AT="POINT:SESSION:VERSION,..."``
#: SIGKILLs the process at POINT of the commit of VERSION of SESSION (points:
#: "in-version" — the snapshot files written, the info file not; "before-pointer" —
#: the version directory in place, CURRENT not updated; "after-pointer"). Each rule fires
#: once per store directory (a marker file ``.crashed-POINT-SESSION-VERSION`` in its root
#: remembers it), so a restarted server with the same environment goes on serving.
CRASH_ENV = "DELTAMEM_STORE_CRASH_AT"
CRASH_POINTS = ("in-version", "before-pointer", "after-pointer")


def _crash_rules(spec: str) -> set[tuple[str, str, int]]:
    rules = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        point, _, rest = item.partition(":")
        sid, _, version = rest.rpartition(":")
        if point not in CRASH_POINTS or not sid or not version.isdigit():
            raise ValueError(f"{CRASH_ENV}: {item!r} is not POINT:SESSION:VERSION with POINT "
                             f"one of {CRASH_POINTS}")
        rules.add((point, sid, int(version)))
    return rules


def valid_name(name: str) -> bool:
    """A namespace, session or snapshot name: 1–128 of ``[A-Za-z0-9._-]``, not starting
    with a dot (so never ``.``, ``..`` or a hidden file), no path separators."""
    return isinstance(name, str) and bool(_NAME.match(name))


class StoredSession:
    """A session loaded from the store, with its bookkeeping ``info`` and version."""

    def __init__(self, session: Session, info: dict[str, Any], version: int):
        self.session = session
        self.info = info
        self.version = version


class SessionStore:
    """Sessions of one model, namespaced, on disk (see the module docstring).

    Args:
      root: the directory (created).
      runner, tokenizer: the model sessions are loaded onto.
      fsync: make commits durable across power loss, not only process death.
      cache: keep recently committed sessions in host memory (None: read every load
        from disk).
    """

    def __init__(self, root: str | os.PathLike, runner: Runner, tokenizer, *,
                 fsync: bool = True, cache: HostCache | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.runner = runner
        self.tokenizer = tokenizer
        self.fsync = fsync
        self.cache = cache if cache is not None else HostCache(0, 0)
        self._locks: dict[tuple[str, str], list] = {}     # key → [lock, users]
        self._locks_guard = threading.Lock()
        self._crash = _crash_rules(os.environ.get(CRASH_ENV, ""))

    # ------------------------------------------------------------------ paths
    def _dir(self, namespace: str, sid: str) -> Path:
        for what, name in (("namespace", namespace), ("session id", sid)):
            if not valid_name(name):
                raise ValueError(f"invalid {what} {name!r}: use 1-128 characters of "
                                 f"[A-Za-z0-9._-], not starting with '.'")
        return self.root / namespace / sid

    @contextlib.contextmanager
    def lock(self, namespace: str, sid: str) -> Iterator[None]:
        """Hold the lock that orders commits, loads and deletes of one session (locks of
        sessions nobody is using are dropped: the table does not grow with sessions)."""
        key = (namespace, sid)
        with self._locks_guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()
        try:
            yield
        finally:
            entry[0].release()
            with self._locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    @staticmethod
    def _current(d: Path) -> int | None:
        try:
            text = (d / POINTER_FILE).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        m = _VERSION.match(text)
        if m is None or not (d / text).is_dir():
            raise SnapshotError(f"{d / POINTER_FILE}: names {text!r}, which is not a "
                                f"committed version directory")
        return int(m.group(1))

    def _fault(self, point: str, sid: str, version: int) -> None:
        if (point, sid, version) in self._crash:
            marker = self.root / f".crashed-{point}-{sid}-{version}"
            if marker.exists():
                return
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ queries
    def exists(self, namespace: str, sid: str) -> bool:
        return self._current(self._dir(namespace, sid)) is not None

    def sessions(self, namespace: str) -> list[str]:
        """Ids of the committed sessions of ``namespace``."""
        base = self.root / namespace
        if not valid_name(namespace) or not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir()
                      if valid_name(p.name) and (p / POINTER_FILE).is_file())

    def version_dir(self, namespace: str, sid: str) -> Path | None:
        """The committed version's directory (None: no such session). Hold :meth:`lock`
        while reading it: a commit deletes older versions."""
        d = self._dir(namespace, sid)
        v = self._current(d)
        return None if v is None else d / f"v{v:08d}"

    def info(self, namespace: str, sid: str) -> dict[str, Any] | None:
        """The bookkeeping of the committed version (None: no such session)."""
        d = self._dir(namespace, sid)
        with self.lock(namespace, sid):
            v = self._current(d)
            if v is None:
                return None
            hit = self.cache.get((namespace, sid), v)
            if hit is not None:
                return hit[1]
            return _read_info(d / f"v{v:08d}" / INFO_FILE)

    def load(self, namespace: str, sid: str,
             make: Callable[[SessionState], Session] | None = None) -> StoredSession | None:
        """The committed session (None: no such session). ``make`` builds the Session
        from its state (default: :meth:`Session.from_state` on this store's model)."""
        d = self._dir(namespace, sid)
        with self.lock(namespace, sid):
            v = self._current(d)
            if v is None:
                return None
            path = d / f"v{v:08d}"
            hit = self.cache.get((namespace, sid), v)
            if hit is not None:
                parts, info = hit
            else:
                parts = read_parts(path)
                info = _read_info(path / INFO_FILE)
            state = state_from_parts(parts, self.runner, path)    # validates parts either way
            if hit is None:
                self.cache.put((namespace, sid), v, parts, info)
        session = (make or (lambda s: Session.from_state(s, self.runner, self.tokenizer)))(state)
        return StoredSession(session, info, v)

    def read_version(self, path: str | os.PathLike) -> tuple[SessionState, dict[str, Any]]:
        """A snapshot directory's state and info (``{}`` when it has no info file)."""
        path = Path(path)
        state = read_snapshot(path, self.runner)
        info = _read_info(path / INFO_FILE) if (path / INFO_FILE).is_file() else {}
        return state, info

    # ------------------------------------------------------------------ changes
    def commit(self, namespace: str, sid: str, state: SessionState,
               info: dict[str, Any]) -> dict[str, Any]:
        """Make ``state`` the session's committed version; returns the info written:
        ``info`` plus ``version``, ``state_sha256`` (:func:`state_digests`) and
        ``content_sha256`` (the same without the sampling key)."""
        d = self._dir(namespace, sid)
        with self.lock(namespace, sid):
            new_dir = not d.exists()
            d.mkdir(parents=True, exist_ok=True)
            if new_dir and self.fsync:
                fsync_dir(d.parent)
                fsync_dir(d.parent.parent)
            v = (self._current(d) or 0) + 1
            parts = snapshot_parts(state, self.runner)        # device arrays read once
            full, content = parts_digests(parts)
            info = dict(info, version=v, state_sha256=full, content_sha256=content)
            name = f"v{v:08d}"
            with atomic_directory(d / name, fsync=self.fsync) as tmp:
                write_parts(tmp, parts)
                self._fault("in-version", sid, v)
                with open(os.path.join(tmp, INFO_FILE), "w") as f:
                    json.dump(info, f, indent=1)
            self._fault("before-pointer", sid, v)
            atomic_write_text(d / POINTER_FILE, name + "\n", fsync=self.fsync)
            self._fault("after-pointer", sid, v)
            for old in d.iterdir():
                if old.name != name and old.name != POINTER_FILE:
                    _remove(old)
            self.cache.put((namespace, sid), v, parts, info)    # on disk: now it may be kept
            return info

    def delete(self, namespace: str, sid: str) -> bool:
        """Remove a session (atomically: renamed away first); False if there was none."""
        d = self._dir(namespace, sid)
        with self.lock(namespace, sid):
            self.cache.drop((namespace, sid))
            if self._current(d) is None:
                return False
            tomb = d.parent / f".deleted-{sid}-{uuid.uuid4().hex[:8]}"
            os.replace(d, tomb)
            if self.fsync:
                fsync_dir(d.parent)
            shutil.rmtree(tomb, ignore_errors=True)
            return True

    def recover(self) -> dict[str, int]:
        """Remove what interrupted commits and deletes left behind; returns counts."""
        self.cache.clear()
        removed = {"temporary": 0, "stale_versions": 0, "uncommitted_sessions": 0}
        for ns in (p for p in self.root.iterdir() if p.is_dir()):
            for d in list(ns.iterdir()):
                if not valid_name(d.name) or not d.is_dir():
                    if d.name.startswith("."):
                        _remove(d)
                        removed["temporary"] += 1
                    continue
                try:
                    v = self._current(d)
                except SnapshotError:
                    continue                     # leave a damaged session for a person
                if v is None:
                    _remove(d)
                    removed["uncommitted_sessions"] += 1
                    continue
                keep = f"v{v:08d}"
                for item in list(d.iterdir()):
                    if item.name in (keep, POINTER_FILE):
                        continue
                    _remove(item)
                    removed["temporary" if item.name.startswith(".") else "stale_versions"] += 1
        return removed


def _read_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path}: unreadable session info ({e})") from e


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass
