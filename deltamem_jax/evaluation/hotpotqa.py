"""HotpotQA (distractor, validation) under the authors' protocol (``benchmark_compare.py``).

Data: rows with ``id``, ``question``, ``answer``, ``type``, ``level`` and ``context`` =
``{"title": [...], "sentences": [[...], ...]}`` (the released parquet / jsonl). Prompt: the
passages (numbered over all, empty ones skipped) and the question; greedy, 32 tokens; the
first non-empty line scored by EM and token F1 after their normalisation (punctuation →
space, unlike the official script); summary with ``by_level`` and ``by_type``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.single_prompt import SinglePromptTask, read_rows, require

__all__ = [
    "PROMPT",
    "HotpotQATask",
    "build_context",
    "first_line",
    "normalize_qa_span",
    "qa_f1",
    "summarize_hotpotqa",
]

PROMPT = ("Answer the question using only the passages below.\nReply with a short span or "
          "yes/no only.\n\n{context}\n\nQuestion: {question}\nAnswer:")


def build_context(item: dict) -> str:
    ctx = item["context"]
    parts = []
    for i, (title, sentences) in enumerate(zip(ctx["title"], ctx["sentences"]), start=1):
        text = " ".join(str(s).strip() for s in sentences if str(s).strip()).strip()
        if text:
            parts.append(f"Passage {i} - {title}:\n{text}")
    return "\n\n".join(parts) if parts else "No passages provided."


def normalize_qa_span(text: str) -> str:
    """Lowercase; drop whole-word a/an/the; every non-word, non-space character → space."""
    text = re.sub(r"\b(a|an|the)\b", " ", str(text).lower())
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def qa_f1(prediction: str, gold: str) -> float:
    p, g = normalize_qa_span(prediction).split(), normalize_qa_span(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    return lines[0] if lines else str(text).strip()


def _group(records, key):
    buckets = defaultdict(list)
    for r in records:
        buckets[str(r.get(key, "unknown"))].append(r)
    return {k: _em_f1(v) for k, v in sorted(buckets.items())}


def _em_f1(records):
    n = len(records)
    em = sum(1 for r in records if r["exact_match"])
    return {"exact_match": round(em / n, 4) if n else 0.0,
            "f1": round(sum(float(r["f1"]) for r in records) / n, 4) if n else 0.0,
            "num_samples": n, "num_exact_match": em}


def summarize_hotpotqa(records: list[dict]) -> dict:
    return {**_em_f1(records), "by_level": _group(records, "level"),
            "by_type": _group(records, "type")}


class HotpotQATask(SinglePromptTask):
    name = "hotpotqa"
    title = "HotpotQA (distractor) EM / F1, authors' protocol"
    default_decoding = Decoding(32)

    def __init__(self, s, em):
        super().__init__(s, em)
        rows = read_rows(s.data.path, "HotpotQA")
        for n, r in enumerate(rows):
            require(r, ("id", "question", "answer", "context"), "HotpotQA", f"row {n}")
            require(r["context"], ("title", "sentences"), "HotpotQA", f"row {n} context")
        self.items = rows[: s.data.limit] if s.data.limit else rows

    def key(self, i):
        return str(self.items[i]["id"])

    def prompt(self, item):
        return PROMPT.format(context=build_context(item), question=str(item["question"]).strip())

    def score(self, item, prediction):
        line, gold = first_line(prediction), str(item["answer"]).strip()
        em = normalize_qa_span(line) == normalize_qa_span(gold)
        return {"id": item["id"], "level": item.get("level"), "type": item.get("type"),
                "answer": gold, "extracted_answer": line, "exact_match": em,
                "f1": round(qa_f1(line, gold), 4), "correct": em}

    def summarize(self, records):
        return summarize_hotpotqa(records)

    def report_row(self, summary):
        return {"exact_match": summary["exact_match"], "f1": summary["f1"],
                "n": summary["num_samples"]}
