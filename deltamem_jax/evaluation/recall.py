"""Recall evaluation on chat records: answer the final question from memory.

Each record's LAST assistant message is the reference. Settings:

* ``no_memory``: the earlier history is dropped; the prompt is the system
  prefix + the last ``recent_messages`` non-system messages before the answer
  + the generation prompt (tail kept to ``max_length``); memory off.
* ``delta_mem``: the episode's write segment (the earlier history, tail kept to
  ``max_write_length``, :func:`deltamem_jax.data.build_episode`) is written in one
  pass from a fresh state (token writes, or span writes with the episode's
  message / sentence ids); then the same short prompt is read with memory
  (writing during the read only if ``write_during_read``) and answered.
* ``full_context``: the whole history in the prompt (tail kept to
  ``max_context_length``, default ``max_write_length + max_length``); memory off.

Greedy decoding; prediction = generated text up to the tokenizer's stop ids,
stripped; scored with SQuAD exact match and token F1.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from deltamem_jax.data.episodes import EpisodeConfig, build_episode, split_prefix, target_indices
from deltamem_jax.data.tokenizer import Tokenizer
from deltamem_jax.evaluation.prompts import (
    MIN_BUCKET,
    SETTINGS,
    WriteSegment,
    generate_texts,
    has_memory,
    progress_bar,
    render_prompt,
    span_granularity,
    usable_examples,
    write_memory,
)
from deltamem_jax.evaluation.scoring import exact_match, token_f1
from deltamem_jax.models.functional import Runner

__all__ = ["SETTINGS", "prepare_recall", "evaluate_recall", "to_report_rows"]

log = logging.getLogger(__name__)


def prepare_recall(tokenizer: Tokenizer, records: Iterable[Any], *, max_write_length: int,
                   max_length: int, recent_messages: int = 1,
                   max_context_length: int | None = None, sentence_ids: bool = False
                   ) -> tuple[list[dict], collections.Counter]:
    """Tokenise every usable record; returns (examples, skip counts per reason).

    An example holds ``index`` (in ``records``), ``question`` (the last user
    message), ``reference``, ``short_prompt`` (no_memory / delta_mem),
    ``full_prompt`` and ``write`` (the episode's :class:`WriteSegment`)."""
    if max_context_length is None:
        max_context_length = max_write_length + max_length
    # the read segment is not used here: a huge max_length keeps build_episode from
    # rejecting long replies
    cfg = EpisodeConfig(max_length=1 << 30, max_write_length=max_write_length,
                        recent_messages=recent_messages, sentence_ids=sentence_ids)
    def build(index, rec):
        msgs = rec["messages"]
        t = target_indices(msgs, "final")[0]
        system, _, visible = split_prefix(msgs, t, recent_messages)
        ep = build_episode(tokenizer, msgs, t, cfg, "memory")
        short = render_prompt(tokenizer, [msgs[i] for i in system + visible], max_length)
        full = render_prompt(tokenizer, msgs[:t], max_context_length)
        question = next((msgs[i]["content"] for i in reversed(range(t))
                         if msgs[i]["role"] == "user"), "")
        return dict(index=index, question=question, reference=msgs[t]["content"].strip(),
                    short_prompt=short, full_prompt=full,
                    write=WriteSegment(ep.write_ids, ep.write_message_ids, ep.write_sentence_ids))

    return usable_examples(records, build, "evaluate_recall")


def evaluate_recall(runner: Runner, tokenizer: Tokenizer, records: Iterable[Any], *,
                    settings: Sequence[str] = SETTINGS, batch_size: int = 8,
                    max_new_tokens: int = 32, max_write_length: int = 8192, max_length: int = 512,
                    recent_messages: int = 1, max_context_length: int | None = None,
                    write_during_read: bool = False, return_states: bool = False,
                    min_bucket: int = MIN_BUCKET, progress: bool = True) -> dict:
    """Exact match and token F1 of the final answer per setting (see the module doc).

    Returns ``{"per_setting": {setting: {"exact_match", "f1", "n"}}, "examples":
    [{"index", "question", "reference", "predictions": {setting: text},
    "exact_match": {...}, "f1": {...}}], "skipped": {reason: count}}``; with
    ``return_states`` each example also holds its δ-mem ``"memory_state"``
    (numpy ``[L_mem, H, r, r]``). Sequences are padded to powers of two of at
    least ``min_bucket`` tokens (a larger value means fewer compiled shapes).
    """
    settings = tuple(settings)
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings must be a non-empty subset of {SETTINGS}, got {settings}")
    span = span_granularity(runner)
    if "delta_mem" in settings:
        if not has_memory(runner):
            raise ValueError("the delta_mem setting needs a model with δ-mem attached")
        if write_during_read and span is not None:
            raise ValueError(f"write_during_read needs token writes; the model writes {span} spans "
                             "and generation carries no span ids")
    examples, skipped = prepare_recall(
        tokenizer, records, max_write_length=max_write_length, max_length=max_length,
        recent_messages=recent_messages, max_context_length=max_context_length,
        sentence_ids=span == "sentence_mean")
    n = len(examples)
    preds: dict[str, list[str]] = {}
    bar = progress_bar(n * len(settings) + (n if "delta_mem" in settings else 0), "recall",
                       progress)
    common = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, min_bucket=min_bucket,
                  on_batch=bar.update)
    try:
        if "no_memory" in settings:
            bar.set_description("recall no_memory")
            preds["no_memory"] = generate_texts(
                runner, tokenizer, [e["short_prompt"] for e in examples], use_memory=False,
                **common)
        if "delta_mem" in settings:
            bar.set_description("recall delta_mem (write)")
            states = write_memory(runner, [e["write"] for e in examples],
                                  max_write_length=max_write_length, batch_size=batch_size,
                                  carry_cache=True, min_bucket=min_bucket, on_batch=bar.update)
            bar.set_description("recall delta_mem")
            preds["delta_mem"] = generate_texts(
                runner, tokenizer, [e["short_prompt"] for e in examples], memory_state=states,
                use_memory=True, write=write_during_read, **common)
        if "full_context" in settings:
            bar.set_description("recall full_context")
            preds["full_context"] = generate_texts(
                runner, tokenizer, [e["full_prompt"] for e in examples], use_memory=False, **common)
    finally:
        bar.close()

    rows = [{"index": e["index"], "question": e["question"], "reference": e["reference"],
             "predictions": {}, "exact_match": {}, "f1": {}} for e in examples]
    per_setting = {}
    for s in settings:
        for row, p in zip(rows, preds[s]):
            row["predictions"][s] = p
            row["exact_match"][s] = exact_match(p, row["reference"])
            row["f1"][s] = token_f1(p, row["reference"])
        per_setting[s] = {
            "exact_match": (float(np.mean([r["exact_match"][s] for r in rows])) if n
                            else float("nan")),
            "f1": float(np.mean([r["f1"][s] for r in rows])) if n else float("nan"),
            "n": n,
        }
    if return_states and "delta_mem" in settings:
        host = np.asarray(states)
        for i, row in enumerate(rows):
            row["memory_state"] = host[:, i]
    return {"per_setting": per_setting, "examples": rows, "skipped": dict(skipped)}


def to_report_rows(result: dict) -> dict:
    """``{setting: {"exact_match", "f1", "n"}}`` for :func:`report.write_report`."""
    return {s: dict(m) for s, m in result["per_setting"].items()}
