"""MemoryAgentBench under the authors' protocol (``benchmark_compare.py``, unified prompt).

Data: one file per split (``<split>-00000-of-00001.parquet`` as released, or
``<split>.parquet`` / ``.jsonl``) in the directory ``data.path``, with ``context``,
``questions``, ``answers`` (per question a list of aliases) and ``metadata.source``. Items:
every question, in split → row → question order. Prompt: one user message (their
"memory context" template) with the context clipped to 120,000 characters (head third,
tail two thirds) and to the token budget (window − the source's generation length).
Generation lengths per source; greedy. Scoring: alias substring / exact match on their
normalisation, token F1 for InfBench-Sum; sample-weighted category and overall means.
δ-mem: token writes (with a shared context prefix) for rows with several questions, the
message-mean span path for single-question rows of an SSW adapter, as they do.
"""

from __future__ import annotations

import os
from collections import defaultdict

from deltamem_jax.evaluation.chat import prompt_ids
from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.hotpotqa import first_line, normalize_qa_span, qa_f1
from deltamem_jax.evaluation.single_prompt import SinglePromptTask, read_rows, require
from deltamem_jax.evaluation.task import uses_memory

__all__ = [
    "PROMPT",
    "SPLITS",
    "SPLIT_LABELS",
    "MABTask",
    "alias_f1",
    "aliases",
    "clip_chars",
    "generation_length",
    "is_correct",
    "source_spec",
    "summarize_mab",
]

SPLITS = ("Accurate_Retrieval", "Test_Time_Learning", "Long_Range_Understanding",
          "Conflict_Resolution")
SPLIT_LABELS = {"Accurate_Retrieval": "Accurate Retrieval",
                "Test_Time_Learning": "Test-time Learning",
                "Long_Range_Understanding": "Long Range Understanding",
                "Conflict_Resolution": "Selective Forgetting"}
CATEGORY_ORDER = ("Accurate Retrieval", "Test-time Learning", "Long Range Understanding",
                  "Selective Forgetting")
PROMPT = ("Use only the memory context below to answer the question.\nReply with a short "
          "entity, phrase, number, or sentence only.\nIf the answer is not supported by the "
          "context, reply exactly: I don't know.\n\n{context}\n\nQuestion: {question}\nAnswer:")
MARKER = "\n\n[... context truncated ...]\n\n"
_PREFIX_DATASETS = (("longmemeval_", "LongMemEval (S*)"), ("eventqa_", "EventQA"),
                    ("icl_banking77_", "BANKING77"), ("icl_clinic150_", "CLINIC150"),
                    ("icl_nlu_", "NLU"), ("icl_trec_coarse_", "TREC Coarse"),
                    ("icl_trec_fine_", "TREC Fine"), ("recsys_", "Movie Recommendation"),
                    ("factconsolidation_sh_", "FactConsolidation-SH"),
                    ("factconsolidation_mh_", "FactConsolidation-MH"))
_LENGTHS = (("eventqa_", 40), ("longmemeval_", 50), ("factconsolidation_", 10), ("icl_", 20))
_EXACT_LENGTHS = {"ruler_qa1_197K": 50, "ruler_qa2_421K": 50, "detective_qa": 2000,
                  "infbench_sum_eng_shots2": 1200, "recsys_redial_full": 300}


def source_spec(source: str) -> tuple[str, str]:
    """(dataset name, primary metric) of a source, as the authors group them."""
    exact = {"ruler_qa1_197K": "SH-Doc QA", "ruler_qa2_421K": "MH-Doc QA",
             "infbench_sum_eng_shots2": "InfinityBench-Sum", "detective_qa": "Detective QA"}
    if source in exact:
        return exact[source], "f1" if source == "infbench_sum_eng_shots2" else "accuracy"
    for prefix, name in _PREFIX_DATASETS:
        if source.startswith(prefix):
            return name, "recsys_recall@5" if prefix == "recsys_" else "accuracy"
    return source or "unknown", "accuracy"


