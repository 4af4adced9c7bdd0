"""LoCoMo prompts exactly as the δ-mem authors' release builds them ("official_prompt" path).

Two chat messages per question (``build_messages``): the authors' system prompt, and one
user message = conversation preamble + the sessions latest first (each turn
``{speaker} said, "{text}"`` + newline, the caption on its own line) + ``"\\n\\n"`` + the
short-answer QA prompt. Under a token budget (context window − answer reserve), turns are
admitted from session 1 onward (each session's turns from last to first) while the
running count fits; at the first turn that does not fit the current session's header is
still emitted and later sessions are dropped. Counts use the tokenizer's default special
tokens, as ``tokenizer.encode`` does in their code. Pure Python (no JAX).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from deltamem_jax.evaluation.locomo import (
    CATEGORY_2_SUFFIX,
    CONV_START_PROMPT,
    QA_PROMPT,
    LocomoConversation,
    LocomoQuestion,
    Turn,
)

__all__ = [
    "SYSTEM_PROMPT",
    "QuestionSpec",
    "build_messages",
    "context_text",
    "count_tokens",
    "history_messages",
    "question_spec",
    "render_turn",
]

SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant whose job is to understand the "
    "following conversation and answer questions based on the conversation. If you don't "
    "know the answer to a question, please don't share false information."
)
NO_INFO = "No information available"


@dataclass(frozen=True)
class QuestionSpec:
    """The question text as it enters the QA prompt (+ the category-5 options)."""

    text: str
    category: int
    options: dict | None = None

    @property
    def qa_prompt(self) -> str:
        return QA_PROMPT.format(self.text)


def _cat5_flip(seed: int, sample_id: str, question_index: int) -> bool:
    digest = hashlib.sha256(f"{seed}|{sample_id}|{question_index}|cat5".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2 == 0


def question_spec(question: LocomoQuestion, *, sample_id: str, question_index: int,
                  seed: int = 42) -> QuestionSpec:
    """Category 2: the approximate-date suffix; category 5: two options, "No information
    available" at (a) iff the SHA-256 of ``seed|sample_id|index|cat5`` is even."""
    c = int(question.category)
    if c == 2:
        return QuestionSpec(question.question + CATEGORY_2_SUFFIX, c)
    if c == 5:
        distractor = question.answer if question.answer is not None else NO_INFO
        if _cat5_flip(seed, sample_id, question_index):
            options = {"a": NO_INFO, "b": str(distractor)}
        else:
            options = {"a": str(distractor), "b": NO_INFO}
        text = (question.question + f" (a) {options['a']} (b) {options['b']}. "
                + "Select the correct answer by writing (a) or (b).")
        return QuestionSpec(text, c, options)
    return QuestionSpec(question.question, c)


def render_turn(turn: Turn) -> str:
    """``{speaker} said, "{text}"\\n`` (+ `` and shared {caption}.``) + ``\\n``."""
    out = f'{turn.speaker} said, "{turn.text}"\n'
    if turn.blip_caption:
        out += f" and shared {turn.blip_caption}."
    return out + "\n"


def count_tokens(tokenizer) -> Callable[[str], int]:
    """Token count with the tokenizer's default special tokens (HF ``encode``)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return lambda text: len(hf.encode(text))
    return lambda text: len(tokenizer.encode(text))


def context_text(conversation: LocomoConversation, qa_prompt: str, count: Callable[[str], int],
                 budget: int | None) -> str:
    """Preamble + sessions latest first, within ``budget`` tokens (None = no limit)."""
    start = CONV_START_PROMPT.format(*conversation.speakers)
    start_tokens, question_tokens = ((count(start), count(qa_prompt)) if budget is not None
                                     else (0, 0))
    conv, total, stop = "", 0, False
    for session in conversation.sessions:
        header_text = f"DATE: {session.date_time}\nCONVERSATION:\n"
        for turn in reversed(session.turns):
            t = render_turn(turn)
            if budget is not None:
                new = count(header_text + t)
                if not start_tokens + new + total + question_tokens < budget:
                    stop = True
                    break
                total += count(t)
            conv = t + conv
        conv = "\n" + header_text + conv
        if stop:
            break
    return start + conv


def build_messages(conversation: LocomoConversation, spec: QuestionSpec,
                   count: Callable[[str], int], budget: int | None) -> list[dict]:
    """[system, user] of the authors' LoCoMo prompt for one question."""
    ctx = context_text(conversation, spec.qa_prompt, count, budget)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ctx + "\n\n" + spec.qa_prompt}]


def history_messages(conversation: LocomoConversation, count: Callable[[str], int],
                     budget: int | None) -> list[dict]:
    """[system, user: preamble + sessions] (the conversation without a question): what the
    ``delta_mem`` setting writes into memory under this protocol's rendering."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": context_text(conversation, "", count, budget)}]
