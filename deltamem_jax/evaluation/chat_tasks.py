"""Our own chat-record tasks as engine tasks (``memory_only`` protocol only): recall of the
final reply (:mod:`recall`) and held-out reply loss (:mod:`perplexity`). Items are the
usable records, keyed by their position in the file."""

from __future__ import annotations

import math

import numpy as np

from deltamem_jax.data import load_records
from deltamem_jax.evaluation import perplexity, recall
from deltamem_jax.evaluation.chat import format_prompt
from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.prompts import generate_texts, write_memory
from deltamem_jax.evaluation.scoring import exact_match, token_f1
from deltamem_jax.evaluation.task import Task, resolve_decoding

__all__ = ["PerplexityTask", "RecallTask"]


def _records(s):
    records = load_records(s.data.path)
    return records[: s.data.limit] if s.data.limit else records


class RecallTask(Task):
    name = "recall"
    title = "Memory recall (exact match, token F1)"

    def __init__(self, s, em):
        super().__init__(s, em)
        d = s.data
        self.decoding = resolve_decoding(s, Decoding(32))
        if not self.decoding.greedy:
            raise ValueError("config.decoding.mode: the recall task decodes greedily")
        self.examples, self.skipped = recall.prepare_recall(
            em.tokenizer, _records(s), max_write_length=d.max_write_length,
            max_length=d.max_length, recent_messages=d.recent_messages,
            sentence_ids=em.span_granularity == "sentence_mean")

    def keys(self):
        return [f"record{e['index']}" for e in self.examples]

    def meta(self):
        return {"skipped": dict(self.skipped), "decoding": self.decoding.describe()}

    def run_batch(self, setting, indices):
        em, s = self.em, self.s
        ex = [self.examples[i] for i in indices]
        common = dict(batch_size=s.batch_size, max_new_tokens=self.decoding.max_new_tokens)
        if setting == "delta_mem":
            states = write_memory(em.runner, [e["write"] for e in ex],
                                  max_write_length=(s.data.write_pass_length
                                                    or s.data.max_write_length),
                                  batch_size=s.batch_size)
            preds = generate_texts(em.runner, em.tokenizer, [e["short_prompt"] for e in ex],
                                   memory_state=states, use_memory=True,
                                   write=s.write_during_read, **common)
        else:
            key = "short_prompt" if setting == "no_memory" else "full_prompt"
            preds = generate_texts(em.runner, em.tokenizer, [e[key] for e in ex], **common)
        return [{"record": e["index"], "question": e["question"], "reference": e["reference"],
                 "prediction": p, "exact_match": exact_match(p, e["reference"]),
                 "f1": token_f1(p, e["reference"])} for e, p in zip(ex, preds)]

    def summarize(self, records):
        n = len(records)
        return {"exact_match": float(np.mean([r["exact_match"] for r in records])) if n else 0.0,
                "f1": float(np.mean([r["f1"] for r in records])) if n else 0.0, "n": n}

    def report_row(self, summary):
        return dict(summary)

    def render(self, item, setting):
        e = self.examples[int(item)] if item.isdigit() else None
        if e is None:
            raise ValueError("print_prompt: give a usable record number "
                             f"(0..{len(self.examples) - 1})")
        tok = self.em.tokenizer
        parts = []
        if setting == "delta_mem":
            parts.append(format_prompt(f"recall record {e['index']}: written into memory",
                                       tok.decode(e["write"].ids.tolist()), len(e["write"])))
        ids = e["full_prompt"] if setting == "full_context" else e["short_prompt"]
        parts.append(format_prompt(f"recall record {e['index']} ({setting}): model input",
                                   tok.decode(ids.tolist()), len(ids)))
        return "\n".join(parts)


class PerplexityTask(Task):
    name = "perplexity"
    title = "Held-out reply loss"

    def __init__(self, s, em):
        super().__init__(s, em)
        self.records = _records(s)

    def keys(self):
        return [f"record{i}" for i in range(len(self.records))]

    def run_batch(self, setting, indices):
        s = self.s
        res = perplexity.evaluate_perplexity(
            self.em.runner, self.em.tokenizer, [self.records[i] for i in indices],
            batch_size=s.batch_size, max_write_length=s.data.max_write_length,
            max_length=s.data.max_length, recent_messages=s.data.recent_messages,
            settings=(setting,), progress=False)
        got = {i: (nll, cnt) for i, nll, cnt in res[setting]["per_example"]}
        out = []
        for j in range(len(indices)):
            nll, cnt = got.get(j, (0.0, 0))
            out.append({"record": indices[j], "nll": nll, "tokens": cnt, "usable": j in got})
        return out

    def summarize(self, records):
        total = sum(r["nll"] for r in records)
        count = sum(r["tokens"] for r in records)
        loss = total / count if count else float("nan")
        return {"loss": loss, "ppl": math.exp(loss) if count else float("nan"), "tokens": count,
                "n": sum(r["usable"] for r in records)}

    def report_row(self, summary):
        return dict(summary)

    def render(self, item, setting):
        raise ValueError("print_prompt: the perplexity task scores replies; it has no prompt "
                         "to print (use the recall task on the same file)")