def generation_length(source: str, default: int, official: bool = True) -> int:
    if official:
        if source in _EXACT_LENGTHS:
            return _EXACT_LENGTHS[source]
        for prefix, n in _LENGTHS:
            if source.startswith(prefix):
                return n
    return max(1, default)


def clip_chars(text: str, max_chars: int) -> str:
    """Head third and tail two thirds of ``max_chars − len(marker)`` around the marker."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    if max_chars <= len(MARKER) + 32:
        return text[-max_chars:]
    head = max(1, (max_chars - len(MARKER)) // 3)
    tail = max(1, max_chars - len(MARKER) - head)
    return text[:head].rstrip() + MARKER + text[-tail:].lstrip()


def aliases(values) -> list[str]:
    """Stripped, non-empty answers, later duplicates (same normal form) dropped."""
    out, seen = [], set()
    for v in values if isinstance(values, list) else [values]:
        text = str(v).strip()
        norm = normalize_qa_span(text) if text else ""
        if norm and norm not in seen:
            out.append(text)
            seen.add(norm)
    return out


def is_correct(prediction: str, answer_aliases: list[str]) -> bool:
    full, line = normalize_qa_span(prediction), normalize_qa_span(first_line(prediction))
    if not full and not line:
        return False
    for a in answer_aliases:
        na = normalize_qa_span(a)
        if na and (na == line or na == full or na in full):
            return True
    return False


def alias_f1(prediction: str, answer_aliases: list[str]) -> float:
    best = 0.0
    for cand in (prediction, first_line(prediction)):
        if str(cand).strip():
            for a in answer_aliases:
                if str(a).strip():
                    best = max(best, qa_f1(str(cand), str(a)))
    return best


def summarize_mab(records: list[dict]) -> dict:
    cats: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        cats[SPLIT_LABELS.get(r["split"], r["split"])][source_spec(r["source"])[0]].append(r)
    out, total, count = {}, 0.0, 0
    for cat in CATEGORY_ORDER:
        if cat not in cats:
            continue
        datasets, csum, cn = {}, 0.0, 0
        for name, recs in sorted(cats[cat].items()):
            s = sum(float(r["primary_score"]) for r in recs)
            datasets[name] = {"metric": recs[0]["primary_metric"], "num_samples": len(recs),
                              "score": round(s / len(recs), 4)}
            csum, cn = csum + s, cn + len(recs)
        out[cat] = {"overall": round(csum / cn, 4) if cn else 0.0, "num_samples": cn,
                    "datasets": datasets}
        total, count = total + csum, count + cn
    return {"overall": round(total / count, 4) if count else 0.0, "num_samples": count,
            "categories": out}


class MABTask(SinglePromptTask):
    name = "memory_agent_bench"
    title = "MemoryAgentBench, authors' protocol (sample-weighted)"
    default_decoding = Decoding(4096)

    def __init__(self, s, em):
        super().__init__(s, em)
        ms = s.memory_agent_bench
        self.skipped_recsys = 0
        for split in ms.splits:
            rows = read_rows(self._file(s.data.path, split), "MemoryAgentBench")
            rows = rows[: s.data.limit] if s.data.limit else rows
            for r_i, row in enumerate(rows):
                require(row, ("context", "questions", "answers"), "MemoryAgentBench",
                        f"{split} row {r_i}")
                source = str((row.get("metadata") or {}).get("source", "")).strip()
                if source_spec(source)[1] == "recsys_recall@5":
                    self.skipped_recsys += len(row["questions"] or [])
                    continue
                qs = [str(q).strip() for q in row["questions"] or []]
                context = clip_chars(str(row["context"]), ms.max_context_chars)
                for q_i, q in enumerate(qs):
                    ans = row["answers"][q_i] if q_i < len(row["answers"]) else []
                    self.items.append({
                        "split": split, "row": r_i, "q": q_i, "source": source,
                        "question": q, "answer_aliases": aliases(list(ans) if not isinstance(
                            ans, str) else ans), "row_questions": len(qs), "context": context,
                        "max_new_tokens": generation_length(
                            source, ms.default_max_new_tokens, ms.official_generation_lengths)})
        self._clipped: dict = {}

    @staticmethod
    def _file(root: str, split: str) -> str:
        for name in (f"{split}-00000-of-00001.parquet", f"{split}.parquet", f"{split}.jsonl"):
            for where in (os.path.join(root, "data", name), os.path.join(root, name)):
                if os.path.isfile(where):
                    return where
        raise FileNotFoundError(f"config.data.path: no {split} file in {root!r} (expected "
                                f"{split}-00000-of-00001.parquet, {split}.parquet or .jsonl)")

    def key(self, i):
        it = self.items[i]
        return f"{it['split']}:{it['row']}:{it['q']}"

    def max_new_tokens(self, item):
        return self.s.decoding.max_new_tokens or item["max_new_tokens"]

    def _budget_context(self, item) -> str:
        """The context clipped to the token budget (their clip_context_text_to_model_limit)."""
        key = (item["split"], item["row"], item["q"])
        if key in self._clipped:
            return self._clipped[key]
        tok, text = self.em.tokenizer, item["context"]
        count = lambda ctx: len(prompt_ids(tok, [{"role": "user", "content": PROMPT.format(
            context=ctx, question=item["question"])}]))
        max_prompt = max(1, self.em.context_window - self.max_new_tokens(item))
        available = max(1, max_prompt - count("") - 32)
        ids = tok.encode(text)
        if len(ids) > available:
            text = self._clip_tokens(ids, available)
        over = count(text) - max_prompt
        if over > 0:
            ids = tok.encode(text)
            text = self._clip_tokens(ids, max(1, len(ids) - (over + 32)))
        self._clipped = {key: text}
        return text

    def _clip_tokens(self, ids: list[int], keep: int) -> str:
        tok = self.em.tokenizer
        marker = len(tok.encode(MARKER))
        if keep <= marker + 2:
            return tok.decode(ids[-keep:]).strip()
        head = max(1, (keep - marker) // 3)
        tail = max(1, keep - marker - head)
        return tok.decode(ids[:head]).rstrip() + MARKER + tok.decode(ids[-tail:]).lstrip()

    def prompt(self, item):
        return PROMPT.format(context=self._budget_context(item), question=item["question"])

    def span(self, setting, items):
        return (uses_memory(setting) and self.em.span_granularity == "message_mean"
                and all(it["row_questions"] == 1 for it in items))

    def share_prefix(self, items, js):
        return True

    def run_batch(self, setting, indices):
        # rows with one question and rows with several take different write paths
        out = [None] * len(indices)
        for single in (True, False):
            sub = [j for j, i in enumerate(indices)
                   if (self.items[i]["row_questions"] == 1) == single]
            if sub:
                for j, rec in zip(sub, super().run_batch(setting, [indices[j] for j in sub])):
                    out[j] = rec
        return out

    def score(self, item, prediction):
        _name, metric = source_spec(item["source"])
        correct = is_correct(prediction, item["answer_aliases"])
        f1 = round(alias_f1(prediction, item["answer_aliases"]), 4)
        return {"split": item["split"], "row": item["row"], "source": item["source"],
                "question": item["question"], "answer_aliases": item["answer_aliases"],
                "extracted_answer": first_line(prediction), "correct": correct, "f1": f1,
                "primary_metric": metric, "primary_score": f1 if metric == "f1" else float(correct)}

    def summarize(self, records):
        return summarize_mab(records)

    def report_row(self, summary):
        row = {c: v["overall"] for c, v in summary["categories"].items()}
        return {**row, "overall": summary["overall"], "n": summary["num_samples"]}

    def meta(self):
        m = super().meta()
        if self.skipped_recsys:
            m["not_scored"] = (f"{self.skipped_recsys} recsys question(s): their Recall@5 needs "
                               "MemoryAgentBench's own post_process code and entity table")
        return m
