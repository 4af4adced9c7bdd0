"""LoCoMo under both protocols, as an engine task (items = questions ``sample_id:qa_index``).

``authors`` (``locomo_delta.py`` "official_prompt"): every question sees [system, user:
preamble + sessions latest first + QA prompt] (:mod:`locomo_authors`), truncated to the
context window − 50 tokens; memory fresh per question, written during prefill and
generation, token writes for every adapter (their SSW fallback); sampled with temperature
0.4, top-k 10, top-p 0.9, seed 42 + question index (their torch stream cannot be
reproduced: sampled numbers agree only in distribution; ``decoding.mode=greedy`` is
deterministic); predictions canonicalised and scored as they do, micro averages.
Settings: ``full_context`` (backbone) and ``delta_mem_full_context`` (their δ-mem);
also ``no_memory`` (system + QA prompt) and ``delta_mem`` (the conversation written into a
fresh memory as [system, user: preamble + sessions], then system + QA prompt, writes on).

``memory_only``: :mod:`locomo_eval` (history only in memory; greedy; F1 per category).
"""

from __future__ import annotations

import dataclasses

from deltamem_jax.evaluation import locomo as L
from deltamem_jax.evaluation import locomo_authors as A
from deltamem_jax.evaluation import locomo_eval
from deltamem_jax.evaluation.chat import format_prompt, prompt_ids, prompt_text
from deltamem_jax.evaluation.decoding import Decoding, prefill
from deltamem_jax.evaluation.generate import Prompt, answer_prompts, common_prefix_length
from deltamem_jax.evaluation.prompts import bucket, pad_rows
from deltamem_jax.evaluation.scoring import (
    LOCOMO_CATEGORY_NAMES,
    aggregate_by_category,
    canonicalize_locomo_prediction,
    locomo_summary_row,
    score_locomo_authors,
    summarize_locomo_authors,
)
from deltamem_jax.evaluation.task import Task, resolve_decoding, uses_memory
from deltamem_jax.models.cache import KVCache

__all__ = ["AUTHORS_DECODING", "LocomoTask"]

AUTHORS_DECODING = Decoding(max_new_tokens=50, temperature=0.4, top_k=10, top_p=0.9)


@dataclasses.dataclass(frozen=True)
class _Item:
    conv: int                 # index into self.convs
    question: L.LocomoQuestion
    question_index: int       # position in the conversation's filtered QA list (seeds, cat 5)


