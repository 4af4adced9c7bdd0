"""GPQA-Diamond under the authors' protocol (``benchmark_compare.py``).

Data: rows with ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``, ``Record ID``,
``High-level domain``, ``Subdomain`` (the released csv / parquet). Options are shuffled with
CPython's ``random.Random`` seeded from the MD5 of ``<Record ID>:<seed>`` (first 8 hex
digits); greedy, 8192 tokens; the letter extracted by their patterns; accuracy and
``by_domain``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict

from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.single_prompt import SinglePromptTask, read_rows, require

__all__ = ["GPQATask", "build_prompt", "choice_order", "extract_letter", "summarize_gpqa"]

FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
          "Incorrect Answer 3", "Record ID")


def choice_order(record_id: str, seed: int) -> list[int]:
    """Positions of [correct, incorrect 1-3] after their stable shuffle."""
    digest = hashlib.md5(f"{record_id}:{seed}".encode()).hexdigest()
    order = [0, 1, 2, 3]
    random.Random(int(digest[:8], 16)).shuffle(order)
    return order


def build_prompt(item: dict, seed: int) -> tuple[str, str]:
    """(prompt, correct letter)."""
    answers = [item["Correct Answer"], item["Incorrect Answer 1"], item["Incorrect Answer 2"],
               item["Incorrect Answer 3"]]
    order = choice_order(str(item["Record ID"]), seed)
    letters = "ABCD"
    options = "\n".join(f"{letters[k]}. {str(answers[j]).strip()}" for k, j in enumerate(order))
    prompt = ("Answer the following multiple-choice question.\nPlease show your choice in the "
              "`answer` field with only the choice letter, for example: {\"answer\": \"C\"}."
              f"\n\nQuestion: {str(item['Question']).strip()}\n\n{options}")
    return prompt, letters[order.index(0)]


_PATTERNS = [
    r'```json\s*\{[^`]*?"answer"\s*:\s*"([ABCD])"[^`]*\}\s*```',
    r'"answer"\s*:\s*"([ABCD])"',
    r'\\boxed\{\s*(?:\\text\{)?\s*([ABCD])\s*\}?\s*\}',
    r'(?:final answer|correct answer|answer)\s*[:：]\s*\**\s*([ABCD])\b',
    r'(?:final answer|correct answer)\s*(?:is)?\s*\**\s*([ABCD])\b',
]
_LINE_ONLY = re.compile(r'^\s*[\*\(\[]*([ABCD])[\*\)\]\.\:]*\s*$', re.IGNORECASE)
_LINE_START = re.compile(r'^\s*([ABCD])(?:[\.)\:]|\s{2,}|$)', re.IGNORECASE)


def extract_letter(text: str) -> str:
    """The last match of the first pattern that matches; else the first, then the last,
    non-empty line if it is a bare letter or starts with one; else ""."""
    for pattern in _PATTERNS:
        found = re.findall(pattern, text, flags=re.IGNORECASE | re.DOTALL)
        if found:
            return str(found[-1]).upper()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for line in (lines[0], lines[-1]) if lines else ():
        m = _LINE_ONLY.match(line) or _LINE_START.match(line)
        if m:
            return m.group(1).upper()
    return ""


def _acc(records):
    n = len(records)
    k = sum(1 for r in records if r["correct"])
    return {"accuracy": round(k / n, 4) if n else 0.0, "num_samples": n, "num_correct": k}


def summarize_gpqa(records: list[dict]) -> dict:
    by = defaultdict(list)
    for r in records:
        by[str(r.get("domain", "unknown"))].append(r)
    return {**_acc(records), "by_domain": {k: _acc(v) for k, v in sorted(by.items())}}


class GPQATask(SinglePromptTask):
    name = "gpqa"
    title = "GPQA-Diamond accuracy, authors' protocol"
    default_decoding = Decoding(8192)

    def __init__(self, s, em):
        super().__init__(s, em)
        rows = read_rows(s.data.path, "GPQA")
        for n, r in enumerate(rows):
            require(r, FIELDS, "GPQA", f"row {n}")
        self.items = rows[: s.data.limit] if s.data.limit else rows

    def key(self, i):
        return str(self.items[i]["Record ID"])

    def prompt(self, item):
        return build_prompt(item, self.s.decoding.seed)[0]

    def score(self, item, prediction):
        letter = extract_letter(prediction)
        gold = build_prompt(item, self.s.decoding.seed)[1]
        return {"record_id": item["Record ID"], "domain": item.get("High-level domain"),
                "subdomain": item.get("Subdomain"), "correct_letter": gold,
                "predicted_letter": letter, "correct": letter == gold}

    def summarize(self, records):
        return summarize_gpqa(records)

    def report_row(self, summary):
        return {"accuracy": summary["accuracy"], "n": summary["num_samples"]}
