"""The one item loop of every evaluator: fixed batches, sharding over processes, streamed
per-item records, resume, progress with ETA.

Items are numbered ``0..N-1`` with a stable key each. Batches are fixed slices of that
list (``batch_size`` items), so a batch's contents, and thus its numbers, never depend on
how many processes run or where a run was interrupted. Batch ``j`` belongs to process
``j % world``. Each finished batch's records are appended to
``WORKDIR/records/<setting>/rank<r>.jsonl`` in one write (:func:`append_lines`); a resumed
run skips every batch whose keys are all on disk (written by any process count) and
recomputes the rest. :func:`collect` merges all files by item index.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deltamem_jax.utils.atomic import append_lines, atomic_write_json

log = logging.getLogger("deltamem_jax.eval")

__all__ = ["RecordStore", "Shard", "check_fingerprint", "collect", "run_items"]


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes."""

    rank: int = 0
    world: int = 1


class RecordStore:
    """Per-item records of one run, one jsonl file per (setting, process)."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir) / "records"

    def path(self, setting: str, rank: int) -> Path:
        return self.root / setting / f"rank{rank}.jsonl"

    def read(self, setting: str) -> dict[str, dict]:
        """Every complete record of ``setting`` on disk, by key (later lines win)."""
        out: dict[str, dict] = {}
        folder = self.root / setting
        if not folder.is_dir():
            return out
        for f in sorted(folder.glob("rank*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:      # a torn last line of a killed run
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    out[rec["key"]] = rec
        return out

    def append(self, setting: str, rank: int, records: Sequence[dict]) -> None:
        append_lines(self.path(setting, rank),
                     [json.dumps(r, ensure_ascii=False, allow_nan=False) for r in records])

    def clear(self, setting: str) -> None:
        folder = self.root / setting
        if folder.is_dir():
            for f in folder.glob("rank*.jsonl"):
                f.unlink()


def check_fingerprint(workdir: str | Path, fingerprint: dict, resume: bool) -> None:
    """Refuse to mix records of two different configurations in one workdir."""
    path = Path(workdir) / "records" / "run.json"
    fingerprint = json.loads(json.dumps(fingerprint))        # tuples -> lists, as on disk
    if path.is_file() and resume:
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ValueError(f"{path}: this workdir holds records of another configuration "
                             f"(differs in {diff}); use a new --workdir or "
                             f"--config.resume=False to start over")
        return
    atomic_write_json(path, fingerprint)


def _fmt(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_items(setting: str, keys: Sequence[str], batch_fn: Callable[[list[int]], list[dict]], *,
              store: RecordStore, batch_size: int, shard: Shard = Shard(), resume: bool = True,
              progress: bool = True, desc: str = "") -> int:
    """Run ``batch_fn`` over this process's unfinished batches; returns the items computed.

    ``batch_fn(indices)`` returns one record (a JSON-able dict) per index, in order; the
    engine adds ``key`` and ``index``.
    """
    if len(set(keys)) != len(keys):
        raise ValueError(f"{desc or setting}: item keys are not unique")
    if not resume:
        store.clear(setting)
    done = set(store.read(setting)) if resume else set()
    n = len(keys)
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    mine = [b for j, b in enumerate(batches) if j % shard.world == shard.rank]
    todo = [b for b in mine if not all(keys[i] in done for i in b)]
    total = sum(len(b) for b in mine)
    skipped = total - sum(len(b) for b in todo)
    if skipped:
        log.info("%s: %d of %d items already done, resuming", desc or setting, skipped, total)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=skipped, desc=desc or setting, disable=not progress,
               dynamic_ncols=True)
    start, computed = time.time(), 0
    try:
        for b in todo:
            recs = batch_fn(b)
            if len(recs) != len(b):
                raise RuntimeError(f"{setting}: batch_fn returned {len(recs)} records for "
                                   f"{len(b)} items")
            for i, r in zip(b, recs):
                r["key"], r["index"] = keys[i], i
            store.append(setting, shard.rank, recs)
            computed += len(b)
            bar.update(len(b))
            if not progress:
                rate = computed / max(time.time() - start, 1e-9)
                left = total - skipped - computed
                log.info("%s: %d/%d items, %.2f items/s, ETA %s", desc or setting,
                         skipped + computed, total, rate, _fmt(left / max(rate, 1e-9)))
    finally:
        bar.close()
    return computed


def collect(store: RecordStore, setting: str, keys: Sequence[str]) -> list[dict]:
    """All records of ``setting`` in item order; every key must be present."""
    have = store.read(setting)
    missing = [k for k in keys if k not in have]
    if missing:
        raise RuntimeError(f"{setting}: {len(missing)} item(s) have no record yet "
                           f"(first: {missing[0]!r}); did every process finish?")
    return [have[k] for k in keys]
