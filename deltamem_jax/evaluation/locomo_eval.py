"""LoCoMo question answering under the three settings (F1 per category, as the authors score it).

* ``no_memory``: only the question (:func:`locomo.question_prompt`), memory off.
* ``delta_mem``: every session is written into a fresh memory, chronologically,
  one user message per session (:func:`locomo.session_messages`, message id =
  session, so ``message_mean`` writes one mean per session); histories longer
  than ``max_write_length`` are written in several passes of whole sessions,
  carrying the state and (``carry_cache``, default) the KV cache, so token writes
  give exactly the one-pass state. The state is computed once per conversation
  and shared by its questions, which are asked with an optional recent window
  (the last ``recent_window_tokens`` tokens of the chronologically rendered
  conversation, before the question) and memory read (written to only if
  ``write_during_read``).
* ``full_context``: :func:`locomo.full_context_messages` (LoCoMo preamble + the
  sessions in ``order`` + the QA prompt), memory off; if it exceeds
  ``max_context_tokens`` (default: the model's ``max_position_embeddings`` −
  ``max_new_tokens``), the oldest whole sessions are dropped until the longest
  question of the conversation fits.

Greedy decoding; the raw prediction is post-processed and scored by
:func:`scoring.score_locomo` (categories 1–4 by default, like the authors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp

from deltamem_jax.data.tokenizer import Tokenizer
from deltamem_jax.evaluation import locomo as L
from deltamem_jax.evaluation.prompts import (
    MIN_BUCKET,
    SETTINGS,
    generate_texts,
    has_memory,
    progress_bar,
    render_prompt,
    span_granularity,
    take_rows,
    write_memory,
    write_segment,
)
from deltamem_jax.evaluation.scoring import (
    LOCOMO_SCORED_CATEGORIES,
    locomo_summary_row,
    score_locomo,
)
from deltamem_jax.models.functional import Runner

__all__ = ["SETTINGS", "locomo_write_segment", "fit_full_context", "setting_messages",
           "evaluate_locomo", "to_report_rows"]


def _system(system_prompt: str | None) -> list[dict]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def locomo_write_segment(tokenizer: Tokenizer, conversation: L.LocomoConversation, *,
                         system_prompt: str | None = None, sentence_ids: bool = False):
    """The whole conversation as one write segment: [system] + one user message per session."""
    return write_segment(tokenizer, _system(system_prompt) + L.session_messages(conversation),
                         sentence_ids=sentence_ids)


def _full_messages(conv, question, system_prompt, order):
    return L.full_context_messages(conv, question, order=order, system_prompt=system_prompt)


def fit_full_context(tokenizer: Tokenizer, conversation: L.LocomoConversation,
                     questions: Sequence[L.LocomoQuestion], max_context_tokens: int, *,
                     system_prompt: str | None = None, order: str = "latest_first"
                     ) -> L.LocomoConversation:
    """The conversation minus its fewest oldest sessions such that the full-context
    prompt of every question in ``questions`` fits ``max_context_tokens``."""
    if not questions:
        return conversation
    longest = max(questions, key=lambda q: len(tokenizer.encode(L.question_prompt(q))))
    n = len(conversation.sessions)

    def fits(k: int) -> bool:
        conv = dataclasses.replace(conversation, sessions=conversation.sessions[k:])
        msgs = _full_messages(conv, longest, system_prompt, order)
        return len(tokenizer.render_chat(msgs, add_generation_prompt=True)) <= max_context_tokens

    if fits(0):
        return conversation
    lo, hi = 1, n  # smallest k in [1, n] that fits (k = n: no session at all)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return dataclasses.replace(conversation, sessions=conversation.sessions[lo:])


def setting_messages(tokenizer: Tokenizer, conversation: L.LocomoConversation,
                     question: L.LocomoQuestion, setting: str, recent_window_tokens: int = 0, *,
                     max_context_tokens: int | None = None, system_prompt: str | None = None,
                     order: str = "latest_first") -> tuple[list[dict], list[dict] | None]:
    """(prompt messages, messages written into memory first or None) of one question under
    ``setting``, exactly as :func:`evaluate_locomo` builds them (for ``print_prompt``)."""
    if setting == "no_memory":
        return (_system(system_prompt)
                + [{"role": "user", "content": L.question_prompt(question)}]), None
    if setting == "delta_mem":
        recent = ""
        if recent_window_tokens:
            ids = tokenizer.encode(L.render_conversation(conversation, order="chronological"))
            recent = tokenizer.decode(ids[-recent_window_tokens:]).strip() + "\n\n"
        written = _system(system_prompt) + L.session_messages(conversation)
        return (_system(system_prompt)
                + [{"role": "user", "content": recent + L.question_prompt(question)}]), written
    if setting == "full_context":
        if max_context_tokens is not None:
            conversation = fit_full_context(tokenizer, conversation, [question], max_context_tokens,
                                            system_prompt=system_prompt, order=order)
        return _full_messages(conversation, question, system_prompt, order), None
    raise ValueError(f"memory_only LoCoMo has no setting {setting!r} (settings: {SETTINGS})")


def evaluate_locomo(runner: Runner, tokenizer: Tokenizer,
                    conversations: Sequence[L.LocomoConversation],
                    *, settings: Sequence[str] = SETTINGS, batch_size: int = 8,
                    max_new_tokens: int = 32, max_questions: int | None = None,
                    categories: Sequence[int] | None = LOCOMO_SCORED_CATEGORIES,
                    recent_window_tokens: int = 0, max_write_length: int = 8192,
                    max_context_tokens: int | None = None, system_prompt: str | None = None,
                    order: str = "latest_first", write_during_read: bool = False,
                    carry_cache: bool = True, write_batch_size: int = 1,
                    score_adversarial: bool = False, min_bucket: int = MIN_BUCKET,
                    progress: bool = True, written: dict | None = None) -> dict:
    """F1 per LoCoMo category and overall for each setting (see the module doc).

    ``written``: a cache of each conversation's written state (``sample_id`` → ``[L, 1, H, r,
    r]``), read and filled here, so that a caller evaluating a conversation's questions in
    several calls writes its history once (each conversation is written alone, so the state
    does not depend on which call wrote it).

    ``max_questions``: per conversation, after the ``categories`` filter (file order).
    The memory write granularity is the model's (``memory_write_granularity``).
    Returns ``{"per_setting": {setting: {"overall", "n", "per_category", "counts"}},
    "examples": [{"sample_id", "qa_index", "question", "answer", "category",
    "predictions": {setting: raw text}, "scores": {setting: F1 or None}}]}``.
    """
    settings = tuple(settings)
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings must be a non-empty subset of {SETTINGS}, got {settings}")
    if recent_window_tokens < 0:
        raise ValueError(f"recent_window_tokens must be ≥ 0, got {recent_window_tokens}")
    span = span_granularity(runner)
    if "delta_mem" in settings:
        if not has_memory(runner):
            raise ValueError("the delta_mem setting needs a model with δ-mem attached")
        if write_during_read and span is not None:
            raise ValueError(f"write_during_read needs token writes; the model writes {span} spans")
    if max_context_tokens is None:
        max_context_tokens = runner.config.max_position_embeddings - max_new_tokens
    keep = None if categories is None else {int(c) for c in categories}

    convs, per_conv_qs = [], []
    for conv in conversations:
        qs = [q for q in conv.questions if keep is None or q.category in keep]
        if max_questions is not None:
            qs = qs[:max_questions]
        if qs:
            convs.append(conv)
            per_conv_qs.append(qs)
    n_q = sum(len(q) for q in per_conv_qs)

    states = None
    bar = progress_bar(n_q * len(settings) + (len(convs) if "delta_mem" in settings else 0),
                       "locomo", progress)
    examples = [
        {"sample_id": c.sample_id, "qa_index": q.qa_index, "question": q.question,
         "answer": q.answer, "category": q.category, "predictions": {}, "scores": {}}
        for c, qs in zip(convs, per_conv_qs) for q in qs
    ]
    try:
        if "delta_mem" in settings:
            bar.set_description("locomo delta_mem (write)")
            cache = {} if written is None else written
            todo = [c for c in convs if c.sample_id not in cache]
            if todo:
                if written is not None and write_batch_size != 1:
                    raise ValueError("a shared `written` cache needs write_batch_size=1")
                segments = [locomo_write_segment(tokenizer, c, system_prompt=system_prompt,
                                                 sentence_ids=span == "sentence_mean")
                            for c in todo]
                fresh = write_memory(runner, segments, max_write_length=max_write_length,
                                     batch_size=write_batch_size, carry_cache=carry_cache,
                                     min_bucket=min_bucket, on_batch=bar.update)
                for j, c in enumerate(todo):
                    cache[c.sample_id] = take_rows(fresh, [j])
            bar.update(len(convs) - len(todo))
            states = jnp.concatenate([cache[c.sample_id] for c in convs], axis=1)
        for setting in settings:
            bar.set_description(f"locomo {setting}")
            at = 0
            for ci, (conv, qs) in enumerate(zip(convs, per_conv_qs)):
                prompts, mem = [], None
                if setting == "no_memory":
                    prompts = [render_prompt(tokenizer, _system(system_prompt)
                                             + [{"role": "user", "content": L.question_prompt(q)}])
                               for q in qs]
                elif setting == "delta_mem":
                    recent = ""
                    if recent_window_tokens:
                        ids = tokenizer.encode(L.render_conversation(conv, order="chronological"))
                        recent = tokenizer.decode(ids[-recent_window_tokens:]).strip() + "\n\n"
                    prompts = [render_prompt(tokenizer, _system(system_prompt) + [
                        {"role": "user", "content": recent + L.question_prompt(q)}]) for q in qs]
                    mem = take_rows(states, [ci] * len(qs))
                else:
                    fitted = fit_full_context(tokenizer, conv, qs, max_context_tokens,
                                              system_prompt=system_prompt, order=order)
                    prompts = [render_prompt(tokenizer,
                                             _full_messages(fitted, q, system_prompt, order),
                                             max_context_tokens) for q in qs]
                texts = generate_texts(
                    runner, tokenizer, prompts, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, memory_state=mem,
                    use_memory=setting == "delta_mem",
                    write=write_during_read and setting == "delta_mem", min_bucket=min_bucket,
                    on_batch=bar.update)
                for t in texts:
                    examples[at]["predictions"][setting] = t
                    at += 1
    finally:
        bar.close()

    per_setting = {}
    for setting in settings:
        res = score_locomo([e["predictions"][setting] for e in examples],
                           [e["answer"] for e in examples], [e["category"] for e in examples],
                           score_adversarial=score_adversarial)
        for e, sc in zip(examples, res.pop("scores")):
            e["scores"][setting] = sc
        per_setting[setting] = res
    return {"per_setting": per_setting, "examples": examples}


def to_report_rows(result: dict) -> dict:
    """``{setting: {"cat1_multi_hop": f1, …, "overall": f1, "n": n}}`` for
    :func:`report.write_report`."""
    return {s: locomo_summary_row(agg) for s, agg in result["per_setting"].items()}
