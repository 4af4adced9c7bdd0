"""Held-out loss of each record's final assistant reply, with and without memory.

* ``delta_mem``: the training episode form (SPEC §3): the history (tail of
  ``max_write_length`` tokens) is written from a fresh state in one pass, then a
  read-only pass over the recent turn(s) + the reply (tail of ``max_length``);
  cross-entropy on the reply tokens.
* ``no_memory``: the same read segment from a zero state (nothing written).
* ``full_context``: the whole conversation up to and including the reply in one
  pass (tail of ``max_write_length + max_length`` tokens), memory off.

Losses are token-weighted means over all reply tokens (HF shift: the first
reply token is predicted from the last prompt token); ``ppl = exp(loss)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from deltamem_jax.data.episodes import IGNORE_INDEX, EpisodeConfig, build_episode, target_indices
from deltamem_jax.data.tokenizer import Tokenizer
from deltamem_jax.evaluation.prompts import (
    MIN_BUCKET,
    WriteSegment,
    batches,
    bucket,
    fill_batch,
    has_memory,
    nll_sums,
    pad_rows,
    progress_bar,
    span_granularity,
    usable_examples,
    write_memory,
)
from deltamem_jax.models.functional import Runner

__all__ = ["PPL_SETTINGS", "full_context_example", "evaluate_perplexity", "to_report_rows"]

log = logging.getLogger(__name__)

PPL_SETTINGS = ("delta_mem", "no_memory", "full_context")


def full_context_example(tokenizer: Tokenizer, messages, target_index: int, max_tokens: int):
    """(ids, labels) of the conversation up to the target reply, tail kept; labels on the reply."""
    chat = tokenizer.render_chat(list(messages[: target_index + 1]))
    labels = np.where(chat.message_index == target_index, chat.ids, IGNORE_INDEX).astype(np.int32)
    keep = slice(max(0, len(chat) - max_tokens), None)
    return np.asarray(chat.ids[keep], np.int32), labels[keep]


def evaluate_perplexity(runner: Runner, tokenizer: Tokenizer, records: Iterable[Any], *,
                        batch_size: int = 8, max_write_length: int = 8192, max_length: int = 512,
                        recent_messages: int = 1, settings: Sequence[str] = PPL_SETTINGS,
                        min_bucket: int = MIN_BUCKET, progress: bool = True) -> dict:
    """``{setting: {"loss", "ppl", "tokens", "n", "per_example"}}`` for
    ``delta_mem``, ``no_memory`` and ``full_context`` (see the module doc). Records whose
    episode cannot be built (e.g. a reply longer than ``max_length``) are skipped with one
    warning; ``per_example`` holds (record index, nll sum, tokens) of each usable record."""
    settings = tuple(settings)
    bad = [s for s in settings if s not in PPL_SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings must be a non-empty subset of {PPL_SETTINGS}, got {settings}")
    if "delta_mem" in settings and not has_memory(runner):
        raise ValueError("the delta_mem setting needs a model with δ-mem attached")
    span = span_granularity(runner)
    # replies longer than max_length are skipped, not cut: every setting scores whole replies
    cfg = EpisodeConfig(max_length=max_length, max_write_length=max_write_length,
                        recent_messages=recent_messages, sentence_ids=span == "sentence_mean",
                        long_replies="skip")
    def build(index, rec):
        msgs = rec["messages"]
        t = target_indices(msgs, "final")[0]
        return dict(index=index, episode=build_episode(tokenizer, msgs, t, cfg, "memory"),
                    full=full_context_example(tokenizer, msgs, t, max_write_length + max_length))

    usable, _ = usable_examples(records, build, "evaluate_perplexity")
    episodes, fulls = [u["episode"] for u in usable], [u["full"] for u in usable]
    where = [u["index"] for u in usable]

    totals = {s: [0.0, 0] for s in settings}
    per = {s: [] for s in settings}
    bar = progress_bar(len(episodes), "perplexity", progress)
    try:
        for idx in batches(len(episodes), batch_size):
            eps = [episodes[i] for i in idx]
            pad = batch_size - len(eps)

            def read_batch(pairs):
                rows = fill_batch(pairs, batch_size)
                length = bucket(max(len(r[0]) for r in rows), minimum=min_bucket)
                ids, mask = pad_rows([r[0] for r in rows], length, tokenizer.pad_id, "right")
                labels, _ = pad_rows([r[1] for r in rows], length, IGNORE_INDEX, "right")
                labels[len(pairs):] = IGNORE_INDEX  # filler rows count nothing
                return ids, mask, labels

            for s in settings:
                if s == "full_context":
                    ids, mask, labels = read_batch([fulls[i] for i in idx])
                    nll, cnt = nll_sums(runner, ids, mask, labels, use_memory=False)
                else:
                    ids, mask, labels = read_batch([(e.read_ids, e.labels) for e in eps])
                    state = None
                    if s == "delta_mem":
                        segs = [WriteSegment(e.write_ids, e.write_message_ids, e.write_sentence_ids)
                                for e in eps]
                        state = write_memory(runner, fill_batch(segs, batch_size),
                                             max_write_length=max_write_length,
                                             batch_size=batch_size, min_bucket=min_bucket)
                    nll, cnt = nll_sums(runner, ids, mask, labels, memory_state=state,
                                        use_memory=has_memory(runner))
                per[s].extend((where[i], float(a), int(b)) for i, a, b in
                              zip(idx, nll[: batch_size - pad], cnt[: batch_size - pad]))
                totals[s][0] += float(nll[: batch_size - pad].sum())
                totals[s][1] += int(cnt[: batch_size - pad].sum())
            bar.update(len(eps))
    finally:
        bar.close()

    out = {}
    for s in settings:
        total, count = totals[s]
        loss = total / count if count else float("nan")
        out[s] = {"loss": loss, "ppl": math.exp(loss) if count else float("nan"),
                  "tokens": count, "n": len(episodes), "per_example": per[s]}
    return out


def to_report_rows(result: dict) -> dict:
    """``{setting: {"loss", "ppl", "tokens", "n"}}`` for :func:`report.write_report`."""
    return {s: {k: v for k, v in m.items() if k != "per_example"} for s, m in result.items()}
