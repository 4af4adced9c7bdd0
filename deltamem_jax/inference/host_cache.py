"""Recently used sessions' committed snapshots in host memory: an LRU bounded by count and bytes.

A server turn loads its session, runs, and commits it. Reading the committed
version back from disk on the next turn (``np.load`` of the window's keys and
values, JSON of every token id) is pure overhead when the process wrote those
very files a moment ago. :class:`HostCache` keeps, per session, the
:class:`~deltamem_jax.inference.snapshot.SnapshotParts` of its committed version
— exactly what :func:`~deltamem_jax.inference.snapshot.read_parts` would read,
frozen (read-only arrays, JSON-normalised metadata) — keyed by the version
number. The store asks with the version ``CURRENT`` names, so an entry can only
ever stand in for the very files it was written as; anything else is a miss.

Host memory only: nothing here is a device array, so idle sessions hold no
accelerator memory. Entries are dropped least recently used first once there
are more than ``max_sessions`` or they hold more than ``max_bytes``; a single
entry larger than ``max_bytes`` is not kept. Thread-safe.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable
from typing import Any

from deltamem_jax.inference.snapshot import SnapshotParts

__all__ = ["HostCache"]


class HostCache:
    """An LRU of ``key → (version, parts, info)`` (see the module docstring).

    Args:
      max_sessions: most entries kept (0 disables the cache).
      max_bytes: most bytes of arrays (``SnapshotParts.nbytes``) kept (0 disables it).
    """

    def __init__(self, max_sessions: int, max_bytes: int):
        if max_sessions < 0 or max_bytes < 0:
            raise ValueError(f"HostCache bounds must be ≥ 0, got max_sessions={max_sessions}, "
                             f"max_bytes={max_bytes}")
        self.max_sessions = int(max_sessions)
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[Hashable, tuple[int, SnapshotParts, dict]] = (
            collections.OrderedDict())
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_sessions > 0 and self.max_bytes > 0

    def get(self, key: Hashable, version: int) -> tuple[SnapshotParts, dict[str, Any]] | None:
        """The parts and info of ``key`` at ``version`` (None: not kept, or another version,
        which is then dropped). The info is a copy; the parts are read-only and shared."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != version:
                if entry is not None:
                    self._pop(key)
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1], dict(entry[2])

    def put(self, key: Hashable, version: int, parts: SnapshotParts,
            info: dict[str, Any]) -> None:
        """Keep ``parts`` (frozen here: the caller may go on using its own arrays) as the
        committed ``version`` of ``key``, replacing what was kept for it."""
        if not self.enabled:
            return
        frozen = parts.frozen()
        size = frozen.nbytes
        with self._lock:
            if key in self._entries:
                self._pop(key)
            if size > self.max_bytes:
                return
            self._entries[key] = (int(version), frozen, dict(info))
            self._bytes += size
            while len(self._entries) > self.max_sessions or self._bytes > self.max_bytes:
                self._pop(next(iter(self._entries)))
                self.evictions += 1

    def drop(self, key: Hashable) -> None:
        with self._lock:
            if key in self._entries:
                self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _pop(self, key: Hashable) -> None:
        _, parts, _ = self._entries.pop(key)
        self._bytes -= parts.nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"sessions": len(self._entries), "bytes": self._bytes,
                    "max_sessions": self.max_sessions, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
