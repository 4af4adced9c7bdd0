"""Padding episodes into fixed-shape batches.

Rows are right-padded to a bucket length, the smallest bucket that fits the
longest row of the (global) batch, so few distinct shapes reach the compiler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deltamem_jax.data.episodes import IGNORE_INDEX, VIEWS, Episode

__all__ = ["VIEW_CODES", "BATCH_KEYS", "MIN_BUCKET", "check_buckets", "geometric_buckets",
           "bucket_length", "power_of_two_bucket", "collate"]

#: The shortest padded length of a pass (shorter rows are padded up to it).
MIN_BUCKET = 16

#: Integer code of each view in a batch's ``view`` array.
VIEW_CODES = {v: i for i, v in enumerate(VIEWS)}

BATCH_KEYS = (
    "write_ids", "write_mask", "write_message_ids", "write_sentence_ids",
    "read_ids", "read_mask", "labels", "has_write", "view", "example_index",
)


def check_buckets(buckets: Sequence[int], name: str) -> tuple[int, ...]:
    """Validate bucket lengths: a non-empty, strictly increasing list of positive ints."""
    b = tuple(int(x) for x in buckets)
    if not b or b[0] < 1 or any(x >= y for x, y in zip(b[:-1], b[1:])):
        raise ValueError(f"{name} must be a non-empty, strictly increasing list of positive ints, "
                         f"got {list(buckets)}")
    return b


def geometric_buckets(max_length: int, count: int = 4, multiple: int = 8) -> list[int]:
    """``count`` buckets halving down from ``max_length`` (rounded up to ``multiple``)."""
    out = {max_length}
    for k in range(1, count):
        out.add(min(max_length, -(-max(1, max_length >> k) // multiple) * multiple))
    return sorted(out)


def power_of_two_bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """The padded length of a pass over ``n`` tokens: the next power of two ≥ max(n, minimum),
    capped at ``cap`` (``n`` must not exceed it). Evaluation, sessions and serving pad this
    way, so a handful of shapes reach the compiler."""
    if cap is not None and n > cap:
        raise ValueError(f"a row of {n} tokens exceeds the cap {cap}")
    b = max(int(minimum), 1)
    while b < n:
        b *= 2
    return b if cap is None else min(b, int(cap))


def bucket_length(longest: int, buckets: Sequence[int], name: str = "buckets") -> int:
    """The smallest bucket ≥ ``longest`` (and ≥ 1)."""
    for b in buckets:
        if b >= max(longest, 1):
            return b
    raise ValueError(f"a row of length {longest} does not fit the largest of {name} "
                     f"{list(buckets)}")


def collate(
    episodes: Sequence[Episode],
    pad_id: int,
    write_length: int,
    read_length: int,
    views: Sequence[str] | None = None,
    example_index: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad ``episodes`` into a batch dict of numpy arrays (see ``BATCH_KEYS``)."""
    n = len(episodes)
    batch = {
        "write_ids": np.full((n, write_length), pad_id, np.int32),
        "write_mask": np.zeros((n, write_length), np.int32),
        "write_message_ids": np.full((n, write_length), -1, np.int32),
        "write_sentence_ids": np.full((n, write_length), -1, np.int32),
        "read_ids": np.full((n, read_length), pad_id, np.int32),
        "read_mask": np.zeros((n, read_length), np.int32),
        "labels": np.full((n, read_length), IGNORE_INDEX, np.int32),
        "has_write": np.zeros((n,), bool),
        "view": np.asarray([VIEW_CODES[v] for v in (views or ["memory"] * n)], np.int32),
        "example_index": np.asarray(example_index if example_index is not None else [-1] * n,
                                    np.int32),
    }
    for r, ep in enumerate(episodes):
        lw, lr = ep.write_ids.shape[0], ep.read_ids.shape[0]
        if lw > write_length or lr > read_length:
            raise ValueError(f"row {r} ({lw} write, {lr} read tokens) exceeds "
                             f"({write_length}, {read_length})")
        batch["write_ids"][r, :lw] = ep.write_ids
        batch["write_mask"][r, :lw] = 1
        batch["write_message_ids"][r, :lw] = ep.write_message_ids
        batch["write_sentence_ids"][r, :lw] = ep.write_sentence_ids
        batch["read_ids"][r, :lr] = ep.read_ids
        batch["read_mask"][r, :lr] = 1
        batch["labels"][r, :lr] = ep.labels
        batch["has_write"][r] = lw > 0
    return batch
