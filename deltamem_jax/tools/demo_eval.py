"""The demo's evaluation: four settings on one frozen backbone, answer recall first.

* ``no_memory``: the history dropped; only the last user turn in the prompt.
* ``full_context``: the whole history in the prompt; δ-mem off (the bare backbone).
* ``delta_mem``: the history written into δ-mem, only the last user turn in the
  prompt (the claim: recall from memory alone).
* ``delta_mem_full_context``: the history in the prompt *and* written into δ-mem
  (the authors' protocol): the state written from the history is read while the
  whole prompt is processed (read-only, as in training).

Every reply is scored with :func:`~deltamem_jax.evaluation.scoring.answer_recall`
(the primary metric: the normalised gold answer occurs in the normalised reply),
exact match and token F1. ``chance`` scores the most frequent training answer per
question with the same metrics.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from deltamem_jax.evaluation.prompts import generate_texts, progress_bar, write_memory
from deltamem_jax.evaluation.recall import prepare_recall
from deltamem_jax.evaluation.scoring import answer_recall, exact_match, token_f1

__all__ = ["METRICS", "PRIMARY", "SETTINGS", "chance_scores", "evaluate_settings"]

SETTINGS = ("no_memory", "full_context", "delta_mem", "delta_mem_full_context")
METRICS = {"answer_recall": answer_recall, "exact_match": exact_match, "token_f1": token_f1}
PRIMARY = "answer_recall"
_MEMORY_SETTINGS = ("delta_mem", "delta_mem_full_context")


def _question(record: dict) -> str:
    msgs = record["messages"]
    return next((m["content"] for m in reversed(msgs[:-1]) if m["role"] == "user"), "")


def chance_scores(records: Iterable[dict], fit: Iterable[dict]) -> dict[str, float]:
    """Every metric of always answering the most frequent ``fit`` answer to the same
    final question (the most frequent answer overall for questions ``fit`` never asks):
    what a model that ignores the history can reach."""
    per_q: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for r in fit:
        per_q[_question(r)][r["messages"][-1]["content"]] += 1
        overall[r["messages"][-1]["content"]] += 1
    if not overall:
        raise ValueError("chance_scores: no fit records")
    fallback = overall.most_common(1)[0][0]
    records = list(records)
    if not records:
        raise ValueError("chance_scores: no records")
    out = {}
    for name, fn in METRICS.items():
        scores = []
        for r in records:
            c = per_q.get(_question(r))
            guess = c.most_common(1)[0][0] if c else fallback
            scores.append(fn(guess, r["messages"][-1]["content"]))
        out[name] = float(np.mean(scores))
    return out


def evaluate_settings(runner, tokenizer, records: Sequence[Any], *,
                      settings: Sequence[str] = SETTINGS, batch_size: int = 16,
                      max_new_tokens: int = 24, max_history: int = 8192,
                      write_chunk: int = 512, max_length: int = 128, min_bucket: int = 64,
                      progress: bool = True) -> dict:
    """Greedy replies to each record's final question under ``settings``, scored.

    The history (its last ``max_history`` tokens) is written into δ-mem in passes of
    at most ``write_chunk`` tokens, the KV cache carried between them (for token
    writes the same as one pass); the full-context prompt keeps its last
    ``max_history + max_length`` tokens; the short prompt its last ``max_length``.

    Returns ``{"metrics": {setting: {metric: mean, "n": count}}, "examples": [{"question",
    "reference", "predictions": {setting: text}, "scores": {setting: {metric: value}}}],
    "skipped": {reason: count}}``.
    """
    settings = tuple(settings)
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings must be a non-empty subset of {SETTINGS}, got {settings}")
    examples, skipped = prepare_recall(tokenizer, records, max_write_length=max_history,
                                       max_length=max_length)
    if not examples:
        raise ValueError(f"no usable records to evaluate (skipped: {dict(skipped)})")
    n = len(examples)
    needs_state = any(s in _MEMORY_SETTINGS for s in settings)
    bar = progress_bar(n * (len(settings) + needs_state), "evaluation", progress)
    common = {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "min_bucket": min_bucket, "on_batch": bar.update}
    short = [e["short_prompt"] for e in examples]
    full = [e["full_prompt"] for e in examples]
    preds: dict[str, list[str]] = {}
    try:
        states = None
        if needs_state:
            bar.set_description("evaluation: writing histories into δ-mem")
            states = write_memory(runner, [e["write"] for e in examples],
                                  max_write_length=write_chunk, batch_size=batch_size,
                                  carry_cache=True, min_bucket=min_bucket, on_batch=bar.update)
        plan = {"no_memory": (short, False), "full_context": (full, False),
                "delta_mem": (short, True), "delta_mem_full_context": (full, True)}
        for s in settings:
            bar.set_description(f"evaluation: {s}")
            prompts, memory = plan[s]
            preds[s] = generate_texts(runner, tokenizer, prompts, use_memory=memory,
                                      memory_state=states if memory else None, write=False,
                                      **common)
    finally:
        bar.close()
    rows = []
    for i, e in enumerate(examples):
        ref = e["reference"]
        rows.append({"question": e["question"], "reference": ref,
                     "predictions": {s: preds[s][i] for s in settings},
                     "scores": {s: {m: fn(preds[s][i], ref) for m, fn in METRICS.items()}
                                for s in settings}})
    metrics = {s: {m: float(np.mean([r["scores"][s][m] for r in rows])) for m in METRICS}
               for s in settings}
    for s in settings:
        metrics[s]["n"] = n
    return {"metrics": metrics, "examples": rows, "skipped": dict(skipped)}
