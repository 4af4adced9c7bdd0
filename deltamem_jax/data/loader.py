"""A deterministic, resumable, multi-host batch iterator over episodes.

Epoch e visits a permutation drawn from ``(seed, e)``; example i's view in
epoch e is drawn from ``(seed, e, i)``. Everything about a global batch (rows,
views, bucket lengths) is a pure function of ``(seed, epoch, batch index)``,
so every host agrees on it and a restored position reproduces it exactly
without replaying. Each host materialises only its contiguous slice of rows.
The last incomplete batch of an epoch is dropped (static shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from deltamem_jax.data.collate import bucket_length, check_buckets, collate
from deltamem_jax.data.episodes import Episode

__all__ = ["EpisodeSource", "EpisodeLoader"]

_STATE_VERSION = 1


class EpisodeSource(Protocol):
    """Anything with ``len`` and ``episode(index, view)``, e.g. :class:`EpisodeSet`."""

    def __len__(self) -> int: ...

    def episode(self, index: int, view: str) -> Episode: ...


class _CallableSource:
    def __init__(self, fn: Callable[[int, str], Episode], n: int):
        self._fn, self._n = fn, n

    def __len__(self) -> int:
        return self._n

    def episode(self, index: int, view: str) -> Episode:
        return self._fn(index, view)


class EpisodeLoader:
    """Iterate over batch dicts (see ``collate.BATCH_KEYS``) of this host's rows.

    source: an :class:`EpisodeSource`, or a callable ``(index, view) -> Episode``
        together with ``num_examples``.
    global_batch_size: rows per step over all hosts (divisible by process_count).
    write_buckets / read_buckets: allowed padded lengths (their last entries
        should be max_write_length / max_length).
    p_state_only / p_no_memory: per-example view probabilities (else "memory").
    epochs: None = forever.
    """

    def __init__(
        self,
        source: EpisodeSource | Callable[[int, str], Episode],
        global_batch_size: int,
        *,
        write_buckets: Sequence[int],
        read_buckets: Sequence[int],
        seed: int = 0,
        p_state_only: float = 0.0,
        p_no_memory: float = 0.0,
        process_index: int = 0,
        process_count: int = 1,
        epochs: int | None = None,
        pad_id: int | None = None,
        num_examples: int | None = None,
        shuffle: bool = True,
    ):
        if not hasattr(source, "episode"):
            if not callable(source) or num_examples is None:
                raise ValueError("EpisodeLoader: source must have .episode(), "
                                 "or be a callable with num_examples")
            source = _CallableSource(source, int(num_examples))
        self.source = source
        self.num_examples = len(source)
        self.pad_id = pad_id if pad_id is not None else getattr(source, "pad_id", None)
        if self.pad_id is None:
            raise ValueError("EpisodeLoader: pad_id is required when the source "
                             "does not define one")
        self.global_batch_size = int(global_batch_size)
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be ≥ 1, got {global_batch_size}")
        if not (process_count >= 1 and 0 <= process_index < process_count):
            raise ValueError(f"bad process_index/process_count {process_index}/{process_count}")
        if self.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                             f"process_count {process_count}")
        if self.num_examples < self.global_batch_size:
            raise ValueError(f"only {self.num_examples} examples for a global batch of "
                             f"{self.global_batch_size}")
        if not (0 <= p_state_only and 0 <= p_no_memory and p_state_only + p_no_memory <= 1):
            raise ValueError(f"bad view probabilities p_state_only={p_state_only}, "
                             f"p_no_memory={p_no_memory}")
        views = getattr(source, "views", None)
        for v, p in (("state_only", p_state_only), ("no_memory", p_no_memory)):
            if p > 0 and views is not None and v not in views:
                raise ValueError(f"p_{v}={p} but the source was built without the {v!r} view")
        if int(seed) < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        self.seed = int(seed)
        self.p_state_only, self.p_no_memory = float(p_state_only), float(p_no_memory)
        self.write_buckets = check_buckets(write_buckets, "write_buckets")
        self.read_buckets = check_buckets(read_buckets, "read_buckets")
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.epochs = epochs
        self.shuffle = shuffle
        self.batches_per_epoch = self.num_examples // self.global_batch_size
        self._epoch, self._batch = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ determinism

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
            else:
                perm = np.arange(self.num_examples)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def view_of(self, epoch: int, index: int) -> str:
        """The view of example ``index`` in ``epoch``."""
        u = np.random.default_rng((self.seed, epoch, int(index))).random()
        if u < self.p_no_memory:
            return "no_memory"
        if u < self.p_no_memory + self.p_state_only:
            return "state_only"
        return "memory"

    def batch_at(self, epoch: int, batch: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``batch`` of ``epoch`` (random access)."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} out of range [0, {self.batches_per_epoch})")
        size = self.global_batch_size
        rows = self.order(epoch)[batch * size : (batch + 1) * size]
        views = [self.view_of(epoch, i) for i in rows]
        episodes = [self.source.episode(int(i), v) for i, v in zip(rows, views)]
        lw = bucket_length(max(e.write_ids.shape[0] for e in episodes), self.write_buckets,
                           "write_buckets")
        lr = bucket_length(max(e.read_ids.shape[0] for e in episodes), self.read_buckets,
                           "read_buckets")
        per_host = self.global_batch_size // self.process_count
        local = slice(self.process_index * per_host, (self.process_index + 1) * per_host)
        return collate(episodes[local], self.pad_id, lw, lr, views[local], rows[local])

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> EpisodeLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        out = self.batch_at(self._epoch, self._batch)
        self._batch += 1
        return out

    def global_rows(self) -> np.ndarray:
        """Example indices of the next global batch (all hosts), without advancing."""
        epoch, batch = self._epoch, self._batch
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        start = batch * self.global_batch_size
        return self.order(epoch)[start : start + self.global_batch_size]

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch is ``batch`` of ``epoch``."""
        epoch, batch = self._epoch, self._batch
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "batch": batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
            "p_state_only": self.p_state_only,
            "p_no_memory": self.p_no_memory,
            "shuffle": self.shuffle,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Jump to a position saved by :meth:`state` (no replay). The data stream
        parameters must match; the host topology and buckets may differ."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        mine = self.state()
        for key in ("seed", "global_batch_size", "num_examples", "p_state_only", "p_no_memory",
                    "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state mismatch on {key!r}: saved {state.get(key)!r}, "
                                 f"now {mine[key]!r}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state position (epoch {epoch}, batch {batch}) "
                             "is out of range")
        self._epoch, self._batch = epoch, batch
