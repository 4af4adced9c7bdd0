"""Training episodes (SPEC §3): a written history plus a read segment with labels.

For a target assistant reply, the messages before it split into the leading
system messages (the system prefix), the last ``recent_messages`` non-system
messages (visible in the read pass) and the earlier non-system ones (written
into the memory). Views for the "context dropout" objective:

* ``memory``: as above;
* ``state_only``: only the last non-system message visible, the rest written;
* ``no_memory``: nothing written; the read segment as in ``memory``.

Both segments keep their last tokens when too long (the authors' ``_truncate_sft_sequence``:
the tail of the whole rendered read segment, template tokens included, and of the write
segment). A reply longer than ``max_length`` therefore keeps only its own tail
(``long_replies="truncate_left"``, the authors' behaviour and the default), or the episode
is skipped with reason ``reply_too_long`` (``long_replies="skip"``).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deltamem_jax.data.records import record_messages, record_problem, warn_skipped
from deltamem_jax.data.sentences import chat_sentence_ids
from deltamem_jax.data.tokenizer import TemplateError, Tokenizer

__all__ = [
    "VIEWS",
    "LONG_REPLIES",
    "IGNORE_INDEX",
    "Episode",
    "EpisodeConfig",
    "EpisodeError",
    "EpisodeSet",
    "target_indices",
    "split_prefix",
    "build_episode",
    "build_episodes",
]

log = logging.getLogger(__name__)

VIEWS = ("memory", "state_only", "no_memory")
LONG_REPLIES = ("truncate_left", "skip")  # what a reply longer than max_length does
IGNORE_INDEX = -100  # label of unsupervised tokens (HF convention)


@dataclass(frozen=True)
class EpisodeConfig:
    """How episodes are cut. Defaults follow the authors' scripts."""

    max_length: int = 512  # read segment, tail kept
    max_write_length: int = 8192  # write segment, tail kept
    recent_messages: int = 1  # non-system prefix messages visible to the read pass
    targets: str = "final"  # "final": last assistant message; "all": every assistant message
    sentence_ids: bool = False  # compute write sentence ids (for sentence_mean writes)
    long_replies: str = "truncate_left"  # reply > max_length: keep its tail, or "skip" it

    def __post_init__(self):
        if self.long_replies not in LONG_REPLIES:
            raise ValueError(f"EpisodeConfig.long_replies must be one of {LONG_REPLIES}, "
                             f"got {self.long_replies!r}")
        if self.targets not in ("final", "all"):
            raise ValueError("EpisodeConfig.targets must be 'final' or 'all', "
                             f"got {self.targets!r}")
        if self.max_length < 2:
            raise ValueError(f"EpisodeConfig.max_length must be ≥ 2, got {self.max_length}")
        if self.max_write_length < 1:
            raise ValueError("EpisodeConfig.max_write_length must be ≥ 1, "
                             f"got {self.max_write_length}")
        if self.recent_messages < 0:
            raise ValueError("EpisodeConfig.recent_messages must be ≥ 0, "
                             f"got {self.recent_messages}")


@dataclass(frozen=True, eq=False)
class Episode:
    """One training example; all arrays int32, write arrays may be empty."""

    write_ids: np.ndarray  # [Lw]
    write_message_ids: np.ndarray  # [Lw], −1 = system / no message
    write_sentence_ids: np.ndarray  # [Lw], −1 = template / system / not computed
    read_ids: np.ndarray  # [Lr]
    labels: np.ndarray  # [Lr], IGNORE_INDEX except on the target reply
    reply_truncated: bool = False  # the reply was longer than max_length: only its tail kept

    @property
    def has_write(self) -> bool:
        return self.write_ids.shape[0] > 0

    def without_write(self) -> Episode:
        """The same read segment with nothing written (the ``no_memory`` view)."""
        empty = np.zeros((0,), np.int32)
        return Episode(empty, empty, empty, self.read_ids, self.labels, self.reply_truncated)


class EpisodeError(ValueError):
    """An episode cannot be built; ``reason`` is a short key for skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def target_indices(messages: Sequence[Mapping[str, str]], targets: str = "final") -> list[int]:
    """Indices of the assistant messages to supervise."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if targets == "final":
        return idx[-1:]
    if targets == "all":
        return idx
    raise ValueError(f"targets must be 'final' or 'all', got {targets!r}")


def split_prefix(
    messages: Sequence[Mapping[str, str]], target_index: int, recent_messages: int
) -> tuple[list[int], list[int], list[int]]:
    """(system prefix, written, visible) message indices of the prefix before the target."""
    prefix = range(target_index)
    n_sys = 0
    while n_sys < target_index and messages[n_sys]["role"] == "system":
        n_sys += 1
    rest = list(prefix[n_sys:])
    n_vis = min(recent_messages, len(rest))
    return list(prefix[:n_sys]), rest[: len(rest) - n_vis], rest[len(rest) - n_vis :]


def _write_segment(tokenizer: Tokenizer, msgs: list, with_sentences: bool, max_len: int):
    chat = tokenizer.render_chat(msgs)
    owner = chat.message_index
    ids_of_msg = np.full((len(msgs),), -1, np.int32)
    nonsys = [j for j, m in enumerate(msgs) if m["role"] != "system"]
    ids_of_msg[nonsys] = np.arange(len(nonsys), dtype=np.int32)
    message_ids = np.where(owner >= 0, ids_of_msg[np.maximum(owner, 0)], -1).astype(np.int32)
    if with_sentences:
        sentence_ids = chat_sentence_ids(tokenizer, chat, msgs)
    else:
        sentence_ids = np.full((len(chat),), -1, np.int32)
    keep = slice(max(0, len(chat) - max_len), None)
    return chat.ids[keep], message_ids[keep], sentence_ids[keep]


