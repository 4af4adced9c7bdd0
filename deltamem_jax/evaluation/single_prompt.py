"""Benchmarks whose items are one user message each (HotpotQA, GPQA, IFEval,
MemoryAgentBench), under the authors' protocol: backbone alone (``full_context``) vs δ-mem
(``delta_mem_full_context``: fresh memory per prompt, writes on in prefill and decoding;
message-mean adapters take the span path), greedy decoding; plus local file reading in the
released formats (jsonl / json / parquet / csv)."""

from __future__ import annotations

import abc
import json
import os

from deltamem_jax.evaluation.chat import format_prompt, prompt_ids, prompt_text, span_prompt
from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.generate import Prompt, answer_prompts
from deltamem_jax.evaluation.task import Task, resolve_decoding, uses_memory

__all__ = ["SinglePromptTask", "read_rows"]


def read_rows(path: str, what: str) -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet / .csv file (a directory: its files of one
    kind, sorted by name), as plain dicts."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".jsonl", ".json", ".parquet", ".csv")))
        if not files:
            raise FileNotFoundError(f"{what}: no .jsonl/.json/.parquet/.csv file in {path!r}")
        return [r for f in files for r in read_rows(f, what)]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.endswith(".csv"):
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {path}:{n} is not valid JSON: {e}") from e
    return rows


def require(row: dict, fields, what: str, where: str):
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"{what}: {where} lacks field(s) {missing} (has {sorted(row)})")


class SinglePromptTask(Task):
    """Subclasses set ``items`` and implement :meth:`prompt` and :meth:`score`."""

    default_decoding = Decoding(32)

    def __init__(self, s, em):
        super().__init__(s, em)
        self.decoding = resolve_decoding(s, self.default_decoding)
        self.items: list[dict] = []

    @abc.abstractmethod
    def prompt(self, item: dict) -> str:
        """The single user message."""

    @abc.abstractmethod
    def score(self, item: dict, prediction: str) -> dict:
        """The record fields of one answer."""

    def key(self, i: int) -> str:
        return str(i)

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self.items))]

    def max_new_tokens(self, item: dict) -> int:
        return self.decoding.max_new_tokens

    def messages(self, item: dict) -> list[dict]:
        return [{"role": "user", "content": self.prompt(item)}]

    def span(self, setting: str, items: list[dict]) -> bool:
        """The message-mean write path (an SSW adapter, δ-mem on)."""
        return uses_memory(setting) and self.em.span_granularity == "message_mean"

    def run_batch(self, setting: str, indices: list[int]) -> list[dict]:
        em = self.em
        items = [self.items[i] for i in indices]
        groups: dict[int, list[int]] = {}
        for j, it in enumerate(items):          # one decode length per call
            groups.setdefault(self.max_new_tokens(it), []).append(j)
        out: list[dict | None] = [None] * len(items)
        for n_new, js in groups.items():
            span = self.span(setting, [items[j] for j in js])
            msgs = [self.messages(items[j]) for j in js]
            prompts = ([span_prompt(em.tokenizer, m) for m in msgs] if span
                       else [Prompt(prompt_ids(em.tokenizer, m)) for m in msgs])
            dec = Decoding(n_new, self.decoding.temperature, self.decoding.top_k,
                           self.decoding.top_p)
            texts = answer_prompts(em, prompts, [self.s.decoding.seed + indices[j] for j in js],
                                   memory=uses_memory(setting), decoding=dec,
                                   batch_size=self.s.batch_size, span=span,
                                   share_prefix=self.share_prefix(items, js),
                                   pass_length=self.s.data.write_pass_length)
            for j, text, p in zip(js, texts, prompts):
                out[j] = {**self.score(items[j], text), "prediction": text,
                          "prompt_tokens": len(p.ids), "max_new_tokens": n_new}
        return out

    def share_prefix(self, items: list[dict], js: list[int]) -> bool:
        return False

    def meta(self) -> dict:
        return {"decoding": self.decoding.describe(), "items": len(self.items)}

    def render(self, item: str, setting: str) -> str:
        if not item.isdigit() or not 0 <= int(item) < len(self.items):
            raise ValueError(f"print_prompt: give an item number in 0..{len(self.items) - 1}")
        it = self.items[int(item)]
        msgs = self.messages(it)
        tok = self.em.tokenizer
        return format_prompt(f"{self.name} item {item} ({setting}, span writes: "
                             f"{self.span(setting, [it])}): model input",
                             prompt_text(tok, msgs), len(prompt_ids(tok, msgs)))
