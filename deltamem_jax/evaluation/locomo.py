"""LoCoMo (Maharana et al., ACL 2024) loading and prompt rendering.

Pure Python (no JAX, no model code). The data file is *not* part of the repo:
by default it is read from ``<repo>/../shared/data/locomo10.json``, overridable
with the ``DELTAMEM_LOCOMO`` environment variable or an explicit path.

Rendering follows the δ-mem authors' LoCoMo protocol:

* session block: ``DATE: {date_time}\\nCONVERSATION:\\n`` then one line per turn,
  ``{speaker} said, "{text}"`` (+ `` and shared {blip_caption}.``);
* full-context prompt ("official_prompt" mode): LoCoMo's conversation
  preamble + the sessions + ``"\\n\\n"`` + the short-answer QA prompt; as the
  authors' code behaves, sessions are concatenated latest-first by default
  (turns inside a session stay in order);
* memory writing ("history_replay" mode): one user message per session,
  chronological;
* category-2 questions get the approximate-date suffix.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LOCOMO_ENV_VAR",
    "CONV_START_PROMPT",
    "QA_PROMPT",
    "CATEGORY_2_SUFFIX",
    "LocomoFormatError",
    "Turn",
    "LocomoSession",
    "LocomoQuestion",
    "LocomoConversation",
    "default_locomo_path",
    "parse_locomo_sample",
    "load_locomo",
    "count_by_category",
    "render_turn",
    "render_session",
    "render_conversation",
    "conversation_preamble",
    "session_messages",
    "question_prompt",
    "full_context_prompt",
    "full_context_messages",
]

LOCOMO_ENV_VAR = "DELTAMEM_LOCOMO"

# LoCoMo's conversation preamble, verbatim (the "wriiten" typo is in the original).
CONV_START_PROMPT = (
    "Below is a conversation between two people: {} and {}. The conversation takes place over "
    "multiple days and the date of each conversation is wriiten at the beginning of the "
    "conversation.\n\n"
)
QA_PROMPT = (
    "Based on the above conversations, write a short answer for the following question in a few "
    "words. Do not write complete and lengthy sentences. Answer with exact words from the "
    "conversations whenever possible.\n\nQuestion: {}"
)
CATEGORY_2_SUFFIX = " Use DATE of CONVERSATION to answer with an approximate date."

_SESSION_KEY = re.compile(r"session_(\d+)")


class LocomoFormatError(ValueError):
    """A LoCoMo file or sample does not have the expected structure."""


@dataclass(frozen=True)
class Turn:
    speaker: str
    dia_id: str
    text: str
    blip_caption: str | None = None


@dataclass(frozen=True)
class LocomoSession:
    index: int  # N of ``session_N`` (1-based, as in the file)
    date_time: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class LocomoQuestion:
    question: str
    answer: str  # ``answer`` (stringified); category 5 without one: ``adversarial_answer``
    category: int
    evidence: tuple[str, ...]
    adversarial_answer: str | None = None
    qa_index: int = 0  # position in the sample's original ``qa`` list


@dataclass(frozen=True)
class LocomoConversation:
    sample_id: str
    speakers: tuple[str, str]  # (speaker_a, speaker_b)
    sessions: tuple[LocomoSession, ...]
    questions: tuple[LocomoQuestion, ...]


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

def default_locomo_path() -> Path:
    """``$DELTAMEM_LOCOMO`` if set, else ``<repo root>/../shared/data/locomo10.json``."""
    env = os.environ.get(LOCOMO_ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "locomo10.json"


class _Ctx:
    def __init__(self, sample_id: str, position: int | None):
        self.sample_id = sample_id
        self.position = position

    def fail(self, fieldname: str, problem: str) -> LocomoFormatError:
        where = f"sample {self.sample_id!r}"
        if self.position is not None:
            where += f" (index {self.position})"
        return LocomoFormatError(f"LoCoMo {where}: field {fieldname!r} {problem}")


def _require(obj: Any, key: str, kind, ctx: _Ctx, fieldname: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ctx.fail(fieldname, "is missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ctx.fail(fieldname, f"must be {names}, got {type(value).__name__}")
    return value


def _answer_text(value: Any, ctx: _Ctx, fieldname: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.fail(fieldname, f"must be a string or number, got {type(value).__name__}")
    return str(value)


def parse_locomo_sample(sample: Any, position: int | None = None) -> LocomoConversation:
    """Parse one element of the LoCoMo json list. Raises :class:`LocomoFormatError`
    naming the sample and the offending field."""
    sid = sample.get("sample_id") if isinstance(sample, dict) else None
    ctx = _Ctx(str(sid) if sid is not None else "<unknown>", position)
    if not isinstance(sample, dict):
        raise ctx.fail("<sample>", f"must be an object, got {type(sample).__name__}")
    sample_id = _require(sample, "sample_id", (str, int), ctx, "sample_id")
    conv = _require(sample, "conversation", dict, ctx, "conversation")
    speaker_a = _require(conv, "speaker_a", str, ctx, "conversation.speaker_a")
    speaker_b = _require(conv, "speaker_b", str, ctx, "conversation.speaker_b")

    indices = sorted(int(m.group(1)) for k in conv if (m := _SESSION_KEY.fullmatch(k)))
    if not indices:
        raise ctx.fail("conversation.session_N", "is missing (no sessions)")
    sessions: list[LocomoSession] = []
    for n in indices:
        key = f"session_{n}"
        raw_turns = _require(conv, key, list, ctx, f"conversation.{key}")
        date_time = _require(conv, f"{key}_date_time", str, ctx, f"conversation.{key}_date_time")
        turns: list[Turn] = []
        for t, raw in enumerate(raw_turns):
            base = f"conversation.{key}[{t}]"
            if not isinstance(raw, dict):
                raise ctx.fail(base, f"must be an object, got {type(raw).__name__}")
            caption = raw.get("blip_caption")
            if caption is not None and not isinstance(caption, str):
                raise ctx.fail(f"{base}.blip_caption",
                               f"must be a string, got {type(caption).__name__}")
            turns.append(
                Turn(
                    speaker=_require(raw, "speaker", str, ctx, f"{base}.speaker"),
                    dia_id=_require(raw, "dia_id", str, ctx, f"{base}.dia_id"),
                    text=_require(raw, "text", str, ctx, f"{base}.text"),
                    blip_caption=caption or None,
                )
            )
        sessions.append(LocomoSession(index=n, date_time=date_time, turns=tuple(turns)))

    raw_qa = _require(sample, "qa", list, ctx, "qa")
    questions: list[LocomoQuestion] = []
    for i, q in enumerate(raw_qa):
        base = f"qa[{i}]"
        if not isinstance(q, dict):
            raise ctx.fail(base, f"must be an object, got {type(q).__name__}")
        question = _require(q, "question", str, ctx, f"{base}.question")
        category = _require(q, "category", int, ctx, f"{base}.category")
        if category not in (1, 2, 3, 4, 5):
            raise ctx.fail(f"{base}.category", f"must be 1-5, got {category}")
        adversarial = None
        if "adversarial_answer" in q:
            adversarial = _answer_text(q["adversarial_answer"], ctx, f"{base}.adversarial_answer")
        if "answer" in q:
            answer = _answer_text(q["answer"], ctx, f"{base}.answer")
        elif category == 5 and adversarial is not None:
            answer = adversarial
        else:
            want = "answer' or 'adversarial_answer" if category == 5 else "answer"
            raise ctx.fail(f"{base}.{want}", "is missing")
        evidence = q.get("evidence", [])
        if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
            raise ctx.fail(f"{base}.evidence", "must be a list of strings")
        questions.append(
            LocomoQuestion(
                question=question,
                answer=answer,
                category=category,
                evidence=tuple(evidence),
                adversarial_answer=adversarial,
                qa_index=i,
            )
        )
    return LocomoConversation(
        sample_id=str(sample_id),
        speakers=(speaker_a, speaker_b),
        sessions=tuple(sessions),
        questions=tuple(questions),
    )


def load_locomo(
    path: str | os.PathLike | None = None,
    *,
    max_conversations: int | None = None,
    max_questions_per_conversation: int | None = None,
    categories: Iterable[int] | None = None,
) -> list[LocomoConversation]:
    """Load the LoCoMo json (default: :func:`default_locomo_path`).

    ``categories`` keeps only those question categories (e.g. ``(1, 2, 3, 4)``);
    the per-conversation question limit applies after that filter, in file order.
    Every loaded sample is fully validated.
    """
    p = Path(path).expanduser() if path is not None else default_locomo_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"LoCoMo file not found: {p} (pass a path or set ${LOCOMO_ENV_VAR}; the default is "
            f"<repo>/../shared/data/locomo10.json)"
        )
    try:
        with open(p, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise LocomoFormatError(f"LoCoMo file {p} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise LocomoFormatError(f"LoCoMo file {p}: top level must be a list of samples, "
                                f"got {type(data).__name__}")
    for name, v in (("max_conversations", max_conversations),
                    ("max_questions_per_conversation", max_questions_per_conversation)):
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if max_conversations is not None:
        data = data[:max_conversations]
    keep = None if categories is None else {int(c) for c in categories}
    out: list[LocomoConversation] = []
    for i, sample in enumerate(data):
        conv = parse_locomo_sample(sample, position=i)
        qs = [q for q in conv.questions if keep is None or q.category in keep]
        if max_questions_per_conversation is not None:
            qs = qs[:max_questions_per_conversation]
        out.append(
            LocomoConversation(conv.sample_id, conv.speakers, conv.sessions, tuple(qs))
        )
    return out


def count_by_category(conversations: Iterable[LocomoConversation]) -> dict[int, int]:
    """Number of questions per category, sorted by category."""
    c = Counter(q.category for conv in conversations for q in conv.questions)
    return {k: c[k] for k in sorted(c)}


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

def render_turn(turn: Turn) -> str:
    """``{speaker} said, "{text}"`` (+ `` and shared {caption}.``), no newline."""
    line = f'{turn.speaker} said, "{turn.text}"'
    if turn.blip_caption:
        line += f" and shared {turn.blip_caption}."
    return line


def render_session(session: LocomoSession) -> str:
    """``DATE: …\\nCONVERSATION:\\n`` + one newline-terminated line per turn."""
    lines = "".join(render_turn(t) + "\n" for t in session.turns)
    return f"DATE: {session.date_time}\nCONVERSATION:\n{lines}"


def render_conversation(conversation: LocomoConversation, order: str = "latest_first") -> str:
    """All session blocks separated by a blank line. ``order``: "latest_first"
    (what the authors' prompt ends up with) or "chronological"."""
    if order not in ("latest_first", "chronological"):
        raise ValueError(f"order must be 'latest_first' or 'chronological', got {order!r}")
    sessions = list(conversation.sessions)
    if order == "latest_first":
        sessions.reverse()
    return "\n".join(render_session(s) for s in sessions)


def conversation_preamble(conversation: LocomoConversation) -> str:
    return CONV_START_PROMPT.format(*conversation.speakers)


def session_messages(conversation: LocomoConversation, role: str = "user") -> list[dict[str, str]]:
    """One chat message per session (chronological), content = the rendered
    session; for writing the history into memory."""
    return [{"role": role, "content": render_session(s)} for s in conversation.sessions]


def question_prompt(question: LocomoQuestion | str, category: int | None = None) -> str:
    """The short-answer QA prompt; category 2 gets the approximate-date suffix.
    ``category`` overrides / supplies the category for a plain string."""
    if isinstance(question, LocomoQuestion):
        text = question.question
        category = question.category if category is None else category
    else:
        text = str(question)
    if category is not None and int(category) == 2:
        text += CATEGORY_2_SUFFIX
    return QA_PROMPT.format(text)


def full_context_prompt(
    conversation: LocomoConversation,
    question: LocomoQuestion | str,
    *,
    category: int | None = None,
    order: str = "latest_first",
) -> str:
    """Preamble + whole conversation + ``"\\n\\n"`` + :func:`question_prompt`."""
    return (
        conversation_preamble(conversation)
        + render_conversation(conversation, order=order)
        + "\n\n"
        + question_prompt(question, category)
    )


def full_context_messages(
    conversation: LocomoConversation,
    question: LocomoQuestion | str,
    *,
    category: int | None = None,
    order: str = "latest_first",
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for the full-context setting: optional system message +
    one user message holding :func:`full_context_prompt`."""
    msgs: list[dict[str, str]] = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user",
                 "content": full_context_prompt(conversation, question, category=category,
                                                order=order)})
    return msgs