def build_episode(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    target_index: int,
    config: EpisodeConfig = EpisodeConfig(),
    view: str = "memory",
) -> Episode:
    """The episode supervising ``messages[target_index]`` under ``view``.

    Raises :class:`EpisodeError` if the reply alone exceeds ``max_length`` under
    ``long_replies="skip"`` or no label would survive the model's one-token shift.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if not (0 <= target_index < len(messages)) or messages[target_index]["role"] != "assistant":
        raise ValueError(f"message {target_index} is not an assistant message")
    recent = 1 if view == "state_only" else config.recent_messages
    system, written, visible = split_prefix(messages, target_index, recent)

    read_msgs = [messages[i] for i in system + visible] + [messages[target_index]]
    chat = tokenizer.render_chat(read_msgs)
    is_target = chat.message_index == len(read_msgs) - 1
    n_reply = int(is_target.sum())
    truncated = n_reply > config.max_length
    if truncated and config.long_replies == "skip":
        raise EpisodeError(
            "reply_too_long",
            f"the reply has {n_reply} tokens, more than max_length={config.max_length}",
        )
    labels = np.where(is_target, chat.ids, IGNORE_INDEX).astype(np.int32)
    keep = slice(max(0, len(chat) - config.max_length), None)
    read_ids, labels = chat.ids[keep].astype(np.int32), labels[keep]
    if not (labels[1:] != IGNORE_INDEX).any():
        raise EpisodeError("no_supervised_token",
                           "no reply token is left to predict after the one-token shift")

    if view == "no_memory" or not written:
        empty = np.zeros((0,), np.int32)
        return Episode(empty, empty, empty, read_ids, labels, truncated)
    w_ids, w_msg, w_sent = _write_segment(
        tokenizer, [messages[i] for i in system + written], config.sentence_ids,
        config.max_write_length,
    )
    return Episode(w_ids.astype(np.int32), w_msg, w_sent, read_ids, labels, truncated)


def _record_episodes(tokenizer, record, config, views, counts):
    """Per target: {view: Episode}; failed targets are counted and dropped."""
    problem = record_problem(record)
    if problem is not None:
        counts[problem] += 1
        return []
    msgs = record_messages(record)
    out = []
    for t in target_indices(msgs, config.targets):
        try:
            per_view: dict[str, Episode] = {}
            if "memory" in views or "no_memory" in views:
                per_view["memory"] = build_episode(tokenizer, msgs, t, config, "memory")
            if "state_only" in views:
                same = split_prefix(msgs, t, 1) == split_prefix(msgs, t, config.recent_messages)
                per_view["state_only"] = (
                    per_view["memory"] if same and "memory" in per_view
                    else build_episode(tokenizer, msgs, t, config, "state_only")
                )
            if "no_memory" in views:
                per_view["no_memory"] = per_view["memory"].without_write()
            out.append({v: per_view[v] for v in views})
        except EpisodeError as e:
            counts[e.reason] += 1
        except TemplateError:
            counts["template_not_prefix_stable"] += 1
    return out


def _note_truncated(examples: list[dict], config: EpisodeConfig, what: str) -> int:
    """How many examples had a reply cut to its tail; one INFO line if any."""
    n = sum(any(ep.reply_truncated for ep in ex.values()) for ex in examples)
    if n:
        log.info("%s: %d of %d episodes have a reply longer than max_length=%d; kept its last "
                 "%d tokens (long_replies='truncate_left')", what, n, len(examples),
                 config.max_length, config.max_length)
    return n


def build_episodes(
    tokenizer: Tokenizer,
    records: Iterable[Any],
    config: EpisodeConfig = EpisodeConfig(),
    view: str = "memory",
) -> list[Episode]:
    """Episodes of every supervised reply under one view; bad records/replies are
    counted per reason and skipped with one warning."""
    counts: collections.Counter = collections.Counter()
    records = list(records)
    examples = [ep for r in records
                for ep in _record_episodes(tokenizer, r, config, (view,), counts)]
    warn_skipped(counts, len(records), "build_episodes")
    _note_truncated(examples, config, "build_episodes")
    return [ep[view] for ep in examples]


class EpisodeSet:
    """Pre-tokenised episodes of a record list, every requested view, for the loader.

    ``episode(i, view)`` is example i under ``view``; an example exists only if
    all requested views could be built. Views that coincide share arrays. ``skipped``
    counts dropped records/replies per reason; ``truncated`` the examples whose reply
    was cut to its last ``max_length`` tokens.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        records: Iterable[Any],
        config: EpisodeConfig = EpisodeConfig(),
        views: Sequence[str] = VIEWS,
    ):
        bad = [v for v in views if v not in VIEWS]
        if bad or not views:
            raise ValueError(f"EpisodeSet: views must be a non-empty subset of {VIEWS}, "
                             f"got {tuple(views)}")
        self.config = config
        self.views = tuple(views)
        self.pad_id = tokenizer.pad_id
        counts: collections.Counter = collections.Counter()
        records = list(records)
        self._examples = [
            ep for r in records for ep in _record_episodes(tokenizer, r, config, self.views, counts)
        ]
        self.skipped = counts
        warn_skipped(counts, len(records), "EpisodeSet")
        self.truncated = _note_truncated(self._examples, config, "EpisodeSet")
        if not self._examples:
            raise ValueError(f"EpisodeSet: no usable episodes in {len(records)} records "
                             f"(skipped: {dict(counts)})")

    def __len__(self) -> int:
        return len(self._examples)

    def episode(self, index: int, view: str = "memory") -> Episode:
        try:
            return self._examples[index][view]
        except KeyError:
            raise ValueError(f"EpisodeSet was built for views {self.views}, not {view!r}") from None