class LocomoTask(Task):
    name = "locomo"

    def __init__(self, s, em):
        super().__init__(s, em)
        lc = s.locomo
        convs = L.load_locomo(s.data.path, max_conversations=s.data.limit or None,
                              categories=lc.categories,
                              max_questions_per_conversation=lc.max_questions or None)
        self.convs = [c for c in convs if c.questions]       # the authors drop empty ones
        self.items = [_Item(ci, q, qi) for ci, c in enumerate(self.convs)
                      for qi, q in enumerate(c.questions)]
        self.authors = s.protocol == "authors"
        self.title = ("LoCoMo F1 by category (authors' protocol)" if self.authors
                      else "LoCoMo token F1 by category (memory only)")
        default = AUTHORS_DECODING if self.authors else Decoding(50)
        self.decoding = resolve_decoding(s, default)
        self._count = None
        self._memo: dict = {}
        self._written: dict = {}           # memory_only: sample_id -> written state
        self._prefix_memos: dict = {}      # prefix group -> the last prefilled prefix
        self._ids: dict = {}

    # ------------------------------------------------------------------ items
    def keys(self) -> list[str]:
        return [f"{self.convs[it.conv].sample_id}:{it.question.qa_index}" for it in self.items]

    def meta(self) -> dict:
        return {"decoding": self.decoding.describe(), "conversations": len(self.convs),
                "questions": len(self.items),
                "note": ("sampled decoding: agrees with the authors' numbers in distribution "
                         "only (torch's random stream is not reproducible in JAX)")
                if not self.decoding.greedy else "greedy decoding: deterministic"}

    def _budget(self) -> int:
        return self.em.context_window - self.s.locomo.answer_reserve_tokens

    def _counter(self):
        if self._count is None:
            self._count = A.count_tokens(self.em.tokenizer)
        return self._count

    def _spec(self, it: _Item) -> A.QuestionSpec:
        return A.question_spec(it.question, sample_id=self.convs[it.conv].sample_id,
                               question_index=it.question_index, seed=self.s.decoding.seed)

    def messages(self, it: _Item, setting: str) -> list[dict]:
        """The authors'-protocol chat messages of one question under ``setting``."""
        spec = self._spec(it)
        if setting in ("full_context", "delta_mem_full_context"):
            return A.build_messages(self.convs[it.conv], spec, self._counter(), self._budget())
        return [{"role": "system", "content": A.SYSTEM_PROMPT},
                {"role": "user", "content": spec.qa_prompt}]

    def _conversation_ids(self, setting: str, conv: int) -> list:
        """Prompt ids of every question of ``conv`` (by question index), cached."""
        return self._conversation(setting, conv)[0]

    def _conversation(self, setting: str, conv: int) -> tuple[list, list[int], list]:
        """(prompt ids, prefix group, group plans) of every question of ``conv``, cached.

        Questions whose prompts carry the same context (preamble + sessions) form one
        group, whose common prefix is prefilled once (plan ``(length, suffix bucket)``).
        Under truncation a question with a longer QA prompt may keep one turn fewer; the
        newest session comes first, so its context differs from the start: it gets its
        own group rather than spoiling the others' shared prefix."""
        if (setting, conv) not in self._ids:
            its = [it for it in self.items if it.conv == conv]
            msgs = [self.messages(it, setting) for it in its]
            ids = [prompt_ids(self.em.tokenizer, m) for m in msgs]
            contexts: dict[str, int] = {}
            group = [contexts.setdefault(m[-1]["content"][: -len(self._spec(it).qa_prompt)],
                                         len(contexts)) for it, m in zip(its, msgs)]
            plans = []
            for g in range(len(contexts)):
                rows = [x for x, k in zip(ids, group) if k == g]
                P = common_prefix_length(rows)
                plans.append((P, bucket(max(len(x) - P for x in rows))) if P else None)
            self._ids = {(setting, conv): (ids, group, plans)}
            self._prefix_memos = {}
        return self._ids[(setting, conv)]

    def _history(self, conv: int) -> list[dict]:
        return A.history_messages(self.convs[conv], self._counter(), self._budget())

    # ------------------------------------------------------------------ running
    def run_batch(self, setting: str, indices: list[int]) -> list[dict]:
        if not self.authors:
            return self._memory_only_batch(setting, indices)
        out: list[dict] = []
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(self.items[i].conv, []).append(i)
        for conv, idx in groups.items():
            out.extend(self._authors_group(setting, conv, idx))
        order = {i: k for k, i in enumerate(indices)}
        flat = [i for idx in groups.values() for i in idx]
        return [out[flat.index(i)] for i in sorted(flat, key=order.get)]

    def _authors_group(self, setting: str, conv: int, idx: list[int]) -> list[dict]:
        em, s = self.em, self.s
        every, group, plans = self._conversation(setting, conv)
        ids = [every[self.items[i].question_index] for i in idx]
        initial = self._written_history(conv) if setting == "delta_mem" else None
        texts: list[str] = [""] * len(idx)
        by_group: dict[int, list[int]] = {}
        for j, i in enumerate(idx):
            by_group.setdefault(group[self.items[i].question_index], []).append(j)
        for g, js in by_group.items():
            # one prefix (preamble + context) per group of the conversation, fed once
            out = answer_prompts(em, [Prompt(ids[j]) for j in js],
                                 [s.decoding.seed + self.items[idx[j]].question_index
                                  for j in js],
                                 memory=uses_memory(setting), decoding=self.decoding,
                                 batch_size=s.batch_size, share_prefix=True,
                                 pass_length=s.data.write_pass_length, initial_state=initial,
                                 prefix=plans[g], memo=self._prefix_memos.setdefault(g, {}))
            for j, text in zip(js, out):
                texts[j] = text
        recs = []
        for i, raw, x in zip(idx, texts, ids):
            it = self.items[i]
            spec = self._spec(it)
            pred = canonicalize_locomo_prediction(raw, it.question.category, spec.options)
            recs.append({"sample_id": self.convs[conv].sample_id, "qa_index": it.question.qa_index,
                         "question_index": it.question_index, "question": it.question.question,
                         "answer": it.question.answer, "category": it.question.category,
                         "raw_prediction": raw, "prediction": pred, "prompt_tokens": len(x),
                         "score": score_locomo_authors(pred, it.question.answer,
                                                       it.question.category)})
        return recs

    def _written_history(self, conv: int):
        """The state after writing the conversation ([system, user: preamble + sessions])
        into a fresh memory: ``[L, 1, H, r, r]`` (memoised per conversation)."""
        if self._memo.get("conv") == conv:
            return self._memo["state"]
        em = self.em
        ids = prompt_ids(em.tokenizer, self._history(conv), generation_prompt=False)
        T = bucket(len(ids))
        x, mask = pad_rows([ids], T, em.tokenizer.pad_id, "right")
        cache = KVCache.init(em.config, 1, T)
        _, _, state = prefill(em.token_runner, x, mask, memory_state=em.token_runner
                              .init_memory_state(1), cache=cache, write=True, use_memory=True,
                              pass_length=self.s.data.write_pass_length, need_logits=False)
        self._memo = {"conv": conv, "state": state}
        return state

    def _memory_only_batch(self, setting: str, indices: list[int]) -> list[dict]:
        s, em = self.s, self.em
        groups: dict[int, list[L.LocomoQuestion]] = {}
        for i in indices:
            groups.setdefault(self.items[i].conv, []).append(self.items[i].question)
        convs = [dataclasses.replace(self.convs[c], questions=tuple(qs))
                 for c, qs in groups.items()]
        res = locomo_eval.evaluate_locomo(
            em.runner, em.tokenizer, convs, settings=(setting,), batch_size=s.batch_size,
            max_new_tokens=self.decoding.max_new_tokens, categories=None,
            recent_window_tokens=s.locomo.recent_window_tokens,
            max_write_length=s.data.write_pass_length or s.data.max_write_length,
            write_during_read=s.write_during_read, score_adversarial=s.locomo.score_adversarial,
            progress=False, written=self._written)
        by_key = {(e["sample_id"], e["qa_index"]): e for e in res["examples"]}
        out = []
        for i in indices:
            it = self.items[i]
            e = by_key[(self.convs[it.conv].sample_id, it.question.qa_index)]
            out.append({"sample_id": e["sample_id"], "qa_index": e["qa_index"],
                        "question": e["question"], "answer": e["answer"],
                        "category": e["category"], "prediction": e["predictions"][setting],
                        "score": e["scores"][setting]})
        return out

    # ------------------------------------------------------------------ results
    def summarize(self, records: list[dict]) -> dict:
        if self.authors:
            return summarize_locomo_authors(records)
        agg = aggregate_by_category((r["category"], r["score"]) for r in records)
        return agg

    def report_row(self, summary: dict) -> dict:
        if not self.authors:
            return locomo_summary_row(summary)
        row = {}
        for c, v in summary["category_scores"].items():
            row[f"cat{c}_{LOCOMO_CATEGORY_NAMES.get(int(c), 'unknown')}"] = v["score"]
        row["overall"] = summary["overall_score"]
        row["n"] = summary["num_questions"]
        return row

    # ------------------------------------------------------------------ print_prompt
    def find(self, spec: str) -> _Item:
        conv_s, _, qa_s = spec.partition(":")
        cands = [ci for ci, c in enumerate(self.convs) if c.sample_id == conv_s]
        if not cands and conv_s.isdigit() and int(conv_s) < len(self.convs):
            cands = [int(conv_s)]
        if not cands:
            raise ValueError(f"print_prompt: no conversation {conv_s!r} (sample ids: "
                             f"{[c.sample_id for c in self.convs]})")
        for it in self.items:
            if it.conv == cands[0] and str(it.question.qa_index) == qa_s:
                return it
        raise ValueError(f"print_prompt: conversation {conv_s!r} has no evaluated question "
                         f"{qa_s!r} (qa indices after the category filter: "
                         f"{[it.question.qa_index for it in self.items if it.conv == cands[0]]})")

    def render(self, item: str, setting: str) -> str:
        it = self.find(item)
        tok = self.em.tokenizer
        head = (f"LoCoMo {self.convs[it.conv].sample_id} qa[{it.question.qa_index}] "
                f"(category {it.question.category}), protocol {self.s.protocol}, "
                f"setting {setting}")
        parts = []
        if not self.authors:
            conv = dataclasses.replace(self.convs[it.conv], questions=(it.question,))
            msgs, written = locomo_eval.setting_messages(tok, conv, it.question, setting,
                                                         self.s.locomo.recent_window_tokens)
        else:
            msgs = self.messages(it, setting)
            written = self._history(it.conv) if setting == "delta_mem" else None
        if written is not None:
            text = prompt_text(tok, written, generation_prompt=False)
            parts.append(format_prompt(f"{head}: written into memory first", text,
                                       len(prompt_ids(tok, written, generation_prompt=False))))
        text = prompt_text(tok, msgs)
        parts.append(format_prompt(f"{head}: model input", text, len(prompt_ids(tok, msgs))))
        return "\n".join(parts)
