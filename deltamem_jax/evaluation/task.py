"""What every benchmark provides to :mod:`deltamem_jax.evaluation.run`: stable item keys, a
batch function per setting (one JSON record per item), a summary, a report row, and the
exact model input of any item (``print_prompt``)."""

from __future__ import annotations

import abc

from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.loading import EvalModel
from deltamem_jax.evaluation.settings import EvalSettings

__all__ = ["Task", "resolve_decoding", "uses_memory"]


def uses_memory(setting: str) -> bool:
    return setting in ("delta_mem", "delta_mem_full_context")


def resolve_decoding(s: EvalSettings, default: Decoding) -> Decoding:
    """The task's own decoding (``decoding.mode="protocol"``), greedy, or custom sampling;
    ``decoding.max_new_tokens`` > 0 overrides the length."""
    n = s.decoding.max_new_tokens or default.max_new_tokens
    if s.decoding.mode == "greedy":
        return Decoding(n)
    if s.decoding.mode == "sample":
        d = s.decoding
        return Decoding(n, d.temperature, d.top_k, d.top_p)
    return Decoding(n, default.temperature, default.top_k, default.top_p)


class Task(abc.ABC):
    """One benchmark under one protocol."""

    name: str = ""
    title: str = ""

    def __init__(self, s: EvalSettings, em: EvalModel | None):
        self.s = s
        self.em = em

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """One stable, unique key per item, in evaluation order."""

    @abc.abstractmethod
    def run_batch(self, setting: str, indices: list[int]) -> list[dict]:
        """One JSON-able record per item of ``indices`` (in order)."""

    @abc.abstractmethod
    def summarize(self, records: list[dict]) -> dict:
        """The setting's summary (the authors' aggregation under their protocol)."""

    @abc.abstractmethod
    def report_row(self, summary: dict) -> dict:
        """Flat ``{metric: value}`` for the markdown table and the bar chart."""

    @abc.abstractmethod
    def render(self, item: str, setting: str) -> str:
        """The exact model input of ``item`` under ``setting`` (text and token count)."""

    def meta(self) -> dict:
        """Extra facts for the report (decoding, counts, ...)."""
        return {}
